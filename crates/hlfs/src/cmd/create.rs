//! `hlfs create`: an empty thin volume.

use anyhow::{Context, Result};
use hlfs_volume::{CreateOptions, Volume};

use crate::args::{human, parse_size, parse_window, Settings};

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
    /// A retention window (such as 1h): the volume can be opened as it was
    /// at any moment that recent (see `hlfs retain`). Off by default.
    #[arg(long, value_parser = parse_window)]
    retain: Option<u64>,
}

pub async fn run(args: CreateArgs, settings: &Settings) -> Result<()> {
    let create = CreateOptions {
        size: args.size,
        block_size: u32::try_from(args.block_size).context("block size too large")?,
        segment_size: args.segment_size,
    };
    let backend = settings.backend(&args.volume, true)?;
    Volume::create(&backend, &create).await?;
    if let Some(window_ms) = args.retain.filter(|w| *w > 0) {
        let vol = Volume::open(backend, &settings.open).await?;
        let set = vol.set_retention(window_ms).await;
        let closed = vol.close().await;
        set?;
        closed?;
    }
    outln!(
        "created {}: {} ({} bytes), block size {}",
        args.volume,
        human(args.size),
        args.size,
        args.block_size
    );
    Ok(())
}
