//! One module per command. Each defines its arguments and a `run`; what
//! they share is in `crate::args` and here.

pub mod bench;
pub mod check;
pub mod create;
pub mod export;
pub mod gc;
pub mod import;
pub mod info;
pub mod resize;
pub mod serve;
pub mod snapshot;

use anyhow::Result;
use hlfs_volume::Volume;

use crate::args::Settings;

/// Opens `volume` for writing.
async fn open_writer(volume: &str, settings: &Settings) -> Result<Volume> {
    Ok(Volume::open(settings.backend(volume, false)?, &settings.open).await?)
}

/// Closes a volume opened for writing whatever `result` is, reporting the
/// operation's error first.
async fn finish<T>(vol: Volume, result: hlfs_volume::Result<T>) -> Result<T> {
    let closed = vol.close().await;
    let value = result?;
    closed?;
    Ok(value)
}
