//! `hlfs bench`: engine benchmarks on the local backend.
//!
//! Three modes, each on a scratch volume made for the run:
//!
//! - `engine`: throughput and latency of sequential and random I/O;
//! - `scatter`: many small writes spread over a huge thin volume, to show the
//!   block map stays inside its memory budget, then reopen and verify;
//! - `recovery`: write, flush, drop the volume without closing it (a crash as
//!   far as the log is concerned), and time the recovering open.
//!
//! Everything runs in this process through the `hlfs-volume` API; no NBD.

mod engine;
mod recovery;
mod scatter;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hlfs_volume::{Backend, CreateOptions, OpenOptions, Volume};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::args::{human, parse_size, Settings};
use engine::{engine, EngineReport};
use recovery::{recovery, RecoveryReport};
use scatter::{scatter, ScatterReport};

/// Block size of every bench volume.
const BS: u64 = 4096;
/// Size of one sequential I/O.
const SEQ_IO: u64 = 1 << 20;
const MIB: f64 = (1u64 << 20) as f64;
const GIB: u64 = 1 << 30;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Sequential and random I/O throughput and latency (default).
    Engine,
    /// N random 4 KiB writes over a huge thin volume; reopen; verify all.
    Scatter,
    /// Write G GiB, flush, drop without close; time the recovering open.
    Recovery,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Engine => "engine",
            Mode::Scatter => "scatter",
            Mode::Recovery => "recovery",
        }
    }
}

const AFTER_HELP: &str = "\
Modes:
  engine    Creates a volume of --size (default 4G, block size 4 KiB) and runs
            five phases, each stopping after --seconds or after covering the
            volume once, whichever comes first:
              seq-write    1 MiB sequential writes (QD 1), flush at the end
              rand-write   4 KiB random writes at QD --qd, flush at the end
              rand-fsync   4 KiB random writes, each followed by a flush,
                           8 tasks (like fio fsync=1 numjobs=8)
              rand-read    4 KiB random reads at QD --qd over the range
                           seq-write covered
              seq-read     1 MiB sequential reads (QD 1) over that range
            Reports ops/s, MiB/s and p50/p99 latency of each phase.
  scatter   Creates a thin volume of --size (default 16T), writes --writes
            4 KiB blocks at pseudo-random offsets over all of it at QD --qd
            with the map limited to --map-budget, closes, times the reopen,
            reads every block back and verifies it. Fails on any mismatch.
  recovery  Creates a volume of max(--size, 2 x --gib GiB), writes --gib GiB of
            random 4 KiB blocks at QD --qd, flushes, drops the volume without
            closing it, times the open that recovers it, and checks 1000
            written blocks (and 100 never-written ones) read back correctly.

Every mode prints peak resident memory (VmHWM). The scratch volume is a new
directory inside --dir (default: the system temp directory) and is removed at
the end unless --keep. Sizes take binary suffixes: 512M, 4G, 16T.";

/// Measure the engine on a scratch local volume: I/O throughput and latency,
/// map memory on a huge scattered volume, or crash-recovery time.
#[derive(clap::Args, Debug)]
#[command(after_long_help = AFTER_HELP)]
pub struct BenchArgs {
    /// What to measure (see --help for each mode).
    #[arg(long, value_enum, default_value_t = Mode::Engine)]
    mode: Mode,

    /// Directory in which to create the scratch volume (a new subdirectory
    /// named hlfs-bench-MODE-PID-TIME). Default: the system temp directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Keep the scratch volume instead of removing it at the end.
    #[arg(long)]
    keep: bool,

    /// Volume size, e.g. 4G, 16T [default: engine 4G, scatter 16T,
    /// recovery 2 x --gib GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,

    /// engine: time limit of each phase, in seconds.
    #[arg(long, value_name = "N", default_value_t = 15)]
    seconds: u64,

    /// Queue depth: concurrent tasks of the random phases, and of the write
    /// and verify passes of scatter and recovery.
    #[arg(long, value_name = "N", default_value_t = 32)]
    qd: usize,

    /// scatter: number of 4 KiB writes.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    writes: u64,

    /// Set from the global --map-budget.
    #[arg(skip)]
    map_budget: u64,

    /// recovery: GiB of random 4 KiB writes before the crash.
    #[arg(long, value_name = "G", default_value_t = 10)]
    gib: u64,

    /// Seed of the pseudo-random offsets and data.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Print one JSON object with every number instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(mut args: BenchArgs, settings: &Settings) -> Result<()> {
    args.map_budget = settings.open.map_budget;
    if args.qd == 0 {
        bail!("--qd must be at least 1");
    }
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let scratch = Scratch::new(&args)?;
    eprintln!(
        "bench {}: scratch volume in {}{}",
        args.mode.name(),
        scratch.path.display(),
        if args.keep { " (kept)" } else { "" }
    );
    let report = match args.mode {
        Mode::Engine => engine(&args, &scratch.path).await?,
        Mode::Scatter => scatter(&args, &scratch.path).await?,
        Mode::Recovery => recovery(&args, &scratch.path).await?,
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report.table());
    }
    if let Some(failure) = report.failure() {
        bail!("{failure}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Scratch directory, memory, small helpers

/// The scratch volume's directory; removed on drop unless --keep.
struct Scratch {
    path: PathBuf,
    remove: bool,
}

impl Scratch {
    fn new(args: &BenchArgs) -> Result<Scratch> {
        let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let path = parent.join(format!(
            "hlfs-bench-{}-{}-{stamp}",
            args.mode.name(),
            std::process::id()
        ));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch {
            path,
            remove: !args.keep,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("bench: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A field of /proc/self/status in bytes (e.g. VmHWM, VmRSS), if available.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Peak resident memory. The kernel updates VmHWM lazily, so it can lag the
/// current VmRSS a little; take whichever is larger.
fn peak_rss() -> Option<u64> {
    match (proc_status_bytes("VmHWM"), rss()) {
        (Some(h), Some(r)) => Some(h.max(r)),
        (h, r) => h.or(r),
    }
}

fn rss() -> Option<u64> {
    proc_status_bytes("VmRSS")
}

/// Total size of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn fmt_opt_bytes(b: Option<u64>) -> String {
    b.map(human).unwrap_or_else(|| "n/a".into())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------
// Pseudo-random numbers and verifiable block contents

/// xorshift64*: small, fast, good enough for offsets and filler bytes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero, and unrelated seeds give unrelated streams.
        Rng(mix(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        below(self.next(), n)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// splitmix64's finalizer: a bijective hash of a 64-bit value.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a uniform 64-bit value to `0..n` (Lemire's multiply-shift).
fn below(x: u64, n: u64) -> u64 {
    ((x as u128 * n as u128) >> 64) as u64
}

/// The content a verifiable block must hold: `a` and `b` in the first 16
/// bytes, then bytes derived from both.
fn fill_block(buf: &mut [u8], a: u64, b: u64) {
    buf[..8].copy_from_slice(&a.to_le_bytes());
    buf[8..16].copy_from_slice(&b.to_le_bytes());
    Rng::new(a ^ mix(b)).fill(&mut buf[16..]);
}

// ---------------------------------------------------------------------------
// Latency statistics and progress

#[derive(Serialize, Clone, Debug, Default)]
struct Phase {
    name: String,
    /// Operations completed.
    ops: u64,
    /// Bytes moved.
    bytes: u64,
    /// Wall time, including the flush that ends a write phase.
    seconds: f64,
    ops_per_sec: f64,
    mib_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// The closing flush of a write phase, in ms (included in `seconds`).
    final_flush_ms: Option<f64>,
    /// Concurrent tasks.
    qd: usize,
}

impl Phase {
    fn new(
        name: &str,
        qd: usize,
        mut lat_ns: Vec<u64>,
        io_size: u64,
        elapsed: Duration,
        flush: Option<Duration>,
    ) -> Phase {
        lat_ns.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat_ns.is_empty() {
                return 0.0;
            }
            let i = ((lat_ns.len() as f64 * p).ceil() as usize).clamp(1, lat_ns.len()) - 1;
            lat_ns[i] as f64 / 1000.0
        };
        let ops = lat_ns.len() as u64;
        let s = secs(elapsed).max(1e-9);
        Phase {
            name: name.to_string(),
            ops,
            bytes: ops * io_size,
            seconds: secs(elapsed),
            ops_per_sec: ops as f64 / s,
            mib_per_sec: (ops * io_size) as f64 / MIB / s,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: lat_ns.last().map(|&v| v as f64 / 1000.0).unwrap_or(0.0),
            final_flush_ms: flush.map(|d| secs(d) * 1000.0),
            qd,
        }
    }

    fn header() -> String {
        format!(
            "  {:<12} {:>3} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>10}\n",
            "phase", "qd", "ops", "secs", "ops/s", "MiB/s", "p50 µs", "p99 µs", "max µs"
        )
    }

    fn row(&self) -> String {
        format!(
            "  {:<12} {:>3} {:>9} {:>7.2} {:>10.0} {:>9.1} {:>9.0} {:>9.0} {:>10.0}\n",
            self.name,
            self.qd,
            self.ops,
            self.seconds,
            self.ops_per_sec,
            self.mib_per_sec,
            self.p50_us,
            self.p99_us,
            self.max_us
        )
    }
}

/// A progress bar on stderr (drawn only on a terminal) fed from a counter
/// the workers bump, so the hot path touches one atomic.
struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(label: &str, total: u64) -> Progress {
        eprintln!("bench: {label} ...");
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pb = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {per_sec:>12} elapsed {elapsed} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(label.to_string());
        let task = {
            let done = done.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    pb.set_position(done.load(Ordering::Relaxed));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                pb.finish_and_clear();
            })
        };
        Progress { done, stop, task }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

// ---------------------------------------------------------------------------
// Volume set-up

fn create_options(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        block_size: BS as u32,
        ..CreateOptions::default()
    }
}

async fn create_and_open(dir: &Path, size: u64, map_budget: u64) -> Result<Volume> {
    let backend = Backend::local(dir, true)?;
    Volume::create(&backend, &create_options(size))
        .await
        .with_context(|| format!("creating a {} volume in {}", human(size), dir.display()))?;
    open(dir, map_budget).await
}

async fn open(dir: &Path, map_budget: u64) -> Result<Volume> {
    let backend = Backend::local(dir, false)?;
    let vol = Volume::open(
        backend,
        &OpenOptions {
            map_budget,
            ..OpenOptions::default()
        },
    )
    .await
    .with_context(|| format!("opening the volume in {}", dir.display()))?;
    Ok(vol)
}

/// Rounds a size down to whole blocks and checks it holds at least `min`.
fn block_size_of(size: u64, min: u64, what: &str) -> Result<u64> {
    let size = size / BS * BS;
    if size < min {
        bail!(
            "{what}: volume size must be at least {} (got {})",
            human(min),
            human(size)
        );
    }
    Ok(size)
}

// ---------------------------------------------------------------------------
// Mode reports

#[derive(Serialize)]
#[serde(untagged)]
enum Report {
    Engine(EngineReport),
    Scatter(ScatterReport),
    Recovery(RecoveryReport),
}

impl Report {
    fn table(&self) -> String {
        match self {
            Report::Engine(r) => r.table(),
            Report::Scatter(r) => r.table(),
            Report::Recovery(r) => r.table(),
        }
    }

    fn failure(&self) -> Option<String> {
        match self {
            Report::Engine(_) => None,
            Report::Scatter(r) => r.failure(),
            Report::Recovery(r) => r.failure(),
        }
    }
}

/// Waits for every worker and merges their latencies; the first error wins.
async fn join_latencies(
    handles: Vec<tokio::task::JoinHandle<Result<Vec<u64>>>>,
) -> Result<Vec<u64>> {
    let mut lat = Vec::new();
    let mut err = None;
    for h in handles {
        match h.await.context("bench task panicked")? {
            Ok(l) => lat.extend(l),
            Err(e) => err = err.or(Some(e)),
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(lat),
    }
}

fn describe_mismatch(off: u64, got: &[u8], want: &[u8]) -> String {
    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let head = |b: &[u8]| {
        (
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        )
    };
    let zero = got.iter().all(|&b| b == 0);
    format!(
        "offset {off}: first differing byte {at}; got {}, want header {:?}",
        if zero {
            "all zeros".to_string()
        } else {
            format!("header {:?}", head(got))
        },
        head(want)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(7);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
    }

    #[test]
    fn block_content_depends_on_both_keys() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_block(&mut a, 1, 2);
        fill_block(&mut b, 1, 2);
        assert_eq!(a, b);
        fill_block(&mut b, 1, 3);
        assert_ne!(a[16..], b[16..]);
        fill_block(&mut b, 2, 2);
        assert_ne!(a[16..], b[16..]);
    }

    #[test]
    fn status_fields_parse() {
        if Path::new("/proc/self/status").exists() {
            assert!(peak_rss().unwrap() > 0);
            assert!(rss().unwrap() > 0);
        }
    }
}
