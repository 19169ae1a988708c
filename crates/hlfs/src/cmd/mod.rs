//! One module per command. Each defines its arguments and a `run`; what
//! they share is in `crate::args` and here.

pub mod bench;
pub mod check;
pub mod clone;
pub mod create;
pub mod diff;
pub mod export;
pub mod flatten;
pub mod gc;
pub mod import;
pub mod info;
pub mod metrics;
pub mod rbd_diff;
pub mod resize;
pub mod retain;
pub mod serve;
pub mod snapshot;

use anyhow::Result;
use hlfs_device::control::{Answer, Client, Command};
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

/// Runs a command that changes `volume`: through its owner's control
/// socket if a process on this host serves it (a served volume is changed
/// only by its server), or else on the volume opened here, with `here`.
/// Either way the answer is the same, errors and their kinds included.
async fn change<T>(
    volume: &str,
    settings: &Settings,
    command: Command,
    from_owner: impl FnOnce(Answer) -> hlfs_volume::Result<T>,
    here: impl AsyncFnOnce(&Volume) -> hlfs_volume::Result<T>,
) -> Result<T> {
    let backend = settings.backend(volume, false)?;
    if let Some(owner) = Client::connect(&backend).await? {
        tracing::debug!(
            volume,
            ?command,
            "sending the command to the volume's server"
        );
        return Ok(from_owner(owner.call(command).await?)?);
    }
    let vol = Volume::open(backend, &settings.open).await?;
    let result = here(&vol).await;
    finish(vol, result).await
}
