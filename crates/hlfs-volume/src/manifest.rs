//! The manifest log: the volume's root of trust, advanced by
//! compare-and-swap.
//!
//! Manifests are numbered blobs created with `put_if_absent`; the newest is
//! the volume. Writing the next number is the compare-and-swap: only one
//! writer can create it. A writer that finds the number taken by a manifest
//! without its claim has been overtaken, and is fenced. One that finds its
//! own claim there (an earlier write whose answer was lost) takes that
//! manifest as current and writes its change on top.

use hlfs_format::{manifest_name, parse_manifest_name, Manifest, WriterClaim};
use hlfs_store::time::Clock;
use hlfs_store::{BlobStore, StoreError};
use parking_lot::Mutex;

use crate::error::{Result, VolumeError};
use crate::lifecycle::{Lifecycle, Need};

/// A create refused because the name exists, of a blob that then reads as
/// missing, is one of ours still in flight (S3 answers such a conflict with
/// 409): it is tried again after this pause, this many times at most.
const CONFLICT_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);
const MAX_CONFLICTS: u32 = 20;

/// What is stored under `name`, whose create was just refused because the
/// name exists. `None` if it reads as missing: a create of ours still in
/// flight conflicted, and the caller creates it again (after a pause).
/// `conflicts` counts those, and too many are an error.
pub(crate) async fn stored_after_refusal(
    store: &dyn BlobStore,
    name: &str,
    clock: &Clock,
    conflicts: &mut u32,
) -> Result<Option<bytes::Bytes>> {
    match store.get(name).await {
        Ok(stored) => Ok(Some(stored)),
        Err(StoreError::NotFound(_)) if *conflicts < MAX_CONFLICTS => {
            *conflicts += 1;
            clock.sleep(CONFLICT_PAUSE).await;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads the newest manifest of the volume at `location`.
pub(crate) async fn latest_manifest(store: &dyn BlobStore, location: &str) -> Result<Manifest> {
    let list = match store.list("manifest/").await {
        Ok(l) => l,
        Err(StoreError::NotFound(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let newest = list
        .iter()
        .filter_map(|b| parse_manifest_name(&b.name))
        .max();
    let Some(seq) = newest else {
        return Err(VolumeError::NotFound(location.to_string()));
    };
    let name = manifest_name(seq);
    let bytes = store.get(&name).await?;
    let m = Manifest::decode(&bytes).map_err(|e| VolumeError::corrupt(format!("{name}: {e}")))?;
    if m.seq != seq {
        return Err(VolumeError::corrupt(format!(
            "{name}: says it is manifest {}",
            m.seq
        )));
    }
    Ok(m)
}

/// The current manifest of an open volume, and the writer claim it carries.
pub(crate) struct ManifestLog {
    current: Mutex<Manifest>,
    /// This writer's claim, once a manifest carries it.
    claim: Mutex<Option<WriterClaim>>,
    /// Taken while writing one, so that two never race for a number (a
    /// background checkpoint and a snapshot command, say).
    turn: tokio::sync::Mutex<()>,
}

impl ManifestLog {
    pub fn new(current: Manifest) -> ManifestLog {
        ManifestLog {
            current: Mutex::new(current),
            claim: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// The current manifest.
    pub fn get(&self) -> Manifest {
        self.current.lock().clone()
    }

    /// Reads from the current manifest without copying it.
    pub fn read<T>(&self, f: impl FnOnce(&Manifest) -> T) -> T {
        f(&self.current.lock())
    }

    /// From now on, manifests carrying `claim` are ours.
    pub fn set_claim(&self, claim: WriterClaim) {
        *self.claim.lock() = Some(claim);
    }

    /// Writes the next manifest: the current one changed by `edit`. The
    /// edit may run more than once, each time on the newest manifest, so it
    /// checks what it relies on there, and fails (writing nothing) if that
    /// no longer holds. Fails, and fails the volume, if another writer
    /// wrote the next number first.
    pub async fn advance(
        &self,
        store: &dyn BlobStore,
        life: &Lifecycle,
        clock: &Clock,
        location: &str,
        mut edit: impl FnMut(&mut Manifest) -> Result<()>,
    ) -> Result<()> {
        let _turn = self.turn.lock().await;
        let mut conflicts = 0;
        loop {
            // No manifest is written once the volume has failed.
            life.check(Need::Sync)?;
            let mut m = self.get();
            edit(&mut m)?;
            m.seq += 1;
            m.written_ms = clock.unix_ms();
            let name = manifest_name(m.seq);
            let bytes = m.encode();
            match store.put_if_absent(&name, bytes.clone().into()).await {
                Ok(()) => {
                    *self.current.lock() = m;
                    return Ok(());
                }
                Err(StoreError::AlreadyExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // A write whose answer was lost may have landed: this one
            // (retried by the store layer), or an earlier one. Either
            // carries our claim; another writer's does not.
            let Some(stored) = stored_after_refusal(store, &name, clock, &mut conflicts).await?
            else {
                continue;
            };
            if stored[..] == bytes[..] {
                *self.current.lock() = m;
                return Ok(());
            }
            let claim = self.claim.lock().clone();
            match Manifest::decode(&stored) {
                Ok(earlier) if claim.is_some() && earlier.writer == claim => {
                    tracing::info!(manifest = %name, "an earlier manifest write had landed; writing on top of it");
                    *self.current.lock() = earlier;
                }
                _ => {
                    return Err(life.fail(VolumeError::Fenced(format!(
                        "{name} was written by another writer: {location} has been taken over"
                    ))))
                }
            }
        }
    }
}
