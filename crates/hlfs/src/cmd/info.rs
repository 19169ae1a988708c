//! `hlfs info`: what a volume is and holds.

use anyhow::Result;
use hlfs_volume::{utc, View, Volume, VolumeInfo};

use crate::args::{human, Settings};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    volume: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: InfoArgs, settings: &Settings) -> Result<()> {
    let backend = settings.backend(&args.volume, false)?;
    let vol = Volume::open_read_only(backend, &settings.open, View::Head).await?;
    let info = vol.info().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
    } else {
        print_info(&args.volume, &info);
    }
    Ok(())
}

fn info_json(info: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "uuid": info.uuid,
        "size": info.size,
        "block_size": info.block_size,
        "segment_size": info.segment_size,
        "allocated_bytes": info.allocated_bytes,
        "stored_bytes": info.stored_bytes,
        "format_version": info.format_version,
        "snapshots": info.snapshots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        "created": utc(info.created_ms),
        "writer": info.writer,
    })
}

fn print_info(volume: &str, info: &VolumeInfo) {
    println!("volume:         {volume}");
    println!("uuid:           {}", info.uuid);
    println!("size:           {} ({} bytes)", human(info.size), info.size);
    println!("block size:     {}", info.block_size);
    println!("segment size:   {}", human(info.segment_size));
    println!(
        "allocated:      {} ({} bytes)",
        human(info.allocated_bytes),
        info.allocated_bytes
    );
    println!(
        "stored:         {} ({} bytes)",
        human(info.stored_bytes),
        info.stored_bytes
    );
    println!("format version: {}", info.format_version);
    println!("created:        {}", utc(info.created_ms));
    println!(
        "writer:         {}",
        info.writer.as_deref().unwrap_or("none")
    );
    let names: Vec<&str> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
    println!(
        "snapshots:      {}",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    );
}
