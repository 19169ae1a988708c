//! Clones: a writable volume that reads what it has not written from a
//! snapshot of its parent, and the pins in the parent's store that keep
//! the snapshot from being deleted under it. docs/design/clones.md has the
//! design and its invariants.

use std::sync::Arc;

use hlfs_format::{
    manifest_name, parse_pin_name, pin_name, Entry, ParentLink, Pin, RecordKind, FORMAT_CLONES,
    MAX_ADDRESS_LEN, PINS_PREFIX,
};
use hlfs_store::{BlobStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::info::utc;
use crate::manifest::latest_manifest;
use crate::open::first_manifest;
use crate::options::{OpenOptions, View};
use crate::retain::is_point;
use crate::snapshot::IMPORT_GUARD;
use crate::volume::Volume;

/// Clones of clones may go this deep, counting from a volume that is no
/// clone; each level adds a map lookup to a read of what no level above
/// has written.
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// A pin whose clone is not there (or no longer links to its parent) is
/// removed once it is this old: younger, its clone may still be being
/// made (the pin is put before the clone's first manifest).
const STALE_PIN_AGE_MS: u64 = 60 * 1000;

/// A deletion mark older than this is left by a deleter that died: it no
/// longer refuses clones.
const STALE_MARK_AGE_MS: u64 = 10 * 60 * 1000;

/// The blob that says snapshot `lsn` is being deleted, beside the pins
/// (a name no pin has).
fn deletion_mark(lsn: u64) -> String {
    format!("{PINS_PREFIX}deleting-{lsn}")
}

/// What an open clone reads its unwritten blocks from.
pub(crate) struct Parent {
    /// The parent snapshot, open read-only (following the parent's
    /// cleaning, as any view does).
    pub view: Volume,
    /// Blocks of the parent snapshot: unwritten blocks past them read as
    /// zeros (the clone was grown).
    pub blocks: u64,
    pub link: ParentLink,
    /// Clones above this one, 1 for a clone of a volume that is no clone.
    pub depth: u32,
}

/// What `hlfs clone` made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneInfo {
    pub uuid: String,
    pub size: u64,
    pub parent: ParentInfo,
}

/// A clone's parent, as `hlfs info` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentInfo {
    pub address: String,
    pub uuid: String,
    pub snapshot: String,
    pub snapshot_lsn: u64,
    pub size: u64,
}

impl From<&ParentLink> for ParentInfo {
    fn from(l: &ParentLink) -> Self {
        ParentInfo {
            address: l.address.clone(),
            uuid: uuid::Uuid::from_bytes(l.volume).to_string(),
            snapshot: l.snapshot.clone(),
            snapshot_lsn: l.snapshot_lsn,
            size: l.size,
        }
    }
}

/// Opens the parent a clone's manifest links to, `depth` levels below the
/// volume being opened.
pub(crate) async fn open_parent(
    backend: &Backend,
    link: &ParentLink,
    opts: &OpenOptions,
    depth: u32,
    block_size: u32,
) -> Result<Parent> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(VolumeError::corrupt(format!(
            "{}: a chain of clones deeper than {MAX_CHAIN_DEPTH}",
            backend.location
        )));
    }
    let parent_backend = backend
        .open_other(&link.address)?
        .with_time(backend.clock.clone(), backend.jitter.clone());
    let opts = OpenOptions {
        auto_clean: None,
        ..opts.clone()
    };
    let snapshot = View::Snapshot(link.snapshot.clone());
    let view = Volume::open_view_in_chain(parent_backend, &opts, snapshot, depth)
        .await
        .map_err(|e| match e {
            VolumeError::NotFound(_) | VolumeError::SnapshotNotFound(_) => {
                VolumeError::NotFound(format!(
                    "{}, the parent of clone {} (its snapshot {:?}: {e})",
                    link.address, backend.location, link.snapshot
                ))
            }
            e => e,
        })?;
    let core = view.core();
    let lsn = core.find_snapshot(&link.snapshot).map(|s| s.lsn);
    if core.uuid != link.volume || lsn != Some(link.snapshot_lsn) {
        return Err(VolumeError::NotFound(format!(
            "{}, the parent of clone {}: the volume there is not the one the clone was made from (volume {}, snapshot {:?} at LSN {})",
            link.address,
            backend.location,
            uuid::Uuid::from_bytes(link.volume),
            link.snapshot,
            link.snapshot_lsn
        )));
    }
    if core.block_size != block_size || core.size() != link.size {
        return Err(VolumeError::corrupt(format!(
            "clone {}: its parent {} has another block size or size than the link says",
            backend.location, link.address
        )));
    }
    let parent_depth = core.parent().map_or(0, |p| p.depth);
    Ok(Parent {
        blocks: link.size.div_ceil(block_size as u64),
        link: link.clone(),
        depth: parent_depth + 1,
        view,
    })
}

/// Makes `clone` a clone of snapshot `snapshot` of the volume at `parent`:
/// a pin in the parent's store, then the clone's first manifest. Nothing
/// is copied. Addresses are as they are to be stored: absolute.
pub async fn clone_volume(
    parent: Backend,
    snapshot: &str,
    clone: &Backend,
    opts: &OpenOptions,
) -> Result<CloneInfo> {
    for address in [&parent.location, &clone.location] {
        if address.len() > MAX_ADDRESS_LEN {
            return Err(VolumeError::InvalidArgument(format!(
                "volume address of {} bytes: at most {MAX_ADDRESS_LEN}",
                address.len()
            )));
        }
    }
    if is_point(snapshot) || snapshot == IMPORT_GUARD {
        return Err(VolumeError::SnapshotNotFound(snapshot.to_string()));
    }
    let clone_store = clone.requests();
    match latest_manifest(&*clone_store, &clone.location).await {
        Err(VolumeError::NotFound(_)) => {}
        Ok(_) | Err(VolumeError::Corrupt(_)) => {
            return Err(VolumeError::AlreadyExists(clone.location.clone()))
        }
        Err(e) => return Err(e),
    }
    let parent_store = parent.requests();
    let view = Volume::open_read_only(
        parent.clone(),
        &OpenOptions {
            auto_clean: None,
            ..opts.clone()
        },
        View::Snapshot(snapshot.to_string()),
    )
    .await?;
    let core = view.core();
    let depth = core.parent().map_or(0, |p| p.depth);
    if depth >= MAX_CHAIN_DEPTH {
        return Err(VolumeError::InvalidArgument(format!(
            "{} is already a clone {depth} levels deep; clones may go {MAX_CHAIN_DEPTH} deep (flatten one first)",
            parent.location
        )));
    }
    let entry = core
        .find_snapshot(snapshot)
        .ok_or_else(|| VolumeError::SnapshotNotFound(snapshot.to_string()))?;
    let link = ParentLink {
        address: parent.location.clone(),
        volume: core.uuid,
        snapshot: snapshot.to_string(),
        snapshot_lsn: entry.lsn,
        size: core.size(),
    };
    let now = clone.clock.unix_ms();
    let id = *uuid::Uuid::new_v4().as_bytes();
    let pin = Pin {
        clone: id,
        clone_address: clone.location.clone(),
        snapshot: snapshot.to_string(),
        snapshot_lsn: entry.lsn,
        created_ms: now,
    };
    parent_store
        .put_if_absent(&pin_name(&id), pin.encode().into())
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(_) | StoreError::NotFound(_) => VolumeError::Store(e),
            e => VolumeError::InvalidArgument(format!(
                "cannot pin snapshot {snapshot:?} in {}'s store (making a clone needs write access there): {e}",
                parent.location
            )),
        })?;
    let made = async {
        // The pin is in: a deletion that marks the snapshot from now on
        // finds it. One that marked it before is refused here.
        let mark = deletion_mark(entry.lsn);
        let marks = match parent_store.list(&mark).await {
            Ok(l) => l,
            Err(StoreError::NotFound(_)) => Vec::new(),
            // Not knowing is not a green light.
            Err(e) => return Err(e.into()),
        };
        if let Some(m) = marks.iter().find(|b| b.name == mark) {
            if now.saturating_sub(m.modified_ms) < STALE_MARK_AGE_MS {
                return Err(VolumeError::Busy(format!(
                    "snapshot {snapshot:?} of {} is being deleted",
                    parent.location
                )));
            }
        }
        let m = latest_manifest(&*parent_store, &parent.location).await?;
        if !m
            .snapshots
            .iter()
            .any(|s| s.name == snapshot && s.lsn == entry.lsn)
        {
            return Err(VolumeError::SnapshotNotFound(snapshot.to_string()));
        }
        let manifest = first_manifest(
            FORMAT_CLONES,
            id,
            now,
            (core.block_size, core.segment_size, link.size),
            Some(link.clone()),
        );
        clone_store
            .put_if_absent(&manifest_name(1), manifest.encode().into())
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists(_) => VolumeError::AlreadyExists(clone.location.clone()),
                e => e.into(),
            })
    }
    .await;
    if let Err(e) = made {
        // Best effort: a pin left behind is stale, and removed later.
        let _ = parent_store.delete(&pin_name(&id)).await;
        return Err(e);
    }
    Ok(CloneInfo {
        uuid: uuid::Uuid::from_bytes(id).to_string(),
        size: link.size,
        parent: ParentInfo::from(&link),
    })
}

/// The pins in a volume's store, with their blob times. A pin that does
/// not decode counts, so that damage never lets a snapshot go.
pub(crate) async fn pins(store: &dyn BlobStore) -> Result<Vec<(Result<Pin>, u64, String)>> {
    let list = match store.list(PINS_PREFIX).await {
        Ok(l) => l,
        Err(StoreError::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for blob in list {
        let Some(id) = parse_pin_name(&blob.name) else {
            continue;
        };
        let pin = match store.get(&blob.name).await {
            Ok(bytes) => Pin::decode(&bytes)
                .map_err(|e| VolumeError::corrupt(format!("{}: {e}", blob.name)))
                .and_then(|p| {
                    if p.clone == id {
                        Ok(p)
                    } else {
                        Err(VolumeError::corrupt(format!(
                            "{}: names another clone",
                            blob.name
                        )))
                    }
                }),
            // Removed since the listing.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        out.push((pin, blob.modified_ms, blob.name));
    }
    Ok(out)
}

impl Core {
    /// Marks snapshot `lsn` as being deleted (see `clone_volume`), and
    /// returns the mark's name, for the caller to remove.
    pub(crate) async fn mark_deletion(&self, lsn: u64) -> Result<String> {
        let mark = deletion_mark(lsn);
        let body = bytes::Bytes::from_static(b"HLFS snapshot deletion in progress\n");
        match self.store.put_if_absent(&mark, body.clone()).await {
            // Left by a deletion that died: ours now.
            Err(StoreError::AlreadyExists(_)) => {
                self.store.delete(&mark).await?;
                self.store.put_if_absent(&mark, body).await?;
            }
            result => result?,
        }
        Ok(mark)
    }

    pub(crate) fn parent(&self) -> Option<Arc<Parent>> {
        self.parent.read().clone()
    }

    /// Blocks below this read from the parent where unwritten.
    pub(crate) fn parent_blocks(&self) -> u64 {
        self.parent.read().as_ref().map_or(0, |p| p.blocks)
    }

    /// The clones of this volume's snapshots, by snapshot name and LSN:
    /// their addresses, as the pins say (a pin outlives a clone deleted
    /// behind its parent's back until a deletion of its snapshot removes
    /// it).
    pub(crate) async fn clones(&self) -> Result<Vec<(String, u64, String)>> {
        let mut out = Vec::new();
        for (pin, _, _) in pins(&*self.store).await? {
            if let Ok(p) = pin {
                out.push((p.snapshot, p.snapshot_lsn, p.clone_address));
            }
        }
        Ok(out)
    }

    /// Refuses to delete snapshot `name` (at `lsn`) while a clone reads it,
    /// naming the clones. Pins whose clone is gone, or no longer links to
    /// this snapshot, are removed once old enough.
    pub(crate) async fn refuse_if_cloned(&self, name: &str, lsn: u64) -> Result<()> {
        let now = self.clock.unix_ms();
        let mut holders = Vec::new();
        for (pin, made_ms, blob) in pins(&*self.store).await? {
            let pin = match pin {
                Ok(p) if p.snapshot != name || p.snapshot_lsn != lsn => continue,
                Ok(p) => p,
                Err(e) => {
                    holders.push(format!("{blob} (unreadable: {e})"));
                    continue;
                }
            };
            match self.clone_links_here(&pin).await {
                Ok(true) => holders.push(pin.clone_address),
                Ok(false) if now.saturating_sub(made_ms) >= STALE_PIN_AGE_MS => {
                    tracing::info!(clone = %pin.clone_address, snapshot = name, "removing the pin of a clone that is gone");
                    self.store.delete(&blob).await?;
                }
                Ok(false) => holders.push(format!(
                    "{} (being made, or gone since {})",
                    pin.clone_address,
                    utc(made_ms)
                )),
                // Unreachable: it counts.
                Err(e) => holders.push(format!("{} (not reachable: {e})", pin.clone_address)),
            }
        }
        if holders.is_empty() {
            return Ok(());
        }
        Err(VolumeError::InvalidArgument(format!(
            "snapshot {name:?} has clones, which read from it: {}; flatten or delete them first",
            holders.join(", ")
        )))
    }

    /// Whether the volume at a pin's address is that clone, linked to this
    /// volume's snapshot.
    async fn clone_links_here(&self, pin: &Pin) -> Result<bool> {
        let backend = self.backend.open_other(&pin.clone_address)?;
        match latest_manifest(&*backend.requests(), &backend.location).await {
            Ok(m) => Ok(m.volume == pin.clone
                && m.parent.is_some_and(|l| {
                    l.volume == self.uuid
                        && l.snapshot == pin.snapshot
                        && l.snapshot_lsn == pin.snapshot_lsn
                })),
            Err(VolumeError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// An absolute form of a local volume's address (paths are made absolute;
/// URIs are kept), as a clone or a pin stores it.
pub fn absolute_address(address: &str) -> Result<String> {
    if address.contains("://") {
        return Ok(address.to_string());
    }
    std::path::absolute(address)
        .map(|p| p.display().to_string())
        .map_err(|e| VolumeError::InvalidArgument(format!("volume address {address:?}: {e}")))
}

/// Blocks a flatten step copies at most (at 4 KiB blocks, 1 MiB).
const FLATTEN_STEP_BLOCKS: u64 = 256;

/// What a flatten did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlattenReport {
    /// Bytes read from the parent and written into the clone (blocks of
    /// zeros need no copy: with the link gone, unwritten reads as zeros).
    pub copied_bytes: u64,
    /// The parent's size: what the flatten went through.
    pub parent_bytes: u64,
    pub seconds: f64,
}

/// Where a flatten is: bytes of the parent gone through, of `total`.
#[derive(Clone, Copy, Debug)]
pub struct FlattenProgress {
    pub done: u64,
    pub total: u64,
}

impl Core {
    /// Copies into the clone every block it still reads from its parent,
    /// then drops the link (a checkpoint's manifest) and the pin. Guest
    /// writes go on meanwhile: a copy is made, under the writer lock, only
    /// of blocks still unwritten then. Refused while the clone has
    /// snapshots or a retention window, which would still read the parent.
    pub(crate) async fn flatten(
        &self,
        progress: &(dyn Fn(&FlattenProgress) + Send + Sync),
    ) -> Result<FlattenReport> {
        let started = std::time::Instant::now();
        let Some(parent) = self.parent() else {
            return Err(VolumeError::InvalidArgument(format!(
                "{} is not a clone: nothing to flatten",
                self.location()
            )));
        };
        self.refuse_flatten_with_history()?;
        let bs = self.block_size as u64;
        let size = parent.link.size;
        let mut copied = 0;
        let mut entries = vec![Entry::EMPTY; FLATTEN_STEP_BLOCKS as usize];
        let mut buf = vec![0u8; (FLATTEN_STEP_BLOCKS * bs) as usize];
        // Only where the parent has data: its holes read the same without
        // the link.
        let mut pos = 0;
        while pos < size {
            let extents = parent.view.extents(pos, size - pos, 1024).await?;
            let Some(last) = extents.last() else { break };
            pos = last.offset + last.len;
            for x in extents.iter().filter(|x| x.data) {
                let mut block = x.offset / bs;
                let end_block = (x.offset + x.len).div_ceil(bs);
                while block < end_block {
                    self.life.check(crate::lifecycle::Need::Write)?;
                    let n = FLATTEN_STEP_BLOCKS.min(end_block - block) as usize;
                    self.map_op(|m, pins| m.lookup(block, &mut entries[..n], pins))
                        .await?;
                    if entries[..n].iter().any(Entry::is_unwritten) {
                        // The parent's last, partial block is zero-filled.
                        let len = (n as u64 * bs).min(size - block * bs) as usize;
                        buf[len..].fill(0);
                        parent.view.read_into(block * bs, &mut buf[..len]).await?;
                        copied += self.copy_unwritten(block, &buf[..n * bs as usize]).await?;
                    }
                    block += n as u64;
                    progress(&FlattenProgress {
                        done: (block * bs).min(size),
                        total: size,
                    });
                }
            }
        }
        progress(&FlattenProgress {
            done: size,
            total: size,
        });
        let mut w = self.log.writer.lock().await;
        self.life.check(crate::lifecycle::Need::Write)?;
        self.refuse_flatten_with_history()?;
        // Nothing is unwritten below the parent's size any more but blocks
        // of zeros, which read the same without the link.
        self.checkpoint(&mut w, true, |m, _, _| {
            m.parent = None;
            Ok(())
        })
        .await?;
        *self.parent.write() = None;
        drop(w);
        // The link is gone for good: the pin has nothing left to protect.
        let parent_store = parent.view.core().store.clone();
        if let Err(e) = parent_store.delete(&pin_name(&self.uuid)).await {
            tracing::warn!(error = %e, parent = %parent.link.address, "flattened, but the pin in the parent's store stays (removed when the snapshot is next deleted)");
        }
        Ok(FlattenReport {
            copied_bytes: copied,
            parent_bytes: size,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn refuse_flatten_with_history(&self) -> Result<()> {
        let (snapshots, retaining) = self.manifests.read(|m| {
            let names: Vec<String> = m.snapshots.iter().map(|s| s.name.clone()).collect();
            (names, m.retention.window_ms > 0)
        });
        if retaining {
            return Err(VolumeError::InvalidArgument(format!(
                "{} keeps a retention window, whose moments read from the parent: turn it off (hlfs retain VOLUME off) before flattening",
                self.location()
            )));
        }
        if !snapshots.is_empty() {
            return Err(VolumeError::InvalidArgument(format!(
                "{} has snapshots, which read from the parent: {}; delete them before flattening",
                self.location(),
                snapshots.join(", ")
            )));
        }
        Ok(())
    }

    /// Writes, from block `first` on, the blocks of `data` that are still
    /// unwritten and not all zeros; returns the bytes written.
    async fn copy_unwritten(&self, first: u64, data: &[u8]) -> Result<u64> {
        let bs = self.block_size as usize;
        let n = data.len() / bs;
        let mut w = self.log.writer.lock().await;
        self.life.check(crate::lifecycle::Need::Write)?;
        self.make_room(&mut w).await?;
        let mut entries = vec![Entry::EMPTY; n];
        self.map_op(|m, pins| m.lookup(first, &mut entries, pins))
            .await?;
        let wanted = |k: usize| {
            entries[k].is_unwritten() && data[k * bs..(k + 1) * bs].iter().any(|&b| b != 0)
        };
        let mut copied = 0;
        let mut k = 0;
        while k < n {
            if !wanted(k) {
                k += 1;
                continue;
            }
            let mut run = 1;
            while k + run < n && wanted(k + run) {
                run += 1;
            }
            let at = first + k as u64;
            self.mark_time(&mut w)?;
            let payload = &data[k * bs..(k + run) * bs];
            let placed = self.append_blocks(&mut w, RecordKind::Data, at, payload)?;
            w.changed = true;
            self.map_op(|m, pins| m.set(at, &placed, pins)).await?;
            self.after_append(&mut w).await?;
            copied += payload.len() as u64;
            k += run;
        }
        Ok(copied)
    }
}
