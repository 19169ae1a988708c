//! `hlfs flatten`: make a clone stand alone.

use anyhow::Result;
use hlfs_device::control::Command;
use hlfs_volume::{FlattenProgress, FlattenReport};

use super::change;
use crate::args::{human, progress, Settings};

#[derive(clap::Args, Debug)]
pub struct FlattenArgs {
    /// The clone.
    volume: String,
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
    let report = change(
        &args.volume,
        settings,
        Command::Flatten,
        |answer| answer.into_flatten_report(),
        async |vol| vol.flatten(&show).await,
    )
    .await;
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
