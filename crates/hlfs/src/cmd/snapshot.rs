//! `hlfs snapshot`: create, list, delete and roll back to snapshots.

use anyhow::Result;
use clap::Subcommand;
use hlfs_volume::{space, utc, View, Volume};

use hlfs_device::control::Command;

use super::change;
use crate::args::{human, now_ms, utc_ms, At, Settings};

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot of the volume as it is now.
    Create { volume: String, name: String },
    /// List snapshots, oldest first, each with the bytes only it holds
    /// (what deleting it would free, once cleaning copies the rest).
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete { volume: String, name: String },
    /// Make the volume equal to a snapshot again, or to a moment of its
    /// retention window (NAME is then -10m, or a UTC time such as
    /// 2026-12-07T10:00:00Z). The current state is kept as an automatic
    /// snapshot, so nothing is lost.
    Rollback {
        volume: String,
        #[arg(allow_hyphen_values = true)]
        name: String,
    },
}

pub async fn run(command: SnapshotCommand, settings: &Settings) -> Result<()> {
    match command {
        SnapshotCommand::Create { volume, name } => {
            let command = Command::SnapshotCreate { name: name.clone() };
            let made = change(
                &volume,
                settings,
                command,
                |answer| Ok(answer.into_name()?.unwrap_or_else(|| name.clone())),
                async |vol| Ok(vol.snapshot_create(&name).await?.name),
            )
            .await?;
            outln!("created snapshot {made} of {volume}");
        }
        SnapshotCommand::Delete { volume, name } => {
            let command = Command::SnapshotDelete { name: name.clone() };
            change(
                &volume,
                settings,
                command,
                |answer| answer.into_name().map(drop),
                async |vol| vol.snapshot_delete(&name).await,
            )
            .await?;
            outln!("deleted snapshot {name} of {volume}");
        }
        SnapshotCommand::Rollback { volume, name } => {
            let to = match At::parse(&name, now_ms()).map_err(anyhow::Error::msg)? {
                At::Snapshot(name) => Ok(name),
                At::Moment(t) => Err(t),
                // A snapshot of that name if there is one, else the moment.
                At::SnapshotOrMoment(name, t) => {
                    let list = Volume::open_read_only(
                        settings.backend(&volume, false)?,
                        &settings.open,
                        View::Head,
                    )
                    .await?;
                    let named = list.snapshots().iter().any(|s| s.name == name);
                    list.close().await?;
                    if named {
                        Ok(name)
                    } else {
                        Err(t)
                    }
                }
            };
            let (command, what) = match &to {
                Ok(name) => (
                    Command::Rollback { name: name.clone() },
                    format!("snapshot {name}"),
                ),
                Err(t) => (
                    Command::RollbackToMoment { at_ms: *t },
                    format!("its moment {}", utc_ms(*t)),
                ),
            };
            let kept = change(
                &volume,
                settings,
                command,
                |answer| Ok(answer.into_name()?.unwrap_or_default()),
                async |vol| match &to {
                    Ok(name) => vol.rollback(name).await,
                    Err(t) => vol.rollback_to_moment(*t).await,
                },
            )
            .await?;
            outln!("rolled {volume} back to {what}; its previous state is kept as snapshot {kept}");
        }
        SnapshotCommand::List { volume, json } => list(&volume, json, settings).await?,
    }
    Ok(())
}

async fn list(volume: &str, json: bool, settings: &Settings) -> Result<()> {
    let backend = settings.backend(volume, false)?;
    let vol = Volume::open_read_only(backend.clone(), &settings.open, View::Head).await?;
    let snaps = vol.snapshots();
    // A snapshot taken or deleted by a server between the two reads has
    // no figure, and neither has any if the walk fails: the list itself
    // does not depend on it.
    let space = match space(backend).await {
        Ok(space) => Some(space),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell what each snapshot alone holds");
            None
        }
    };
    let only_bytes = |name: &str| {
        space
            .as_ref()?
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.only_bytes)
    };
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
                    "only_bytes": only_bytes(&s.name),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&list)?);
    } else if snaps.is_empty() {
        outln!("{volume} has no snapshots");
    } else {
        outln!(
            "{:<40} {:<24} {:<10} ONLY IT HOLDS",
            "NAME",
            "CREATED",
            "KIND"
        );
        for s in snaps {
            let kind = if s.automatic { "automatic" } else { "user" };
            let only = only_bytes(&s.name).map_or("-".into(), human);
            outln!("{:<40} {:<24} {kind:<10} {only}", s.name, utc(s.created_ms));
        }
    }
    Ok(())
}
