//! `hlfs gc`: clean a volume's segments until its space is back under a
//! target; `hlfs gc --stats`: where its space goes, from metadata alone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hlfs_device::control::Command;
use hlfs_volume::{space, utc, GcOptions, GcProgress, GcReport, GcStop, SegmentSpace, SpaceStats};

use super::change;
use crate::args::{human, parse_space_target, progress, Settings, MAX_GRACE_SECS};

/// Segments listed in the text report; `--json` lists them all.
const SHOWN_SEGMENTS: usize = 10;

/// Clean a volume: copy what is still live out of segments that are mostly
/// garbage, then delete them, until stored ≤ TARGET × live. Works on a
/// served volume (its server cleans, while its clients go on). Segments a
/// snapshot holds are not cleaned yet: delete snapshots you no longer need
/// first (`hlfs gc --stats` shows what each one holds).
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    volume: String,
    /// Only report space, changing nothing: per segment its size, live
    /// bytes and age; the totals; what each snapshot alone holds. Reads map
    /// pages only, never data, and works on a served volume (as of its last
    /// checkpoint).
    #[arg(long)]
    stats: bool,
    /// Clean until stored bytes ≤ TARGET × live bytes. Lower means more
    /// copying for less space. Whatever the target, segments nothing
    /// reaches any more are deleted (such as those a crash left).
    #[arg(long, default_value_t = GcOptions::default().target, value_parser = parse_space_target, conflicts_with = "stats")]
    target: f64,
    /// Keep emptied segments this long after the manifest that frees them,
    /// for readers that opened the volume before (an export, a read-only
    /// server). The command waits it out before deleting. A served volume
    /// gets at least 5 s, for its own clients' reads in flight.
    #[arg(long, value_name = "SECS", default_value_t = GcOptions::default().grace.as_secs(), value_parser = clap::value_parser!(u64).range(..=MAX_GRACE_SECS), conflicts_with = "stats")]
    grace: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: GcArgs, settings: &Settings) -> Result<()> {
    if !args.stats {
        return clean(args, settings).await;
    }
    let stats = space(settings.backend(&args.volume, false)?).await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&stats_json(&stats, now))?
        );
    } else {
        print_stats(&args.volume, &stats, now);
    }
    Ok(())
}

async fn clean(args: GcArgs, settings: &Settings) -> Result<()> {
    let opts = GcOptions {
        target: args.target,
        grace: Duration::from_secs(args.grace),
        ..GcOptions::default()
    };
    let bar = progress(None, "cleaning");
    let shown = bar.clone();
    let show = move |p: &GcProgress| {
        shown.set_message(format!(
            "cleaning: pass {}, stored {} of live {}, target {}",
            p.passes + 1,
            human(p.stored_bytes),
            human(p.live_bytes),
            human(p.target_bytes)
        ));
    };
    let command = Command::Gc {
        target: opts.target,
        grace_ms: opts.grace.as_millis() as u64,
    };
    let report = change(
        &args.volume,
        settings,
        command,
        |answer| answer.into_gc_report(),
        async |vol| vol.gc(&opts, &show).await,
    )
    .await;
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report_json(&report))?);
    } else {
        print_report(&args.volume, &report);
    }
    Ok(())
}

fn report_json(r: &GcReport) -> serde_json::Value {
    let ratio = |stored: u64, live: u64| (live > 0).then(|| stored as f64 / live as f64);
    serde_json::json!({
        "passes": r.passes,
        "deleted_segments": r.deleted_segments,
        "freed_bytes": r.freed_bytes,
        "copied_bytes": r.copied_bytes,
        "swept_bytes": r.swept_bytes,
        "stored_before": r.stored_before,
        "live_before": r.live_before,
        "space_ratio_before": ratio(r.stored_before, r.live_before),
        "stored_after": r.stored_after,
        "live_after": r.live_after,
        "space_ratio_after": ratio(r.stored_after, r.live_after),
        "stopped": r.stopped,
    })
}

fn print_report(volume: &str, r: &GcReport) {
    outln!(
        "{volume}: {} pass{}, {} segment{} deleted, {} freed, {} copied",
        r.passes,
        if r.passes == 1 { "" } else { "es" },
        r.deleted_segments,
        if r.deleted_segments == 1 { "" } else { "s" },
        human(r.freed_bytes),
        human(r.copied_bytes)
    );
    if r.swept_bytes > 0 {
        outln!(
            "{} of staging files that crashed writes left removed",
            human(r.swept_bytes)
        );
    }
    outln!(
        "stored: {} -> {} (live {})",
        human(r.stored_before),
        human(r.stored_after),
        human(r.live_after)
    );
    match r.stopped {
        GcStop::TargetReached => outln!("the space target is met"),
        GcStop::Interrupted => outln!(
            "interrupted: the volume's server is stopping; what this run emptied is deleted by the next"
        ),
        GcStop::NothingCleanable => outln!(
            "nothing more can be cleaned now: what is left is held by snapshots or was written since the last checkpoint (`hlfs gc {volume} --stats` shows where)"
        ),
    }
}

/// Stored ÷ live, the figure a space target is stated in; None if nothing
/// is live.
fn space_ratio(stats: &SpaceStats) -> Option<f64> {
    (stats.live_bytes > 0).then(|| stats.stored_bytes as f64 / stats.live_bytes as f64)
}

fn age_secs(made_ms: u64, now: u64) -> u64 {
    now.saturating_sub(made_ms) / 1000
}

/// Bytes appended to the log per byte clients wrote, since counting began.
fn write_amplification(stats: &SpaceStats) -> Option<f64> {
    let c = stats.counters?;
    (c.written_bytes > 0).then(|| c.appended_bytes as f64 / c.written_bytes as f64)
}

fn stats_json(stats: &SpaceStats, now: u64) -> serde_json::Value {
    let counters = stats.counters.map(|c| {
        serde_json::json!({
            "since": utc(c.since_ms),
            "since_ms": c.since_ms,
            "written_bytes": c.written_bytes,
            "appended_bytes": c.appended_bytes,
        })
    });
    serde_json::json!({
        "write_amplification": write_amplification(stats),
        "log": counters,
        "manifest": stats.manifest_seq,
        "as_of": utc(stats.manifest_written_ms),
        "as_of_ms": stats.manifest_written_ms,
        "live_bytes": stats.live_bytes,
        "stored_bytes": stats.stored_bytes,
        "reclaimable_bytes": stats.reclaimable_bytes,
        "space_ratio": space_ratio(stats),
        "segment_bytes": stats.segment_bytes,
        "manifest_bytes": stats.manifest_bytes,
        "manifests": stats.manifests,
        "journal_bytes": stats.journal_bytes,
        "head_only_bytes": stats.head_only_bytes,
        "retention_bytes": stats.retention_bytes,
        "snapshots": stats.snapshots.iter().map(|s| serde_json::json!({
            "name": s.name,
            "only_bytes": s.only_bytes,
        })).collect::<Vec<_>>(),
        "segments": stats.segments.iter().map(|s| serde_json::json!({
            "id": s.id,
            "size": s.size,
            "live_bytes": s.live_bytes,
            "age_seconds": age_secs(s.made_ms, now),
            "made": utc(s.made_ms),
            "recent": s.recent,
        })).collect::<Vec<_>>(),
    })
}

fn bytes(n: u64) -> String {
    format!("{} ({n} bytes)", human(n))
}

/// "3d 4h", "5m 2s": the two largest units.
fn age_text(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let Some(i) = units.iter().position(|&(u, _)| secs >= u) else {
        return "0s".into();
    };
    let (big, big_name) = units[i];
    let mut text = format!("{}{big_name}", secs / big);
    if let Some(&(small, small_name)) = units.get(i + 1) {
        let rest = secs % big / small;
        if rest > 0 {
            text += &format!(" {rest}{small_name}");
        }
    }
    text
}

fn print_stats(volume: &str, stats: &SpaceStats, now: u64) {
    outln!(
        "{volume}: space as of manifest {} ({})",
        stats.manifest_seq,
        utc(stats.manifest_written_ms)
    );
    outln!("live:          {}", bytes(stats.live_bytes));
    outln!("stored:        {}", bytes(stats.stored_bytes));
    outln!(
        "  segments:    {} in {} segments",
        bytes(stats.segment_bytes),
        stats.segments.len()
    );
    outln!(
        "  manifests:   {} in {} manifests",
        bytes(stats.manifest_bytes),
        stats.manifests
    );
    outln!("  journal:     {}", bytes(stats.journal_bytes));
    outln!("reclaimable:   {}", bytes(stats.reclaimable_bytes));
    match space_ratio(stats) {
        Some(r) => outln!("stored/live:   {r:.2}"),
        None => outln!("stored/live:   - (nothing is live)"),
    }
    match (stats.counters, write_amplification(stats)) {
        (Some(c), Some(wa)) => outln!(
            "write amp.:    {wa:.2} ({} appended to the log for {} written by clients since {})",
            human(c.appended_bytes),
            human(c.written_bytes),
            utc(c.since_ms)
        ),
        (Some(c), None) => outln!("write amp.:    - (nothing written since {})", utc(c.since_ms)),
        (None, _) => outln!("write amp.:    - (not counted: a format v1 volume counts from its first v2 feature on)"),
    }
    outln!("head only:     {}", bytes(stats.head_only_bytes));
    if stats.retention_bytes > 0 {
        outln!(
            "retention:     {} kept for moments of the retention window alone",
            bytes(stats.retention_bytes)
        );
    }
    for s in &stats.snapshots {
        outln!("snapshot {:?} alone holds {}", s.name, bytes(s.only_bytes));
    }
    let mut worst: Vec<&SegmentSpace> = stats.segments.iter().filter(|s| !s.recent).collect();
    worst.sort_by_key(|s| std::cmp::Reverse(s.size - s.live_bytes.min(s.size)));
    worst.retain(|s| s.live_bytes < s.size);
    if worst.is_empty() {
        return;
    }
    outln!(
        "segments with the most to reclaim ({} of {}; --json lists all):",
        worst.len().min(SHOWN_SEGMENTS),
        stats.segments.len()
    );
    outln!(
        "  {:>10} {:>10} {:>10} {:>6} {:>8}",
        "ID",
        "SIZE",
        "LIVE",
        "LIVE%",
        "AGE"
    );
    for s in worst.iter().take(SHOWN_SEGMENTS) {
        outln!(
            "  {:>10} {:>10} {:>10} {:>5.1}% {:>8}",
            s.id,
            human(s.size),
            human(s.live_bytes),
            100.0 * s.live_bytes as f64 / s.size.max(1) as f64,
            age_text(age_secs(s.made_ms, now))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::age_text;

    #[test]
    fn ages_read_in_their_two_largest_units() {
        assert_eq!(age_text(0), "0s");
        assert_eq!(age_text(59), "59s");
        assert_eq!(age_text(60), "1m");
        assert_eq!(age_text(3 * 60 + 5), "3m 5s");
        assert_eq!(age_text(2 * 3600 + 7 * 60 + 9), "2h 7m");
        assert_eq!(age_text(86_400 + 3600), "1d 1h");
    }
}
