//! `hlfs resize`: grow a volume.

use anyhow::Result;
use hlfs_device::control::Command;

use super::change;
use crate::args::{human, parse_size, Settings};

#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    volume: String,
    #[arg(long, value_parser = parse_size)]
    size: u64,
}

pub async fn run(args: ResizeArgs, settings: &Settings) -> Result<()> {
    let size = args.size;
    change(
        &args.volume,
        settings,
        Command::Resize { size },
        |answer| answer.into_name().map(drop),
        async |vol| vol.resize(size).await,
    )
    .await?;
    outln!(
        "{} is now {} ({} bytes)",
        args.volume,
        human(args.size),
        args.size
    );
    Ok(())
}
