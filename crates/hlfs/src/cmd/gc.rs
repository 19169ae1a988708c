//! `hlfs gc --stats`: where a volume's space goes, from metadata alone.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hlfs_volume::{space, utc, SegmentSpace, SpaceStats};

use crate::args::{human, Settings};

/// Segments listed in the text report; `--json` lists them all.
const SHOWN_SEGMENTS: usize = 10;

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    volume: String,
    /// Report space: per segment its size, live bytes and age; the totals;
    /// what each snapshot alone holds. Reads map pages only, never data,
    /// and works on a served volume (as of its last checkpoint). Cleaning
    /// passes themselves are not built yet, so this flag is required.
    #[arg(long, required = true)]
    stats: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: GcArgs, settings: &Settings) -> Result<()> {
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

/// Stored ÷ live, the figure a space target is stated in; None if nothing
/// is live.
fn space_ratio(stats: &SpaceStats) -> Option<f64> {
    (stats.live_bytes > 0).then(|| stats.stored_bytes as f64 / stats.live_bytes as f64)
}

fn age_secs(made_ms: u64, now: u64) -> u64 {
    now.saturating_sub(made_ms) / 1000
}

fn stats_json(stats: &SpaceStats, now: u64) -> serde_json::Value {
    serde_json::json!({
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
    outln!("head only:     {}", bytes(stats.head_only_bytes));
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
