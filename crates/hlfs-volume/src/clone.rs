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
use crate::runner::{Runner, StopSignal, TaskContext};
use crate::snapshot::IMPORT_GUARD;
use crate::volume::Volume;
use tokio::sync::watch;

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
        if m.version < FORMAT_CLONES {
            return Err(VolumeError::InvalidArgument(format!(
                "{} is a format v{} volume: its writer must make it v{FORMAT_CLONES} before it is cloned, or a binary that knows no clones could delete the snapshot (hlfs clone does this)",
                parent.location, m.version
            )));
        }
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

/// Whether `clone_volume` can make a clone of snapshot `snapshot` of the
/// volume at `parent` as it is, without its writer: the snapshot is there
/// and the volume's format is v4 at least (else `Volume::offer_for_clone`
/// must run first).
pub async fn ready_for_clone(parent: &Backend, snapshot: &str) -> Result<bool> {
    let m = latest_manifest(&*parent.requests(), &parent.location).await?;
    Ok(m.version >= FORMAT_CLONES
        && !is_point(snapshot)
        && m.snapshots.iter().any(|s| s.name == snapshot))
}

/// What a clone is made from: a snapshot, or a moment of the retention
/// window (ms since the epoch), which is kept as a snapshot first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CloneSource {
    Snapshot(String),
    Moment(u64),
}

impl Core {
    /// Makes this volume ready to be cloned from `source` and returns the
    /// snapshot the clone is to link to. Its format becomes v4 at least,
    /// so that a binary that knows no pins refuses the volume rather than
    /// delete a snapshot a clone reads; a moment is kept as a snapshot.
    pub(crate) async fn offer_for_clone(&self, source: &CloneSource) -> Result<String> {
        let name = match source {
            CloneSource::Snapshot(name) => {
                if is_point(name) || name == IMPORT_GUARD || self.find_snapshot(name).is_none() {
                    return Err(VolumeError::SnapshotNotFound(name.clone()));
                }
                name.clone()
            }
            CloneSource::Moment(t) => self.keep_moment(*t).await?,
        };
        self.allow_format(FORMAT_CLONES).await?;
        Ok(name)
    }
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

/// The blob in a clone's store that says a flatten was asked for and has
/// not ended: a writable open of the clone goes on with it.
pub(crate) const FLATTEN_INTENT: &str = "clones/flattening";

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlattenProgress {
    pub done: u64,
    pub total: u64,
}

/// How fast a flatten copies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlattenOptions {
    /// Bytes copied per second at most; `None` copies as fast as the
    /// writer lock allows.
    pub copy_rate: Option<u64>,
    /// While clients are busy (a read or write in the last 100 ms), bytes
    /// copied per second at most, so that foreground I/O keeps priority.
    pub busy_rate: Option<u64>,
}

impl Default for FlattenOptions {
    /// As fast as it can while clients are quiet, 8 MiB/s while they are
    /// busy (the automatic cleaner's busy rate).
    fn default() -> Self {
        FlattenOptions {
            copy_rate: None,
            busy_rate: Some(8 << 20),
        }
    }
}

/// A flatten task's state, as those who wait on it see it.
#[derive(Clone, Debug)]
pub(crate) enum FlattenState {
    Running(FlattenProgress),
    /// Ended: its report, or its error's kind and message.
    Ended(std::result::Result<FlattenReport, (crate::ErrorKind, String)>),
}

/// Starts a flatten of `core` as a task of `runner` (the volume's), unless
/// one runs already, and returns its state to wait on. Refusals (not a
/// clone, snapshots, a retention window) come back at once.
pub(crate) fn start_flatten(
    core: &Arc<Core>,
    runner: &Runner,
    opts: FlattenOptions,
) -> Result<watch::Receiver<FlattenState>> {
    let mut job = core.flattening.lock();
    if let Some(running) = job
        .as_ref()
        .filter(|rx| matches!(*rx.borrow(), FlattenState::Running(_)))
    {
        return Ok(running.clone());
    }
    if core.parent().is_none() {
        return Err(VolumeError::InvalidArgument(format!(
            "{} is not a clone: nothing to flatten",
            core.location()
        )));
    }
    core.refuse_flatten_with_history()?;
    let (tx, rx) = watch::channel(FlattenState::Running(FlattenProgress::default()));
    *job = Some(rx.clone());
    let core = core.clone();
    runner.spawn("flatten", None, move |cx: TaskContext<()>| async move {
        let ended = core.flatten(opts, &tx, cx.stop).await;
        match &ended {
            Ok(report) => tracing::info!(volume = %core.location(), copied_bytes = report.copied_bytes, "flattened"),
            Err(e) => tracing::warn!(volume = %core.location(), error = %e, "flatten stopped"),
        }
        tx.send_replace(FlattenState::Ended(
            ended.map_err(|e| (e.kind(), e.to_string())),
        ));
        // Its failure is the flatten's, not the volume's.
        Ok(())
    });
    Ok(rx)
}

/// At a writable open: goes on with a flatten a stop or a crash cut off
/// (its intent blob is there), or removes the blob of one that ended
/// between dropping the link and removing the blob.
pub(crate) async fn resume_flatten(core: &Arc<Core>, runner: &Runner) -> Result<()> {
    if core.store.head(FLATTEN_INTENT).await?.is_none() {
        return Ok(());
    }
    if core.parent().is_none() {
        return remove_intent(core).await;
    }
    tracing::info!(volume = %core.location(), "going on with a flatten that was cut off");
    match start_flatten(core, runner, FlattenOptions::default()) {
        Ok(_) => Ok(()),
        // Snapshots or a window since: it cannot end; the user is told
        // when they ask again.
        Err(e) => {
            tracing::warn!(volume = %core.location(), error = %e, "a flatten that was cut off cannot go on");
            remove_intent(core).await
        }
    }
}

async fn remove_intent(core: &Core) -> Result<()> {
    match core.store.delete(FLATTEN_INTENT).await {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Core {
    /// The flatten task's body: its intent is put first, and removed once
    /// it ends, unless it stopped for a reason it can go on after.
    async fn flatten(
        &self,
        opts: FlattenOptions,
        state: &watch::Sender<FlattenState>,
        mut stop: StopSignal,
    ) -> Result<FlattenReport> {
        let body = bytes::Bytes::from_static(b"HLFS flatten in progress\n");
        match self.store.put_if_absent(FLATTEN_INTENT, body).await {
            // Resumed: it is there already.
            Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let ended = self.flatten_steps(opts, state, &mut stop).await;
        match &ended {
            // A stop (close), or the store or the log failing: the next
            // open goes on.
            Err(VolumeError::Closed) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    crate::ErrorKind::Io | crate::ErrorKind::Unavailable
                ) => {}
            _ => remove_intent(self).await?,
        }
        ended
    }

    /// Copies into the clone every block it still reads from its parent,
    /// then drops the link (a checkpoint's manifest) and the pin. Guest
    /// writes go on meanwhile: a copy is made, under the writer lock, only
    /// of blocks still unwritten then. Refused while the clone has
    /// snapshots or a retention window, which would still read the parent.
    async fn flatten_steps(
        &self,
        opts: FlattenOptions,
        state: &watch::Sender<FlattenState>,
        stop: &mut StopSignal,
    ) -> Result<FlattenReport> {
        let started = std::time::Instant::now();
        // `start_flatten` checked it is a clone without history; only it
        // drops the link, and the history is checked again at the end.
        let Some(parent) = self.parent() else {
            return Err(VolumeError::InvalidArgument(format!(
                "{} is not a clone: nothing to flatten",
                self.location()
            )));
        };
        let bs = self.block_size as u64;
        let size = parent.link.size;
        let report = |done: u64| {
            state.send_replace(FlattenState::Running(FlattenProgress { done, total: size }));
        };
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
                    if stop.is_stopped() {
                        return Err(VolumeError::Closed);
                    }
                    self.life.check(crate::lifecycle::Need::Write)?;
                    let step_started = self.clock.now();
                    let n = FLATTEN_STEP_BLOCKS.min(end_block - block) as usize;
                    self.map_op(|m, pins| m.lookup(block, &mut entries[..n], pins))
                        .await?;
                    let mut step_bytes = 0;
                    if entries[..n].iter().any(Entry::is_unwritten) {
                        // The parent's last, partial block is zero-filled.
                        let len = (n as u64 * bs).min(size - block * bs) as usize;
                        buf[len..].fill(0);
                        parent.view.read_into(block * bs, &mut buf[..len]).await?;
                        step_bytes = self.copy_unwritten(block, &buf[..n * bs as usize]).await?;
                        copied += step_bytes;
                    }
                    block += n as u64;
                    report((block * bs).min(size));
                    self.pace_flatten(&opts, step_bytes, step_started, stop)
                        .await?;
                }
            }
        }
        report(size);
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

    /// Waits, after a step that copied `bytes` from `step_started` on, for
    /// as long as the rate the clients' business calls for says.
    async fn pace_flatten(
        &self,
        opts: &FlattenOptions,
        bytes: u64,
        step_started: std::time::Duration,
        stop: &mut StopSignal,
    ) -> Result<()> {
        let now = self.clock.now();
        let rate = match (self.clients_busy(now), opts.busy_rate, opts.copy_rate) {
            (true, Some(busy), Some(copy)) => Some(busy.min(copy)),
            (true, Some(busy), None) => Some(busy),
            (_, _, copy) => copy,
        };
        let Some(rate) = rate.filter(|&r| r > 0) else {
            return Ok(());
        };
        let due = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
        let wait = due.saturating_sub(now.saturating_sub(step_started));
        if wait.is_zero() {
            return Ok(());
        }
        tokio::select! {
            () = self.clock.sleep(wait) => Ok(()),
            () = stop.stopped() => Err(VolumeError::Closed),
        }
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
