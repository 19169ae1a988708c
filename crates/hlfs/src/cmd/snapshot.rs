//! `hlfs snapshot`: create, list, delete and roll back to snapshots.

use anyhow::Result;
use clap::Subcommand;
use hlfs_volume::{utc, View, Volume};

use super::{finish, open_writer};
use crate::args::Settings;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot of the volume as it is now.
    Create { volume: String, name: String },
    /// List snapshots, oldest first.
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete { volume: String, name: String },
    /// Make the volume equal to a snapshot again. The current state is kept
    /// as an automatic snapshot, so nothing is lost.
    Rollback { volume: String, name: String },
}

pub async fn run(command: SnapshotCommand, settings: &Settings) -> Result<()> {
    match command {
        SnapshotCommand::Create { volume, name } => {
            let vol = open_writer(&volume, settings).await?;
            let result = vol.snapshot_create(&name).await;
            let snap = finish(vol, result).await?;
            println!("created snapshot {} of {volume}", snap.name);
        }
        SnapshotCommand::Delete { volume, name } => {
            let vol = open_writer(&volume, settings).await?;
            let result = vol.snapshot_delete(&name).await;
            finish(vol, result).await?;
            println!("deleted snapshot {name} of {volume}");
        }
        SnapshotCommand::Rollback { volume, name } => {
            let vol = open_writer(&volume, settings).await?;
            let result = vol.rollback(&name).await;
            let kept = finish(vol, result).await?;
            println!("rolled {volume} back to snapshot {name}; its previous state is kept as snapshot {kept}");
        }
        SnapshotCommand::List { volume, json } => list(&volume, json, settings).await?,
    }
    Ok(())
}

async fn list(volume: &str, json: bool, settings: &Settings) -> Result<()> {
    let backend = settings.backend(volume, false)?;
    let vol = Volume::open_read_only(backend, &settings.open, View::Head).await?;
    let snaps = vol.snapshots();
    if json {
        let list: Vec<_> = snaps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "created": utc(s.created_ms),
                    "created_ms": s.created_ms,
                    "automatic": s.automatic,
                    "lsn": s.lsn,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if snaps.is_empty() {
        println!("{volume} has no snapshots");
    } else {
        println!("{:<40} {:<24} KIND", "NAME", "CREATED");
        for s in snaps {
            let kind = if s.automatic { "automatic" } else { "user" };
            println!("{:<40} {:<24} {kind}", s.name, utc(s.created_ms));
        }
    }
    Ok(())
}
