//! `hlfs resize`: grow a volume.

use anyhow::Result;

use super::{finish, open_writer};
use crate::args::{human, parse_size, Settings};

#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    volume: String,
    #[arg(long, value_parser = parse_size)]
    size: u64,
}

pub async fn run(args: ResizeArgs, settings: &Settings) -> Result<()> {
    let vol = open_writer(&args.volume, settings).await?;
    let result = vol.resize(args.size).await;
    finish(vol, result).await?;
    println!(
        "{} is now {} ({} bytes)",
        args.volume,
        human(args.size),
        args.size
    );
    Ok(())
}
