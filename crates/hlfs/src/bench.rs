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

use crate::cli::{human, parse_size};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hlfs_volume::{Backend, CreateOptions, OpenOptions, Volume};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

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
    pub map_budget: u64,

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

pub async fn run(args: BenchArgs) -> Result<()> {
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
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
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
            Report::Scatter(r) => (r.mismatches > 0).then(|| {
                format!(
                    "scatter: {} of {} blocks read back wrong (first: {})",
                    r.mismatches,
                    r.writes,
                    r.first_mismatches.join("; ")
                )
            }),
            Report::Recovery(r) => (r.mismatches > 0).then(|| {
                format!(
                    "recovery: {} of {} checked blocks read back wrong after recovery (first: {})",
                    r.mismatches,
                    r.checked_written + r.checked_unwritten,
                    r.first_mismatches.join("; ")
                )
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// engine

#[derive(Serialize)]
struct EngineReport {
    mode: &'static str,
    dir: String,
    size: u64,
    block_size: u64,
    map_budget: u64,
    seconds_per_phase: u64,
    phases: Vec<Phase>,
    /// Range the read phases cover (what seq-write wrote).
    read_range_bytes: u64,
    allocated_bytes: u64,
    /// Bytes on disk (segments, journal, manifests) before close.
    on_disk_bytes: u64,
    map_pages_cached: usize,
    map_pages_budget: usize,
    close_ms: f64,
    peak_rss_bytes: Option<u64>,
}

impl EngineReport {
    fn table(&self) -> String {
        let mut s = format!(
            "hlfs bench engine: {} volume, 4 KiB blocks, map budget {}, phases of at most {} s, in {}\n",
            human(self.size),
            human(self.map_budget),
            self.seconds_per_phase,
            self.dir
        );
        s += &Phase::header();
        for p in &self.phases {
            s += &p.row();
        }
        s += &format!(
            "  reads over   {} written by seq-write\n",
            human(self.read_range_bytes)
        );
        s += &format!(
            "  allocated    {}, on disk {} (no GC ran)\n",
            human(self.allocated_bytes),
            human(self.on_disk_bytes)
        );
        s += &format!(
            "  map pages    {} cached of {} budget\n",
            self.map_pages_cached, self.map_pages_budget
        );
        s += &format!("  close        {:.1} ms\n", self.close_ms);
        s += &format!("  peak RSS     {}\n", fmt_opt_bytes(self.peak_rss_bytes));
        s
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RandKind {
    Write,
    WriteFlush,
    Read,
}

/// One random-I/O phase: `tasks` workers doing 4 KiB I/O on blocks
/// `0..range_blocks` until `deadline` passes or `limit` ops were issued.
struct RandSpec {
    name: &'static str,
    kind: RandKind,
    tasks: usize,
    range_blocks: u64,
    limit: u64,
    deadline: Duration,
    seed: u64,
}

async fn random_phase(vol: &Volume, spec: RandSpec) -> Result<Phase> {
    let RandSpec {
        name,
        kind,
        tasks,
        range_blocks,
        limit,
        deadline,
        seed,
    } = spec;
    let progress = Progress::start(name, limit);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let vol = vol.clone();
        let issued = issued.clone();
        let done = progress.done.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ mix(t as u64 + 1));
            let mut buf = vec![0u8; BS as usize];
            rng.fill(&mut buf);
            let mut lat = Vec::with_capacity(1 << 16);
            loop {
                if start.elapsed() >= deadline {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                let off = rng.below(range_blocks) * BS;
                let t0 = Instant::now();
                match kind {
                    RandKind::Write => {
                        buf[..8].copy_from_slice(&n.to_le_bytes());
                        vol.write(off, &buf).await?;
                    }
                    RandKind::WriteFlush => {
                        buf[..8].copy_from_slice(&n.to_le_bytes());
                        vol.write(off, &buf).await?;
                        vol.flush().await?;
                    }
                    RandKind::Read => vol.read_into(off, &mut buf).await?,
                }
                lat.push(t0.elapsed().as_nanos() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    let mut err = None;
    for h in handles {
        match h.await.context("bench task panicked")? {
            Ok(l) => lat.extend(l),
            Err(e) => err = err.or(Some(e)),
        }
    }
    progress.finish().await;
    if let Some(e) = err {
        return Err(e.context(format!("phase {name}")));
    }
    let flush = if kind == RandKind::Read {
        None
    } else {
        let f0 = Instant::now();
        vol.flush().await?;
        Some(f0.elapsed())
    };
    Ok(Phase::new(name, tasks, lat, BS, start.elapsed(), flush))
}

/// 1 MiB sequential I/O at QD 1 over `0..range`.
async fn seq_phase(
    vol: &Volume,
    name: &str,
    write: bool,
    range: u64,
    deadline: Duration,
    seed: u64,
) -> Result<Phase> {
    let progress = Progress::start(name, range.div_ceil(SEQ_IO));
    let mut buf = vec![0u8; SEQ_IO as usize];
    Rng::new(seed).fill(&mut buf);
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut off = 0;
    while off < range && start.elapsed() < deadline {
        let len = SEQ_IO.min(range - off) as usize;
        let t0 = Instant::now();
        if write {
            buf[..8].copy_from_slice(&off.to_le_bytes());
            vol.write(off, &buf[..len]).await?;
        } else {
            vol.read_into(off, &mut buf[..len]).await?;
        }
        lat.push(t0.elapsed().as_nanos() as u64);
        progress.done.fetch_add(1, Ordering::Relaxed);
        off += len as u64;
    }
    progress.finish().await;
    let flush = if write {
        let f0 = Instant::now();
        vol.flush().await?;
        Some(f0.elapsed())
    } else {
        None
    };
    let mut p = Phase::new(name, 1, lat, SEQ_IO, start.elapsed(), flush);
    // The last I/O may be short.
    p.bytes = off;
    p.mib_per_sec = off as f64 / MIB / p.seconds.max(1e-9);
    Ok(p)
}

async fn engine(args: &BenchArgs, dir: &Path) -> Result<Report> {
    let size = block_size_of(args.size.unwrap_or(4 * GIB), SEQ_IO, "engine")?;
    let blocks = size / BS;
    let deadline = Duration::from_secs(args.seconds);
    let vol = create_and_open(dir, size, args.map_budget).await?;
    let mut phases = Vec::new();

    let p = seq_phase(&vol, "seq-write", true, size, deadline, args.seed).await?;
    let written = p.bytes;
    phases.push(p);
    eprintln!("{}", phases.last().unwrap().row().trim_end());

    let p = random_phase(
        &vol,
        RandSpec {
            name: "rand-write",
            kind: RandKind::Write,
            tasks: args.qd,
            range_blocks: blocks,
            limit: blocks,
            deadline,
            seed: args.seed ^ 2,
        },
    )
    .await?;
    phases.push(p);
    eprintln!("{}", phases.last().unwrap().row().trim_end());

    let p = random_phase(
        &vol,
        RandSpec {
            name: "rand-fsync",
            kind: RandKind::WriteFlush,
            tasks: 8,
            range_blocks: blocks,
            limit: blocks,
            deadline,
            seed: args.seed ^ 3,
        },
    )
    .await?;
    phases.push(p);
    eprintln!("{}", phases.last().unwrap().row().trim_end());

    let read_blocks = (written / BS).max(1);
    let p = random_phase(
        &vol,
        RandSpec {
            name: "rand-read",
            kind: RandKind::Read,
            tasks: args.qd,
            range_blocks: read_blocks,
            limit: read_blocks,
            deadline,
            seed: args.seed ^ 4,
        },
    )
    .await?;
    phases.push(p);
    eprintln!("{}", phases.last().unwrap().row().trim_end());

    let p = seq_phase(&vol, "seq-read", false, written, deadline, args.seed).await?;
    phases.push(p);
    eprintln!("{}", phases.last().unwrap().row().trim_end());

    let (cached, budget) = vol.map_pages();
    let allocated = vol.allocated_bytes();
    let on_disk = du(dir);
    eprintln!("bench: closing ...");
    let c0 = Instant::now();
    vol.close().await?;
    let close = c0.elapsed();
    drop(vol);

    Ok(Report::Engine(EngineReport {
        mode: "engine",
        dir: dir.display().to_string(),
        size,
        block_size: BS,
        map_budget: args.map_budget,
        seconds_per_phase: args.seconds,
        phases,
        read_range_bytes: written,
        allocated_bytes: allocated,
        on_disk_bytes: on_disk,
        map_pages_cached: cached,
        map_pages_budget: budget,
        close_ms: secs(close) * 1000.0,
        peak_rss_bytes: peak_rss(),
    }))
}

// ---------------------------------------------------------------------------
// scatter

#[derive(Serialize)]
struct ScatterReport {
    mode: &'static str,
    dir: String,
    size: u64,
    block_size: u64,
    map_budget: u64,
    qd: usize,
    writes: u64,
    write_phase: Phase,
    close_ms: f64,
    reopen_ms: f64,
    verify_phase: Phase,
    mismatches: u64,
    first_mismatches: Vec<String>,
    allocated_bytes: u64,
    on_disk_bytes: u64,
    map_pages_cached_after_writes: usize,
    map_pages_cached_after_verify: usize,
    map_pages_budget: usize,
    rss_after_writes_bytes: Option<u64>,
    rss_after_verify_bytes: Option<u64>,
    peak_rss_bytes: Option<u64>,
}

impl ScatterReport {
    fn table(&self) -> String {
        let mut s = format!(
            "hlfs bench scatter: {} random 4 KiB writes over a {} thin volume, QD {}, map budget {}, in {}\n",
            self.writes,
            human(self.size),
            self.qd,
            human(self.map_budget),
            self.dir
        );
        s += &Phase::header();
        s += &self.write_phase.row();
        s += &self.verify_phase.row();
        s += &format!("  close        {:.1} ms\n", self.close_ms);
        s += &format!("  reopen       {:.1} ms\n", self.reopen_ms);
        s += &format!(
            "  verify       {} blocks in {:.2} s, {} mismatches\n",
            self.verify_phase.ops, self.verify_phase.seconds, self.mismatches
        );
        s += &format!(
            "  allocated    {}, on disk {}\n",
            human(self.allocated_bytes),
            human(self.on_disk_bytes)
        );
        s += &format!(
            "  map pages    {} after writes, {} after verify, budget {}\n",
            self.map_pages_cached_after_writes,
            self.map_pages_cached_after_verify,
            self.map_pages_budget
        );
        s += &format!(
            "  RSS          {} after writes, {} after verify, peak {}\n",
            fmt_opt_bytes(self.rss_after_writes_bytes),
            fmt_opt_bytes(self.rss_after_verify_bytes),
            fmt_opt_bytes(self.peak_rss_bytes)
        );
        s
    }
}

/// The block the `i`-th scatter write goes to.
fn scatter_block(seed: u64, i: u64, blocks: u64) -> u64 {
    below(mix(mix(seed) ^ i), blocks)
}

async fn scatter(args: &BenchArgs, dir: &Path) -> Result<Report> {
    let size = block_size_of(args.size.unwrap_or(16 << 40), BS * 64, "scatter")?;
    let blocks = size / BS;
    let n = args.writes;
    if n == 0 {
        bail!("--writes must be at least 1");
    }
    let seed = args.seed;
    let vol = create_and_open(dir, size, args.map_budget).await?;

    // Writes: the i-th goes to scatter_block(i) and holds that offset.
    let progress = Progress::start("write", n);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.qd {
        let vol = vol.clone();
        let issued = issued.clone();
        let done = progress.done.clone();
        handles.push(tokio::spawn(async move {
            let mut buf = vec![0u8; BS as usize];
            let mut lat = Vec::new();
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let off = scatter_block(seed, i, blocks) * BS;
                fill_block(&mut buf, off, seed);
                let t0 = Instant::now();
                vol.write(off, &buf).await?;
                lat.push(t0.elapsed().as_nanos() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    let lat = join_latencies(handles).await;
    progress.finish().await;
    let lat = lat.context("scatter writes")?;
    let f0 = Instant::now();
    vol.flush().await?;
    let write_phase = Phase::new(
        "write",
        args.qd,
        lat,
        BS,
        start.elapsed(),
        Some(f0.elapsed()),
    );
    eprintln!("{}", write_phase.row().trim_end());
    let (cached_w, budget) = vol.map_pages();
    let rss_w = rss();
    let allocated = vol.allocated_bytes();

    eprintln!("bench: closing ...");
    let c0 = Instant::now();
    vol.close().await?;
    let close = c0.elapsed();
    drop(vol);
    let on_disk = du(dir);

    eprintln!("bench: reopening ...");
    let o0 = Instant::now();
    let vol = open(dir, args.map_budget).await?;
    let reopen = o0.elapsed();

    // Verify, in the order written.
    let progress = Progress::start("verify", n);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.qd {
        let vol = vol.clone();
        let issued = issued.clone();
        let done = progress.done.clone();
        handles.push(tokio::spawn(async move {
            let mut buf = vec![0u8; BS as usize];
            let mut want = vec![0u8; BS as usize];
            let mut lat = Vec::new();
            let mut bad: Vec<String> = Vec::new();
            let mut bad_count = 0u64;
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let off = scatter_block(seed, i, blocks) * BS;
                let t0 = Instant::now();
                let r = vol.read_into(off, &mut buf).await;
                lat.push(t0.elapsed().as_nanos() as u64);
                done.fetch_add(1, Ordering::Relaxed);
                fill_block(&mut want, off, seed);
                let problem = match r {
                    Err(e) => Some(format!("offset {off}: read failed: {e}")),
                    Ok(()) if buf != want => Some(describe_mismatch(off, &buf, &want)),
                    Ok(()) => None,
                };
                if let Some(p) = problem {
                    bad_count += 1;
                    if bad.len() < 5 {
                        bad.push(p);
                    }
                }
            }
            anyhow::Ok((lat, bad_count, bad))
        }));
    }
    let mut lat = Vec::new();
    let mut mismatches = 0;
    let mut first = Vec::new();
    let mut err = None;
    for h in handles {
        match h.await.context("bench task panicked")? {
            Ok((l, c, b)) => {
                lat.extend(l);
                mismatches += c;
                first.extend(b);
            }
            Err(e) => err = err.or(Some(e)),
        }
    }
    progress.finish().await;
    if let Some(e) = err {
        return Err(e.context("scatter verify"));
    }
    first.truncate(5);
    let verify_phase = Phase::new("verify", args.qd, lat, BS, start.elapsed(), None);
    eprintln!("{}", verify_phase.row().trim_end());
    let (cached_v, _) = vol.map_pages();
    let rss_v = rss();
    vol.close().await?;
    drop(vol);

    Ok(Report::Scatter(ScatterReport {
        mode: "scatter",
        dir: dir.display().to_string(),
        size,
        block_size: BS,
        map_budget: args.map_budget,
        qd: args.qd,
        writes: n,
        write_phase,
        close_ms: secs(close) * 1000.0,
        reopen_ms: secs(reopen) * 1000.0,
        verify_phase,
        mismatches,
        first_mismatches: first,
        allocated_bytes: allocated,
        on_disk_bytes: on_disk,
        map_pages_cached_after_writes: cached_w,
        map_pages_cached_after_verify: cached_v,
        map_pages_budget: budget,
        rss_after_writes_bytes: rss_w,
        rss_after_verify_bytes: rss_v,
        peak_rss_bytes: peak_rss(),
    }))
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

// ---------------------------------------------------------------------------
// recovery

#[derive(Serialize)]
struct RecoveryReport {
    mode: &'static str,
    dir: String,
    size: u64,
    block_size: u64,
    map_budget: u64,
    qd: usize,
    written_bytes: u64,
    distinct_blocks: u64,
    write_phase: Phase,
    /// Journal bytes left for recovery to replay.
    journal_bytes_at_crash: u64,
    on_disk_bytes_at_crash: u64,
    /// The open that replays the log.
    recovery_open_ms: f64,
    checked_written: u64,
    checked_unwritten: u64,
    check_ms: f64,
    mismatches: u64,
    first_mismatches: Vec<String>,
    close_ms: f64,
    map_pages_cached: usize,
    map_pages_budget: usize,
    /// Includes the bench's own block→sequence table.
    peak_rss_bytes: Option<u64>,
}

impl RecoveryReport {
    fn table(&self) -> String {
        let mut s = format!(
            "hlfs bench recovery: {} of random 4 KiB writes on a {} volume, QD {}, map budget {}, in {}\n",
            human(self.written_bytes),
            human(self.size),
            self.qd,
            human(self.map_budget),
            self.dir
        );
        s += &Phase::header();
        s += &self.write_phase.row();
        s += &format!(
            "  at crash     {} distinct blocks; {} in the journal, {} on disk\n",
            self.distinct_blocks,
            human(self.journal_bytes_at_crash),
            human(self.on_disk_bytes_at_crash)
        );
        s += &format!("  recovery     open took {:.1} ms\n", self.recovery_open_ms);
        s += &format!(
            "  spot check   {} written + {} never-written blocks in {:.1} ms, {} mismatches\n",
            self.checked_written, self.checked_unwritten, self.check_ms, self.mismatches
        );
        s += &format!(
            "  map pages    {} cached of {} budget\n",
            self.map_pages_cached, self.map_pages_budget
        );
        s += &format!("  close        {:.1} ms\n", self.close_ms);
        s += &format!(
            "  peak RSS     {} (includes the bench's own block table)\n",
            fmt_opt_bytes(self.peak_rss_bytes)
        );
        s
    }
}

async fn recovery(args: &BenchArgs, dir: &Path) -> Result<Report> {
    if args.gib == 0 {
        bail!("--gib must be at least 1");
    }
    let size = block_size_of(
        args.size.unwrap_or(0).max(2 * args.gib * GIB),
        BS * args.qd as u64,
        "recovery",
    )?;
    let blocks = size / BS;
    let n = args.gib * GIB / BS;
    let qd = args.qd as u64;
    let seed = args.seed;
    let vol = create_and_open(dir, size, args.map_budget).await?;

    // Task t writes only blocks ≡ t (mod qd), one at a time, so the last
    // write to each block is well defined; write number i holds (block, i).
    let progress = Progress::start("write", n);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..qd {
        let vol = vol.clone();
        let issued = issued.clone();
        let done = progress.done.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ mix(t + 100));
            let mut buf = vec![0u8; BS as usize];
            let mut lat = Vec::new();
            let mut last: HashMap<u64, u64> = HashMap::new();
            let per_task = blocks / qd;
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let block = t + qd * rng.below(per_task);
                fill_block(&mut buf, block, i);
                let t0 = Instant::now();
                vol.write(block * BS, &buf).await?;
                lat.push(t0.elapsed().as_nanos() as u64);
                last.insert(block, i);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok((lat, last))
        }));
    }
    let mut lat = Vec::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut err = None;
    for h in handles {
        match h.await.context("bench task panicked")? {
            Ok((l, m)) => {
                lat.extend(l);
                last.extend(m);
            }
            Err(e) => err = err.or(Some(e)),
        }
    }
    progress.finish().await;
    if let Some(e) = err {
        return Err(e.context("recovery writes"));
    }
    let f0 = Instant::now();
    vol.flush().await?;
    let write_phase = Phase::new(
        "write",
        args.qd,
        lat,
        BS,
        start.elapsed(),
        Some(f0.elapsed()),
    );
    eprintln!("{}", write_phase.row().trim_end());

    // The crash: every handle is gone without close; the journal stays.
    eprintln!("bench: dropping the volume without close ...");
    drop(vol);
    let journal_bytes = du(&dir.join(hlfs_volume::LOCAL_JOURNAL_DIR));
    let on_disk = du(dir);

    eprintln!("bench: reopening (recovery) ...");
    let o0 = Instant::now();
    let vol = open(dir, args.map_budget).await?;
    let recovery_open = o0.elapsed();

    // Spot checks: 1000 written blocks, 100 never-written ones.
    eprintln!("bench: spot-checking ...");
    let keys: Vec<u64> = last.keys().copied().collect();
    let mut rng = Rng::new(seed ^ 0xc4ec);
    let mut buf = vec![0u8; BS as usize];
    let mut want = vec![0u8; BS as usize];
    let mut mismatches = 0u64;
    let mut first = Vec::new();
    let mut checked_written = 0u64;
    let mut checked_unwritten = 0u64;
    let c0 = Instant::now();
    let mut note = |problem: String, mismatches: &mut u64| {
        *mismatches += 1;
        if first.len() < 5 {
            first.push(problem);
        }
    };
    for _ in 0..1000.min(keys.len()) {
        let block = keys[rng.below(keys.len() as u64) as usize];
        let seq = last[&block];
        fill_block(&mut want, block, seq);
        checked_written += 1;
        match vol.read_into(block * BS, &mut buf).await {
            Err(e) => note(format!("block {block}: read failed: {e}"), &mut mismatches),
            Ok(()) if buf != want => {
                note(describe_mismatch(block * BS, &buf, &want), &mut mismatches)
            }
            Ok(()) => {}
        }
    }
    want.fill(0);
    let mut tries = 0;
    while checked_unwritten < 100 && tries < 10_000 {
        tries += 1;
        let block = rng.below(blocks);
        if last.contains_key(&block) {
            continue;
        }
        checked_unwritten += 1;
        match vol.read_into(block * BS, &mut buf).await {
            Err(e) => note(format!("block {block}: read failed: {e}"), &mut mismatches),
            Ok(()) if buf != want => note(
                format!("never-written block {block} does not read as zeros"),
                &mut mismatches,
            ),
            Ok(()) => {}
        }
    }
    let check = c0.elapsed();
    let (cached, budget) = vol.map_pages();
    let distinct = last.len() as u64;
    drop(keys);
    drop(last);
    let cl0 = Instant::now();
    vol.close().await?;
    let close = cl0.elapsed();
    drop(vol);

    Ok(Report::Recovery(RecoveryReport {
        mode: "recovery",
        dir: dir.display().to_string(),
        size,
        block_size: BS,
        map_budget: args.map_budget,
        qd: args.qd,
        written_bytes: n * BS,
        distinct_blocks: distinct,
        write_phase,
        journal_bytes_at_crash: journal_bytes,
        on_disk_bytes_at_crash: on_disk,
        recovery_open_ms: secs(recovery_open) * 1000.0,
        checked_written,
        checked_unwritten,
        check_ms: secs(check) * 1000.0,
        mismatches,
        first_mismatches: first,
        close_ms: secs(close) * 1000.0,
        map_pages_cached: cached,
        map_pages_budget: budget,
        peak_rss_bytes: peak_rss(),
    }))
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
