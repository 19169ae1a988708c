//! `hlfs bench --mode scatter`: many small writes over a huge thin volume,
//! within the map budget; reopen and verify.

use super::*;

#[derive(Serialize)]
pub(super) struct ScatterReport {
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
    /// What went wrong, if blocks read back wrong.
    pub(super) fn failure(&self) -> Option<String> {
        (self.mismatches > 0).then(|| {
            format!(
                "scatter: {} of {} blocks read back wrong (first: {})",
                self.mismatches,
                self.writes,
                self.first_mismatches.join("; ")
            )
        })
    }

    pub(super) fn table(&self) -> String {
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

pub(super) async fn scatter(args: &BenchArgs, dir: &Path) -> Result<Report> {
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
