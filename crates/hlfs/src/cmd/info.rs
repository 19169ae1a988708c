//! `hlfs info`: what a volume is and holds.

use anyhow::Result;
use hlfs_device::control::{Answer, Client, Command, Live};
use hlfs_volume::{utc, View, Volume, VolumeInfo};

use crate::args::{human, Settings};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    volume: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: InfoArgs, settings: &Settings) -> Result<()> {
    let backend = settings.backend(&args.volume, false)?;
    let live = live(&backend).await;
    let vol = Volume::open_read_only(backend, &settings.open, View::Head).await?;
    let info = vol.info().await?;
    if args.json {
        let mut json = info_json(&info);
        json["live"] = match &live {
            Some(live) => live_json(live)?,
            None => serde_json::Value::Null,
        };
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_info(&args.volume, &info);
        if let Some(live) = &live {
            print_live(live);
        }
    }
    Ok(())
}

/// The figures of the server that serves the volume on this host, if one
/// does. Info is still given without them if the server does not answer.
async fn live(backend: &hlfs_volume::Backend) -> Option<Live> {
    let asked: Result<Option<Live>> = async {
        let Some(owner) = Client::connect(backend).await? else {
            return Ok(None);
        };
        match owner.call(Command::Status).await? {
            Answer::Status(live) => Ok(Some(live)),
            _ => anyhow::bail!("it answered without them"),
        }
    }
    .await;
    asked.unwrap_or_else(|e| {
        eprintln!("hlfs: warning: the volume's server did not give its figures: {e:#}");
        None
    })
}

/// `a / b`, or None when there is nothing to divide.
fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// The live figures, and the ratios a reader wants from them.
fn live_json(live: &Live) -> Result<serde_json::Value> {
    let f = &live.figures;
    let mut json = serde_json::to_value(live)?;
    json["write_amplification"] = serde_json::json!(ratio(f.log_appended_bytes, f.written_bytes));
    json["flushes_per_sync"] = serde_json::json!(ratio(f.flushes, f.journal_syncs));
    json["read_cache_hit_ratio"] = serde_json::json!(f
        .read_cache
        .as_ref()
        .and_then(|c| ratio(c.hits, c.hits + c.misses)));
    Ok(json)
}

fn print_live(live: &Live) {
    let f = &live.figures;
    let percent = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
    outln!(
        "served by:      pid {} as export {}, {} client{} connected",
        live.pid,
        live.export,
        live.connections,
        if live.connections == 1 { "" } else { "s" }
    );
    outln!(
        "  written:      {} by clients, {} to the log (x{}) since the server opened it",
        human(f.written_bytes),
        human(f.log_appended_bytes),
        ratio(f.log_appended_bytes, f.written_bytes).map_or("-".into(), |r| format!("{r:.2}"))
    );
    outln!(
        "  flushes:      {} in {} journal syncs ({} per sync, {} each)",
        f.flushes,
        f.journal_syncs,
        ratio(f.flushes, f.journal_syncs).map_or("-".into(), |r| format!("{r:.1}")),
        if f.journal_syncs > 0 {
            format!(
                "{:.2} ms",
                f.journal_sync_seconds * 1e3 / f.journal_syncs as f64
            )
        } else {
            "-".into()
        }
    );
    outln!(
        "  cleaning:     {} run{}, {} segments deleted, {} freed, {} copied",
        f.gc_runs,
        if f.gc_runs == 1 { "" } else { "s" },
        f.gc_deleted_segments,
        human(f.gc_freed_bytes),
        human(f.gc_copied_bytes)
    );
    outln!(
        "  uploads:      {} of {} backlog slots in use",
        f.upload_backlog_segments,
        f.upload_backlog_limit
    );
    outln!(
        "  map pages:    {} of {} in memory, {} read from the log",
        f.map_pages,
        f.map_page_limit,
        f.map_page_misses
    );
    if let Some(c) = &f.read_cache {
        outln!(
            "  read cache:   {} cached, {} of reads served from it",
            human(c.bytes),
            percent(ratio(c.hits, c.hits + c.misses))
        );
    }
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
        "retention": retention_json(info),
        "parent": info.parent.as_ref().map(|p| serde_json::json!({
            "address": p.address,
            "uuid": p.uuid,
            "snapshot": p.snapshot,
            "snapshot_lsn": p.snapshot_lsn,
            "size": p.size,
        })),
        "clones": info
            .snapshots
            .iter()
            .filter(|s| !s.clones.is_empty())
            .map(|s| (s.name.clone(), serde_json::json!(s.clones)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The retention window, or null when it is off.
fn retention_json(info: &VolumeInfo) -> serde_json::Value {
    let r = &info.retention;
    if r.window_ms == 0 {
        return serde_json::Value::Null;
    }
    serde_json::json!({
        "window_ms": r.window_ms,
        "oldest_moment": r.oldest_ms.map(utc),
        "oldest_moment_ms": r.oldest_ms,
        "points": r.points,
    })
}

fn print_info(volume: &str, info: &VolumeInfo) {
    outln!("volume:         {volume}");
    outln!("uuid:           {}", info.uuid);
    outln!("size:           {} ({} bytes)", human(info.size), info.size);
    outln!("block size:     {}", info.block_size);
    outln!("segment size:   {}", human(info.segment_size));
    outln!(
        "allocated:      {} ({} bytes)",
        human(info.allocated_bytes),
        info.allocated_bytes
    );
    outln!(
        "stored:         {} ({} bytes)",
        human(info.stored_bytes),
        info.stored_bytes
    );
    outln!("format version: {}", info.format_version);
    outln!("created:        {}", utc(info.created_ms));
    outln!(
        "writer:         {}",
        info.writer.as_deref().unwrap_or("none")
    );
    let r = &info.retention;
    if r.window_ms == 0 {
        outln!("retention:      off");
    } else {
        outln!(
            "retention:      {} (moments from {} can be opened, {} points)",
            humantime::format_duration(std::time::Duration::from_millis(r.window_ms)),
            r.oldest_ms.map_or("-".into(), utc),
            r.points
        );
    }
    if let Some(p) = &info.parent {
        outln!(
            "parent:         {}@{} ({}, a clone reads from it what it has not written)",
            p.address,
            p.snapshot,
            human(p.size)
        );
    }
    let names: Vec<&str> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
    outln!(
        "snapshots:      {}",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    );
    for s in info.snapshots.iter().filter(|s| !s.clones.is_empty()) {
        outln!("clones of {}: {}", s.name, s.clones.join(", "));
    }
}
