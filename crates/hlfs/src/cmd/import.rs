//! `hlfs import`: a raw disk image into a volume, keeping it thin.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hlfs_volume::{CreateOptions, Volume};

use super::open_writer;
use crate::args::{human, parse_size, progress, Settings};

/// Bytes read from the input at a time.
const CHUNK: usize = 4 << 20;

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    file: String,
    volume: String,
    /// Create the volume, sized to the image (stdin: grown as it arrives).
    #[arg(long)]
    create: bool,
    /// Block size of a volume made with --create.
    #[arg(long, default_value = "4K", value_parser = parse_size, requires = "create")]
    block_size: u64,
    /// Segment size of a volume made with --create.
    #[arg(long, default_value = "64M", value_parser = parse_size, requires = "create")]
    segment_size: u64,
}

pub async fn run(args: ImportArgs, settings: &Settings) -> Result<()> {
    let (file, volume) = (&args.file, &args.volume);
    let (mut input, known_size): (Box<dyn Read>, Option<u64>) = if file == "-" {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?;
        let len = f
            .metadata()
            .with_context(|| format!("cannot stat {file}"))?
            .len();
        (Box::new(f), Some(len))
    };
    if args.create {
        let create = CreateOptions {
            size: known_size.unwrap_or(0),
            block_size: u32::try_from(args.block_size).context("block size too large")?,
            segment_size: args.segment_size,
        };
        Volume::create(&settings.backend(volume, true)?, &create).await?;
    }
    let vol = open_writer(volume, settings).await?;
    let result = import_into(&vol, &mut *input, known_size, args.create, file).await;
    let closed = vol.close().await;
    let (bytes, stored, elapsed) = result?;
    closed?;
    println!(
        "imported {} from {file} into {volume} in {:.1}s; {} of data stored",
        human(bytes),
        elapsed.as_secs_f64(),
        human(stored)
    );
    Ok(())
}

/// Fills `buf` as far as the reader allows; returns how much was read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies the input into the volume from offset 0. Zero blocks are skipped
/// on a fresh volume and written as zeroes (releasing space) otherwise.
async fn import_into(
    vol: &Volume,
    input: &mut dyn Read,
    known_size: Option<u64>,
    fresh: bool,
    file: &str,
) -> Result<(u64, u64, Duration)> {
    if let Some(len) = known_size {
        if len > vol.size() {
            bail!(
                "{file} is {} bytes but {} holds only {} bytes; grow it first with hlfs resize",
                len,
                vol.location(),
                vol.size()
            );
        }
    }
    let grow = known_size.is_none() && fresh;
    let start = Instant::now();
    let bar = progress(known_size, "importing");
    let bs = vol.block_size() as usize;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = read_full(input, &mut buf).with_context(|| format!("reading {file}"))?;
        if n == 0 {
            break;
        }
        let end = offset + n as u64;
        if end > vol.size() {
            if grow {
                vol.resize(end).await?;
            } else {
                bail!(
                    "the input is larger than {} ({} bytes)",
                    vol.location(),
                    vol.size()
                );
            }
        }
        // Runs of all-zero and of data blocks.
        let mut i = 0;
        while i < n {
            let zero = |k: usize| buf[k..(k + bs).min(n)].iter().all(|&b| b == 0);
            let is_zero = zero(i);
            let mut j = i;
            while j < n && zero(j) == is_zero {
                j = (j + bs).min(n);
            }
            let at = offset + i as u64;
            if !is_zero {
                vol.write(at, &buf[i..j]).await?;
            } else if !fresh {
                vol.write_zeroes(at, (j - i) as u64).await?;
            }
            i = j;
        }
        offset = end;
        bar.set_position(offset);
    }
    vol.flush().await?;
    bar.finish_and_clear();
    Ok((offset, vol.allocated_bytes(), start.elapsed()))
}
