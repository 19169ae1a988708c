//! `hlfs retain`: turn a volume's retention window on, change it, or turn
//! it off.

use anyhow::{bail, Result};
use hlfs_device::control::Command;
use hlfs_volume::MAX_RETAIN_MS;

use super::change;
use crate::args::{parse_window, Settings};

#[derive(clap::Args, Debug)]
pub struct RetainArgs {
    volume: String,
    /// How far back the volume can be opened as it was: a duration such as
    /// 30m, 1h or 7d, or `off`. A longer window keeps more of what
    /// overwrites replaced, so cleaning frees less.
    #[arg(value_parser = parse_window)]
    window: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: RetainArgs, settings: &Settings) -> Result<()> {
    let window_ms = args.window;
    if window_ms > MAX_RETAIN_MS {
        bail!("a retention window is at most ten years");
    }
    change(
        &args.volume,
        settings,
        Command::Retain { window_ms },
        |answer| answer.into_name().map(drop),
        async |vol| vol.set_retention(window_ms).await,
    )
    .await?;
    if args.json {
        outln!(
            "{}",
            serde_json::json!({ "volume": args.volume, "retain_ms": window_ms })
        );
    } else if window_ms == 0 {
        outln!("{}: retention window off", args.volume);
    } else {
        outln!(
            "{}: retention window {}; `hlfs export {}@-10m FILE` (or @UTC-TIME) opens a moment inside it",
            args.volume,
            humantime::format_duration(std::time::Duration::from_millis(window_ms)),
            args.volume
        );
    }
    Ok(())
}
