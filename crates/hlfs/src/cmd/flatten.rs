//! `hlfs flatten`: make a clone stand alone.

use std::time::Duration;

use anyhow::Result;
use hlfs_device::control::{Answer, Client, Command};
use hlfs_volume::{Backend, FlattenOptions, FlattenProgress, FlattenReport};
use indicatif::ProgressBar;

use super::change;
use crate::args::{human, parse_size, progress, Settings};

/// Copies into a clone what it still reads from its parent, then drops the
/// link: the clone stands alone, and the parent's snapshot can be deleted.
/// Guest writes go on meanwhile and are never overwritten. While clients
/// use the clone, the copy yields to them (8 MiB/s at most). A served
/// clone is flattened by its server: interrupting this command leaves the
/// flatten running there (run it again to watch it), and a flatten cut off
/// by a stop or a crash goes on when the clone is next opened for writing.
/// Refused while the clone has snapshots or a retention window.
#[derive(clap::Args, Debug)]
pub struct FlattenArgs {
    /// The clone.
    volume: String,
    /// Bytes copied per second at most, such as 50M (default: as fast as
    /// the disk and the guest's writes allow).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    rate: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: FlattenArgs, settings: &Settings) -> Result<()> {
    let bar = progress(None, "flattening");
    let shown = bar.clone();
    let show = move |p: &FlattenProgress| {
        shown.set_length(p.total);
        shown.set_position(p.done);
    };
    let opts = FlattenOptions {
        copy_rate: args.rate,
        ..FlattenOptions::default()
    };
    let watcher = (!bar.is_hidden())
        .then(|| settings.backend(&args.volume, false).ok())
        .flatten()
        .map(|backend| tokio::spawn(watch_served(backend, bar.clone())));
    let report = change(
        &args.volume,
        settings,
        Command::Flatten {
            copy_rate: args.rate,
        },
        |answer| answer.into_flatten_report(),
        async |vol| vol.flatten(opts, &show).await,
    )
    .await;
    if let Some(w) = watcher {
        w.abort();
    }
    bar.finish_and_clear();
    let report: FlattenReport = report?;
    if args.json {
        let json = serde_json::json!({
            "copied_bytes": report.copied_bytes,
            "parent_bytes": report.parent_bytes,
            "seconds": report.seconds,
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        outln!(
            "flattened {}: {} copied from its parent in {:.1}s; it no longer reads from it",
            args.volume,
            human(report.copied_bytes),
            report.seconds
        );
    }
    Ok(())
}

/// Shows on `bar` where the flatten of a served clone is, asking its
/// server a few times a second (the flatten's own request answers only at
/// the end). Ends, doing nothing, for a clone no one serves.
async fn watch_served(backend: Backend, bar: ProgressBar) {
    loop {
        let Ok(Some(owner)) = Client::connect(&backend).await else {
            return;
        };
        if let Ok(Answer::Status(live)) = owner.call(Command::Status).await {
            if let Some(p) = live.flatten {
                bar.set_length(p.total);
                bar.set_position(p.done);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
