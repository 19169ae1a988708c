//! `hlfs clone`: a writable volume made from a snapshot in O(1).

use anyhow::{bail, Context, Result};
use hlfs_device::control::Command;
use hlfs_volume::{absolute_address, clone_volume, ready_for_clone, CloneSource, ErrorKind};

use super::change;
use crate::args::{human, split_snapshot, At, Settings};

/// Makes a writable clone of a snapshot, or of a moment of the retention
/// window, in O(1): nothing is copied. The clone reads from its parent
/// what it has not written; the parent's snapshot cannot be deleted while
/// the clone exists (`hlfs flatten` ends that).
#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// What to clone: VOLUME@SNAPSHOT, or a moment of the volume's
    /// retention window as VOLUME@-10m or VOLUME@2026-12-07T10:00:00Z (kept
    /// as a snapshot named moment-<time>, which the clone reads).
    source: String,
    /// Where the clone is made: a path or a URI, on any backend.
    clone: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: CloneArgs, settings: &Settings) -> Result<()> {
    let (volume, at) = split_snapshot(&args.source);
    let Some(at) = at else {
        bail!(
            "{}: name the snapshot or moment to clone, as VOLUME@SNAPSHOT or VOLUME@-10m (take a snapshot with `hlfs snapshot create`)",
            args.source
        );
    };
    let volume = absolute_address(volume)?;
    let parent = settings.backend(&volume, false)?;
    let snapshot = match At::parse(at, crate::args::now_ms()).map_err(anyhow::Error::msg)? {
        At::Snapshot(name) if ready_for_clone(&parent, &name).await? => name,
        At::Snapshot(name) => offer(&volume, settings, CloneSource::Snapshot(name)).await?,
        At::Moment(t) => offer(&volume, settings, CloneSource::Moment(t)).await?,
        At::SnapshotOrMoment(name, _) if ready_for_clone(&parent, &name).await? => name,
        At::SnapshotOrMoment(name, t) => {
            match offer(&volume, settings, CloneSource::Snapshot(name)).await {
                Err(e) if not_found(&e) => offer(&volume, settings, CloneSource::Moment(t)).await?,
                other => other?,
            }
        }
    };
    let clone = settings.backend(&absolute_address(&args.clone)?, true)?;
    let made = clone_volume(parent, &snapshot, &clone, &settings.open).await;
    if made.is_err() && !args.clone.contains("://") {
        // Leave no empty directory behind a refused clone.
        let _ = std::fs::remove_dir(std::path::Path::new(&args.clone).join("journal"));
        let _ = std::fs::remove_dir(&args.clone);
    }
    let made = made?;
    if args.json {
        let json = serde_json::json!({
            "clone": clone.location,
            "uuid": made.uuid,
            "size": made.size,
            "parent": {
                "address": made.parent.address,
                "uuid": made.parent.uuid,
                "snapshot": made.parent.snapshot,
                "snapshot_lsn": made.parent.snapshot_lsn,
            },
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        outln!(
            "cloned {}@{} to {}: {} ({} bytes); it reads from its parent what it has not written, so that snapshot cannot be deleted while the clone exists",
            made.parent.address,
            made.parent.snapshot,
            clone.location,
            human(made.size),
            made.size
        );
    }
    Ok(())
}

/// Has the parent's writer (its server, or the volume opened here) make it
/// ready to be cloned from `source`: its format v4, a moment kept as a
/// snapshot, whose name is returned.
async fn offer(volume: &str, settings: &Settings, source: CloneSource) -> Result<String> {
    let what = match &source {
        CloneSource::Snapshot(name) => format!("snapshot {name:?}"),
        CloneSource::Moment(t) => format!("the moment {}", hlfs_volume::utc(*t)),
    };
    let name = change(
        volume,
        settings,
        Command::OfferForClone {
            source: source.clone(),
        },
        |answer| answer.into_name(),
        async |vol| vol.offer_for_clone(&source).await.map(Some),
    )
    .await
    .with_context(|| {
        format!("making {volume} ready for a clone of {what} (this needs its writer: the server that serves it on this host, or the volume unopened)")
    })?;
    name.context("the volume's server named no snapshot")
}

fn not_found(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<hlfs_volume::VolumeError>())
        .any(|v| v.kind() == ErrorKind::NotFound)
}
