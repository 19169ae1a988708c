//! `hlfs check`: verify every manifest, record, map page and block.

use std::process::ExitCode;

use anyhow::Result;
use hlfs_volume::check;

use crate::args::Settings;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    volume: String,
}

/// Damage found is reported on stdout and makes the exit status 1.
pub async fn run(args: CheckArgs, settings: &Settings) -> Result<ExitCode> {
    let volume = &args.volume;
    let report = check(settings.backend(volume, false)?).await?;
    for w in &report.warnings {
        outln!("warning: {w}");
    }
    for p in &report.problems {
        outln!("damaged: {p}");
    }
    outln!(
        "checked {} manifests, {} segments, {} records, {} map pages, {} blocks",
        report.manifests,
        report.segments,
        report.records,
        report.map_pages,
        report.blocks
    );
    if report.is_ok() {
        outln!("{volume}: no damage found");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "hlfs: error: {volume}: {} problems found",
            report.problems.len()
        );
        Ok(ExitCode::FAILURE)
    }
}
