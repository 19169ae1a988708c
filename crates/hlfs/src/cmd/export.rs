//! `hlfs export`: a volume or snapshot to a raw image, sparse where it has
//! holes.

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::args::{human, open_view, progress, split_snapshot, Settings};

/// Bytes read from the volume at a time.
const CHUNK: usize = 4 << 20;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    volume: String,
    file: String,
}

pub async fn run(args: ExportArgs, settings: &Settings) -> Result<()> {
    let (arg, file) = (&args.volume, &args.file);
    let (volume, at) = split_snapshot(arg);
    let vol = open_view(settings, volume, at).await?;
    let size = vol.size();
    let start = Instant::now();
    let bar = progress(Some(size), "exporting");
    let mut buf = vec![0u8; CHUNK];
    if file == "-" {
        let mut out = std::io::stdout().lock();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            vol.read_into(off, &mut buf[..n]).await?;
            out.write_all(&buf[..n]).context("writing to stdout")?;
            off += n as u64;
            bar.set_position(off);
        }
        out.flush().context("writing to stdout")?;
    } else {
        let path = PathBuf::from(file);
        let mut out =
            std::fs::File::create(&path).with_context(|| format!("cannot create {file}"))?;
        out.set_len(size)
            .with_context(|| format!("cannot size {file}"))?;
        let mut off = 0;
        // Holes stay holes in the output file.
        while off < size {
            for ext in vol.extents(off, size - off, 4096).await? {
                off = ext.offset + ext.len;
                if !ext.data {
                    bar.set_position(off);
                    continue;
                }
                let mut p = ext.offset;
                while p < off {
                    let n = (off - p).min(CHUNK as u64) as usize;
                    vol.read_into(p, &mut buf[..n]).await?;
                    out.seek(SeekFrom::Start(p))
                        .and_then(|_| out.write_all(&buf[..n]))
                        .with_context(|| format!("writing {file}"))?;
                    p += n as u64;
                    bar.set_position(p);
                }
            }
        }
        out.sync_all().with_context(|| format!("writing {file}"))?;
    }
    bar.finish_and_clear();
    eprintln!(
        "exported {} from {arg} to {file} in {:.1}s",
        human(size),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
