//! `hlfs create`: an empty thin volume.

use anyhow::{Context, Result};
use hlfs_volume::{CreateOptions, Volume};

use crate::args::{human, parse_size, Settings};

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    volume: String,
    /// Logical size of the disk.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Block size: a power of two from 512 to 64K.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    block_size: u64,
    /// Target size of the log's segments.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    segment_size: u64,
}

pub async fn run(args: CreateArgs, settings: &Settings) -> Result<()> {
    let create = CreateOptions {
        size: args.size,
        block_size: u32::try_from(args.block_size).context("block size too large")?,
        segment_size: args.segment_size,
    };
    Volume::create(&settings.backend(&args.volume, true)?, &create).await?;
    outln!(
        "created {}: {} ({} bytes), block size {}",
        args.volume,
        human(args.size),
        args.size,
        args.block_size
    );
    Ok(())
}
