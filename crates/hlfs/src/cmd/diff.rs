//! `hlfs diff`: what changed between two snapshots of a volume, or from a
//! snapshot to the head of a closed volume, from map pages alone.

use anyhow::Result;
use hlfs_device::control::{Client, Command};
use hlfs_volume::{diff, Diff};

use crate::args::{human, split_snapshot, Settings};

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// VOLUME@SNAPSHOT, or VOLUME for its head (of a served volume: as of
    /// this command, through a checkpoint its server takes).
    #[arg(value_name = "VOLUME[@SNAPSHOT]")]
    volume: String,
    /// The older snapshot: extents are what changed since it.
    #[arg(long, value_name = "SNAPSHOT")]
    from: String,
    /// Print JSON: {"from", "to", "size", "extents": [{"offset", "length",
    /// "zero"}]}.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: DiffArgs, settings: &Settings) -> Result<()> {
    let (volume, to) = split_snapshot(&args.volume);
    let backend = settings.backend(volume, false)?;
    // A served head: its server first makes its manifest's head all that
    // was written, which the diff then reads from the store.
    let mut checkpointed = false;
    if to.is_none() {
        if let Some(owner) = Client::connect(&backend).await? {
            owner.call(Command::Checkpoint).await?.into_name()?;
            checkpointed = true;
        }
    }
    let changes = diff(backend, &args.from, to, checkpointed).await?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json(&args.from, to, &changes))?
        );
        return Ok(());
    }
    for e in &changes.extents {
        outln!(
            "{:>14} {:>12} {}",
            e.offset,
            e.len,
            if e.zero { "zero" } else { "data" }
        );
    }
    let (data, zero) = totals(&changes);
    outln!(
        "{} extent{} changed from {} to {}: {} of data, {} zeroed",
        changes.extents.len(),
        if changes.extents.len() == 1 { "" } else { "s" },
        args.from,
        to.unwrap_or("the head"),
        human(data),
        human(zero)
    );
    Ok(())
}

/// Bytes of data extents, and of zero extents.
fn totals(changes: &Diff) -> (u64, u64) {
    changes
        .extents
        .iter()
        .fold((0, 0), |(data, zero), e| match e.zero {
            true => (data, zero + e.len),
            false => (data + e.len, zero),
        })
}

fn json(from: &str, to: Option<&str>, changes: &Diff) -> serde_json::Value {
    serde_json::json!({
        "from": from,
        "to": to,
        "size": changes.size,
        "extents": changes.extents.iter().map(|e| serde_json::json!({
            "offset": e.offset,
            "length": e.len,
            "zero": e.zero,
        })).collect::<Vec<_>>(),
    })
}
