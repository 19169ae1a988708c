//! `hlfs clone`: a writable volume made from a snapshot in O(1).

use anyhow::{bail, Result};
use hlfs_volume::{absolute_address, clone_volume};

use crate::args::{human, split_snapshot, At, Settings};

#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The parent snapshot, as VOLUME@SNAPSHOT.
    source: String,
    /// Where the clone is made: a path or a URI, on any backend.
    clone: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: CloneArgs, settings: &Settings) -> Result<()> {
    let (volume, snapshot) = split_snapshot(&args.source);
    let Some(snapshot) = snapshot else {
        bail!(
            "{}: name the snapshot to clone, as VOLUME@SNAPSHOT (take one with `hlfs snapshot create`)",
            args.source
        );
    };
    match At::parse(snapshot, crate::args::now_ms()).map_err(anyhow::Error::msg)? {
        At::Snapshot(_) | At::SnapshotOrMoment(..) => {}
        At::Moment(_) => bail!(
            "@{snapshot}: a clone is made from a snapshot; moments of the retention window cannot be cloned yet (take a snapshot of the moment's volume first)"
        ),
    }
    let parent = settings.backend(&absolute_address(volume)?, false)?;
    let clone = settings.backend(&absolute_address(&args.clone)?, true)?;
    let made = clone_volume(parent, snapshot, &clone, &settings.open).await;
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
