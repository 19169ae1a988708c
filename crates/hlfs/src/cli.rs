//! The commands.

use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hlfs_volume::{
    check, utc, Backend, CreateOptions, Durability, OpenOptions, StoreOptions, View, Volume,
    VolumeInfo,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::bench;

/// HLFS: a log-structured virtual disk for virtual machines.
///
/// A VOLUME is a local directory path (e.g. ./vm1.hlfs), a file:// URI, or
/// s3://BUCKET/PREFIX/NAME (endpoint, region and credentials from the AWS
/// environment variables: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY).
/// Sizes take binary suffixes: 512K, 64M, 10G, 1T.
#[derive(Parser, Debug)]
#[command(name = "hlfs", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log what the engine does (or set RUST_LOG).
    #[arg(short, long, global = true)]
    pub verbose: bool,

    /// Memory the block map may use while the volume is open.
    #[arg(long, global = true, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub map_budget: u64,

    /// Directory for the local journal and read cache of volumes on a
    /// remote store (s3://). Journals there hold writes not yet uploaded:
    /// keep it on a disk that survives reboots.
    #[arg(long, global = true, value_name = "DIR", env = "HLFS_CACHE_DIR", default_value_os_t = hlfs_volume::default_cache_dir())]
    pub cache_dir: PathBuf,

    /// Most bytes the cache directory holds: the read cache, and room set
    /// aside for the journal of each volume open for writing (5 segments).
    #[arg(long, global = true, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,

    /// When a FLUSH returns, the data is in: `local`, the local journal
    /// (synced; segments upload in the background), or `remote`, the
    /// store (each FLUSH seals and uploads; for hosts whose local disk is
    /// not trusted).
    #[arg(long, global = true, value_enum, default_value = "local")]
    pub durability: DurabilityArg,

    /// Seconds a store request is retried (backoff with jitter) before it
    /// fails, and that a write or flush waits for a stalled store before it
    /// fails with an I/O error. Nothing flushed is lost either way.
    #[arg(long, global = true, value_name = "SECS", default_value = "30")]
    pub store_timeout: u64,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DurabilityArg {
    Local,
    Remote,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Durability {
        match d {
            DurabilityArg::Local => Durability::Local,
            DurabilityArg::Remote => Durability::Remote,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an empty thin volume.
    Create {
        volume: String,
        /// Logical size of the disk.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Block size: a power of two from 512 to 64K.
        #[arg(long, default_value = "4K", value_parser = parse_size)]
        block_size: u64,
        /// Target size of the log's segments.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        segment_size: u64,
    },
    /// Describe a volume: size, space used, snapshots.
    Info {
        volume: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy a raw disk image (FILE, or - for stdin) into a volume. All-zero
    /// blocks are not stored, so the volume stays thin.
    Import {
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
    },
    /// Copy a volume, or one of its snapshots (VOLUME@SNAPSHOT), to a raw
    /// image FILE (sparse where the volume has holes), or - for stdout.
    Export { volume: String, file: String },
    /// Grow a volume to a new size.
    Resize {
        volume: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Create, list, delete or roll back to snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Verify every record's checksum, every map page and every block;
    /// exits non-zero and says where if anything is damaged.
    Check { volume: String },
    /// Serve volumes and snapshots over NBD (to QEMU, nbd-client, libnbd,
    /// fio) until SIGINT or SIGTERM, then flush, seal and exit.
    Serve(crate::serve::ServeArgs),
    /// Benchmark the engine on the local backend.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot of the volume as it is now.
    Create { volume: String, name: String },
    /// List snapshots, oldest first.
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete { volume: String, name: String },
    /// Make the volume equal to a snapshot again. The current state is kept
    /// as an automatic snapshot, so nothing is lost.
    Rollback { volume: String, name: String },
}

pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size ({e}); use e.g. 512M, 10G, 1T"))
}

/// What the global options set for every command.
pub struct Settings {
    pub open: OpenOptions,
    pub store: StoreOptions,
}

impl Settings {
    fn from_cli(cli: &Cli) -> Settings {
        Settings {
            open: OpenOptions {
                map_budget: cli.map_budget,
                durability: cli.durability.into(),
                store_wait: Duration::from_secs(cli.store_timeout),
                ..OpenOptions::default()
            },
            store: StoreOptions {
                cache_dir: cli.cache_dir.clone(),
                cache_size: cli.cache_size,
                retry_budget: Duration::from_secs(cli.store_timeout),
            },
        }
    }

    pub fn backend(&self, volume: &str, create: bool) -> Result<Backend> {
        Ok(Backend::parse(volume, create, &self.store)?)
    }
}

/// Splits VOLUME@SNAPSHOT; a path that exists as given is never split.
pub fn split_snapshot(arg: &str) -> (&str, Option<&str>) {
    if Path::new(arg).exists() {
        return (arg, None);
    }
    match arg.rsplit_once('@') {
        Some((vol, snap)) if !snap.is_empty() && !snap.contains('/') => (vol, Some(snap)),
        _ => (arg, None),
    }
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let settings = Settings::from_cli(&cli);
    match cli.command {
        Command::Create {
            volume,
            size,
            block_size,
            segment_size,
        } => {
            let create = CreateOptions {
                size,
                block_size: u32::try_from(block_size).context("block size too large")?,
                segment_size,
            };
            Volume::create(&settings.backend(&volume, true)?, &create).await?;
            println!(
                "created {volume}: {} ({size} bytes), block size {block_size}",
                human(size)
            );
        }
        Command::Info { volume, json } => {
            let vol = Volume::open_read_only(
                settings.backend(&volume, false)?,
                &settings.open,
                View::Head,
            )
            .await?;
            let info = vol.info().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
            } else {
                print_info(&volume, &info);
            }
        }
        Command::Import {
            file,
            volume,
            create,
            block_size,
            segment_size,
        } => {
            import(&file, &volume, create, block_size, segment_size, &settings).await?;
        }
        Command::Export { volume, file } => export(&volume, &file, &settings).await?,
        Command::Resize { volume, size } => {
            let vol = open_writer(&volume, &settings).await?;
            let result = vol.resize(size).await;
            finish(vol, result).await?;
            println!("{volume} is now {} ({size} bytes)", human(size));
        }
        Command::Snapshot(cmd) => snapshot(cmd, &settings).await?,
        Command::Check { volume } => return check_cmd(&volume, &settings).await,
        Command::Serve(args) => crate::serve::run(args, &settings).await?,
        Command::Bench(mut args) => {
            args.map_budget = cli.map_budget;
            bench::run(args).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Closes a volume opened for writing whatever `result` is, reporting the
/// operation's error first.
async fn finish<T>(vol: Volume, result: hlfs_volume::Result<T>) -> Result<T> {
    let closed = vol.close().await;
    let value = result?;
    closed?;
    Ok(value)
}

async fn open_writer(volume: &str, settings: &Settings) -> Result<Volume> {
    Ok(Volume::open(settings.backend(volume, false)?, &settings.open).await?)
}

async fn snapshot(cmd: SnapshotCommand, settings: &Settings) -> Result<()> {
    match cmd {
        SnapshotCommand::Create { volume, name } => {
            let vol = open_writer(&volume, settings).await?;
            let result = vol.snapshot_create(&name).await;
            let snap = finish(vol, result).await?;
            println!("created snapshot {} of {volume}", snap.name);
        }
        SnapshotCommand::Delete { volume, name } => {
            let vol = open_writer(&volume, settings).await?;
            let result = vol.snapshot_delete(&name).await;
            finish(vol, result).await?;
            println!("deleted snapshot {name} of {volume}");
        }
        SnapshotCommand::Rollback { volume, name } => {
            let vol = open_writer(&volume, settings).await?;
            let result = vol.rollback(&name).await;
            let kept = finish(vol, result).await?;
            println!("rolled {volume} back to snapshot {name}; its previous state is kept as snapshot {kept}");
        }
        SnapshotCommand::List { volume, json } => {
            let vol = Volume::open_read_only(
                settings.backend(&volume, false)?,
                &settings.open,
                View::Head,
            )
            .await?;
            let snaps = vol.snapshots();
            if json {
                let list: Vec<_> = snaps
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name,
                            "created": utc(s.created_ms),
                            "created_ms": s.created_ms,
                            "automatic": s.automatic,
                            "lsn": s.lsn,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if snaps.is_empty() {
                println!("{volume} has no snapshots");
            } else {
                println!("{:<40} {:<24} KIND", "NAME", "CREATED");
                for s in snaps {
                    let kind = if s.automatic { "automatic" } else { "user" };
                    println!("{:<40} {:<24} {kind}", s.name, utc(s.created_ms));
                }
            }
        }
    }
    Ok(())
}

fn info_json(info: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "uuid": info.uuid,
        "size": info.size,
        "block_size": info.block_size,
        "segment_size": info.segment_size,
        "allocated_bytes": info.allocated_bytes,
        "stored_bytes": info.stored_bytes,
        "format_version": info.format_version,
        "snapshots": info.snapshots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        "created": utc(info.created_ms),
        "writer": info.writer,
    })
}

fn print_info(volume: &str, info: &VolumeInfo) {
    println!("volume:         {volume}");
    println!("uuid:           {}", info.uuid);
    println!("size:           {} ({} bytes)", human(info.size), info.size);
    println!("block size:     {}", info.block_size);
    println!("segment size:   {}", human(info.segment_size));
    println!(
        "allocated:      {} ({} bytes)",
        human(info.allocated_bytes),
        info.allocated_bytes
    );
    println!(
        "stored:         {} ({} bytes)",
        human(info.stored_bytes),
        info.stored_bytes
    );
    println!("format version: {}", info.format_version);
    println!("created:        {}", utc(info.created_ms));
    println!(
        "writer:         {}",
        info.writer.as_deref().unwrap_or("none")
    );
    let names: Vec<&str> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
    println!(
        "snapshots:      {}",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    );
}

async fn check_cmd(volume: &str, settings: &Settings) -> Result<ExitCode> {
    let report = check(settings.backend(volume, false)?).await?;
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for p in &report.problems {
        println!("damaged: {p}");
    }
    println!(
        "checked {} manifests, {} segments, {} records, {} map pages, {} blocks",
        report.manifests, report.segments, report.records, report.map_pages, report.blocks
    );
    if report.is_ok() {
        println!("{volume}: no damage found");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "hlfs: error: {volume}: {} problems found",
            report.problems.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

const CHUNK: usize = 4 << 20;

fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .expect("valid template"),
        ),
    };
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
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

async fn import(
    file: &str,
    volume: &str,
    create: bool,
    block_size: u64,
    segment_size: u64,
    settings: &Settings,
) -> Result<()> {
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
    if create {
        let create = CreateOptions {
            size: known_size.unwrap_or(0),
            block_size: u32::try_from(block_size).context("block size too large")?,
            segment_size,
        };
        Volume::create(&settings.backend(volume, true)?, &create).await?;
    }
    let vol = open_writer(volume, settings).await?;
    let result = import_into(&vol, &mut *input, known_size, create, file).await;
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

async fn export(arg: &str, file: &str, settings: &Settings) -> Result<()> {
    let (volume, snap) = split_snapshot(arg);
    let view = match snap {
        Some(s) => View::Snapshot(s.to_string()),
        None => View::Head,
    };
    let vol =
        Volume::open_read_only(settings.backend(volume, false)?, &settings.open, view).await?;
    let size = vol.size();
    let start = Instant::now();
    let bar = progress(Some(size), "exporting");
    if file == "-" {
        let mut out = std::io::stdout().lock();
        let mut buf = vec![0u8; CHUNK];
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
        let mut buf = vec![0u8; CHUNK];
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

/// 1536 -> "1.5 KiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Milliseconds since the epoch as "YYYY-MM-DD HH:MM:SS UTC".
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            utc(1_795_219_200_000 + 3_723_000),
            "2026-11-21 01:02:03 UTC"
        );
    }

    #[test]
    fn sizes_parse_binary() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert!(parse_size("lots").is_err());
    }
}
