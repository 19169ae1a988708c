//! `hlfs bench --mode engine`: sequential and random I/O, throughput and
//! latency.

use super::*;

#[derive(Serialize)]
pub(super) struct EngineReport {
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
    pub(super) fn table(&self) -> String {
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

pub(super) async fn engine(args: &BenchArgs, dir: &Path) -> Result<Report> {
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
