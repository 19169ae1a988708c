//! `hlfs import`: a raw disk image into a volume, keeping it thin.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hlfs_volume::{CreateOptions, Volume};

use super::open_writer;
use crate::args::{human, parse_size, progress, Settings};

/// Bytes read from the input at a time.
const CHUNK: usize = 4 << 20;
/// Chunks read ahead of the writes.
const READ_AHEAD: usize = 4;

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
    let input = if file == "-" {
        Input::Stream(Box::new(std::io::stdin()))
    } else {
        let mut f = std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?;
        let kind = f
            .metadata()
            .with_context(|| format!("cannot stat {file}"))?
            .file_type();
        if kind.is_file() {
            let len = f
                .metadata()
                .with_context(|| format!("cannot stat {file}"))?
                .len();
            Input::File(f, len)
        } else if kind.is_block_device() {
            // A block device's size is where it ends, not its metadata's.
            let len = f
                .seek(SeekFrom::End(0))
                .with_context(|| format!("cannot find the size of {file}"))?;
            Input::File(f, len)
        } else {
            // A pipe, a FIFO, a character device: read until it ends.
            Input::Stream(Box::new(f))
        }
    };
    let known_size = input.size();
    if args.create {
        let create = CreateOptions {
            size: known_size.unwrap_or(0),
            block_size: u32::try_from(args.block_size).context("block size too large")?,
            segment_size: args.segment_size,
        };
        Volume::create(&settings.backend(volume, true)?, &create).await?;
    }
    let vol = open_writer(volume, settings).await?;
    let result = import_into(&vol, input, args.create, file).await;
    let closed = vol.close().await;
    let (bytes, stored, elapsed) = result?;
    closed?;
    outln!(
        "imported {} from {file} into {volume} in {:.1}s; {} of data stored",
        human(bytes),
        elapsed.as_secs_f64(),
        human(stored)
    );
    Ok(())
}

/// What is imported: a file or block device of known size (a file's holes
/// need not be read), or a stream read until it ends.
enum Input {
    File(std::fs::File, u64),
    Stream(Box<dyn Read + Send>),
}

impl Input {
    fn size(&self) -> Option<u64> {
        match self {
            Input::File(_, len) => Some(*len),
            Input::Stream(_) => None,
        }
    }
}

/// A piece of the input, in order.
enum Piece {
    Data {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Bytes the file system says are a hole: zeros, never read.
    Hole {
        offset: u64,
        len: u64,
    },
}

/// The ranges of the file that may hold data, in order, from SEEK_DATA and
/// SEEK_HOLE; the whole file where the file system cannot tell.
fn data_ranges(f: &std::fs::File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a file descriptor we hold; it only moves the offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // No data after `pos`: the rest is a hole.
                Some(libc::ENXIO) => break,
                // Not supported here: read everything.
                _ => return vec![(0, len)],
            }
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        if hole <= data {
            break;
        }
        ranges.push((data, hole - data));
        pos = hole;
    }
    ranges
}

/// Reads the input on a thread of its own, so that reading the next chunk
/// overlaps writing this one, and sends it piece by piece. The thread is
/// joined once the pieces end, so that a reader that died is an error,
/// not the end of the input.
fn spawn_reader(
    input: Input,
    file: String,
) -> (
    tokio::sync::mpsc::Receiver<Result<Piece>>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let reader = std::thread::spawn(move || {
        let send = |piece| tx.blocking_send(piece).is_ok();
        let failed =
            |e: std::io::Error| Err(anyhow::Error::new(e).context(format!("reading {file}")));
        match input {
            Input::File(f, len) => {
                use std::os::unix::fs::FileExt;
                let mut at = 0u64;
                for (start, n) in data_ranges(&f, len) {
                    if start > at
                        && !send(Ok(Piece::Hole {
                            offset: at,
                            len: start - at,
                        }))
                    {
                        return;
                    }
                    let end = start + n;
                    let mut offset = start;
                    while offset < end {
                        let mut bytes = vec![0u8; (end - offset).min(CHUNK as u64) as usize];
                        if let Err(e) = f.read_exact_at(&mut bytes, offset) {
                            send(failed(e));
                            return;
                        }
                        offset += bytes.len() as u64;
                        if !send(Ok(Piece::Data {
                            offset: offset - bytes.len() as u64,
                            bytes,
                        })) {
                            return;
                        }
                    }
                    at = end;
                }
                if len > at {
                    send(Ok(Piece::Hole {
                        offset: at,
                        len: len - at,
                    }));
                }
            }
            Input::Stream(mut stream) => {
                let mut offset = 0u64;
                loop {
                    let mut bytes = vec![0u8; CHUNK];
                    match read_full(&mut *stream, &mut bytes) {
                        Ok(0) => return,
                        Ok(n) => {
                            bytes.truncate(n);
                            offset += n as u64;
                            if !send(Ok(Piece::Data {
                                offset: offset - n as u64,
                                bytes,
                            })) {
                                return;
                            }
                        }
                        Err(e) => {
                            send(failed(e));
                            return;
                        }
                    }
                }
            }
        }
    });
    (rx, reader)
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

/// Copies the input into the volume from offset 0. Holes and zero blocks
/// are skipped on a fresh volume and written as zeroes (releasing space)
/// otherwise.
async fn import_into(
    vol: &Volume,
    input: Input,
    fresh: bool,
    file: &str,
) -> Result<(u64, u64, Duration)> {
    let known_size = input.size();
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
    let (mut pieces, reader) = spawn_reader(input, file.to_string());
    let mut total = 0u64;
    while let Some(piece) = pieces.recv().await {
        let (offset, bytes) = match piece? {
            Piece::Hole { offset, len } => {
                if !fresh {
                    vol.write_zeroes(offset, len).await?;
                }
                total = offset + len;
                bar.set_position(total);
                continue;
            }
            Piece::Data { offset, bytes } => (offset, bytes),
        };
        let (n, end) = (bytes.len(), offset + bytes.len() as u64);
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
            let zero = |k: usize| bytes[k..(k + bs).min(n)].iter().all(|&b| b == 0);
            let is_zero = zero(i);
            let mut j = i;
            while j < n && zero(j) == is_zero {
                j = (j + bs).min(n);
            }
            let at = offset + i as u64;
            if !is_zero {
                vol.write(at, &bytes[i..j]).await?;
            } else if !fresh {
                vol.write_zeroes(at, (j - i) as u64).await?;
            }
            i = j;
        }
        total = end;
        bar.set_position(total);
    }
    if reader.join().is_err() {
        bail!("reading {file} failed: the reader stopped unexpectedly");
    }
    vol.flush().await?;
    bar.finish_and_clear();
    Ok((total, vol.allocated_bytes(), start.elapsed()))
}
