//! `hlfs bench --mode recovery`: the time of the open that recovers a
//! volume dropped without closing.

use super::*;

#[derive(Serialize)]
pub(super) struct RecoveryReport {
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
    /// What went wrong, if blocks read back wrong.
    pub(super) fn failure(&self) -> Option<String> {
        (self.mismatches > 0).then(|| {
            format!(
                "recovery: {} of {} checked blocks read back wrong after recovery (first: {})",
                self.mismatches,
                self.checked_written + self.checked_unwritten,
                self.first_mismatches.join("; ")
            )
        })
    }

    pub(super) fn table(&self) -> String {
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

pub(super) async fn recovery(args: &BenchArgs, dir: &Path) -> Result<Report> {
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
