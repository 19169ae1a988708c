//! Snapshots and rollback.
//!
//! A snapshot is a saved checkpoint location: taking one seals the open
//! segment with a checkpoint (so every page is clean) and writes a manifest
//! that lists it, at a cost bounded by the map budget, whatever the volume's
//! size. Rollback keeps the abandoned head as an automatic snapshot and
//! points the head at the snapshot's checkpoint in the same manifest.

use std::sync::atomic::Ordering;

use hlfs_format::{Entry, Manifest, SnapshotEntry, MAX_NAME_LEN};

use crate::checkpoint::checkpoint_of;
use crate::core::{Core, Shows};
use crate::error::{Result, VolumeError};
use crate::info::utc;
use crate::lifecycle::Need;
use crate::log::Writer;
use crate::map::SegmentUsage;
use crate::options::{OpenOptions, SnapshotInfo, View};

/// Checks a snapshot name: printable, no separators the CLI or export names use.
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidArgument(format!(
            "invalid snapshot name {name:?}: use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 - _ . : + (not starting with -)"
        )))
    }
}

/// The snapshot an import keeps of the head it started from, while it
/// runs: a name no user can give (it starts with '-').
pub const IMPORT_GUARD: &str = "-import-diff-in-progress";

/// In a rollback's manifest: the head it abandons (checkpoint `at`, LSN
/// `lsn`) as an automatic snapshot named after where the rollback went
/// (`to`); returns its name.
fn keep_abandoned_head(m: &mut Manifest, to: &str, at: Entry, lsn: u64, stamp: u64) -> String {
    let name = unused_name(m, &format!("before-rollback-to-{to}"), stamp);
    m.snapshots.push(SnapshotEntry {
        name: name.clone(),
        checkpoint: at,
        lsn,
        created_ms: stamp,
        automatic: true,
    });
    name
}

/// Retention points are the engine's: they go with the window, and a
/// moment is rolled back to by its time.
fn refuse_point(name: &str) -> Result<()> {
    if crate::retain::is_point(name) {
        return Err(VolumeError::InvalidArgument(format!(
            "{name} is a retention point, kept by the retention window: turn the window off (hlfs retain VOLUME off), or roll back to a moment by its time"
        )));
    }
    Ok(())
}

/// `base` (cut to fit) and `stamp`, with a number added if a snapshot has
/// that name already.
fn unused_name(m: &Manifest, base: &str, stamp: u64) -> String {
    let base: String = base.chars().take(MAX_NAME_LEN - 24).collect();
    let mut candidate = format!("{base}-{stamp}");
    let mut k = 1;
    while m.snapshots.iter().any(|s| s.name == candidate) {
        candidate = format!("{base}-{stamp}-{k}");
        k += 1;
    }
    candidate
}

impl Core {
    /// The snapshots, without the retention points.
    pub(crate) fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.manifests.read(|m| {
            m.snapshots
                .iter()
                .filter(|s| !crate::retain::is_point(&s.name))
                .map(SnapshotInfo::from)
                .collect()
        })
    }

    pub(crate) fn find_snapshot(&self, name: &str) -> Option<SnapshotEntry> {
        self.manifests
            .read(|m| m.snapshots.iter().find(|s| s.name == name).cloned())
    }

    /// Takes a snapshot holding every write acknowledged before the call.
    pub(crate) async fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        validate_snapshot_name(name)?;
        self.take_snapshot(name, false).await
    }

    /// Starts an import (`diff_stream::import_diff`): the head as it is
    /// becomes the guard snapshot, which an import that fails, or is cut
    /// off by a crash, rolls the head back to.
    pub(crate) async fn begin_import(&self) -> Result<()> {
        if self.find_snapshot(IMPORT_GUARD).is_some() {
            return Err(VolumeError::Busy(format!(
                "an import into {} is under way",
                self.location()
            )));
        }
        self.take_snapshot(IMPORT_GUARD, true).await.map(|_| ())
    }

    /// Ends an import. With `Some(to)` it kept what it wrote: the head as
    /// it is becomes snapshot `to` (if named) and the guard goes, in one
    /// manifest. With None it failed: the head goes back to the guard,
    /// which goes too, in one manifest, and nothing it wrote is kept.
    pub(crate) async fn end_import(&self, kept: Option<Option<&str>>) -> Result<()> {
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        let guard = self
            .find_snapshot(IMPORT_GUARD)
            .ok_or_else(|| VolumeError::SnapshotNotFound(IMPORT_GUARD.to_string()))?;
        let created_ms = self.clock.unix_ms();
        let Some(to) = kept else {
            return self
                .reset_head_to(&mut w, &guard, |m, _, _| {
                    m.snapshots.retain(|s| s.name != IMPORT_GUARD);
                    Ok(())
                })
                .await;
        };
        self.checkpoint(&mut w, true, |m, at, lsn| {
            m.snapshots.retain(|s| s.name != IMPORT_GUARD);
            if let Some(to) = to {
                if m.snapshots
                    .iter()
                    .any(|s| s.name == to && s.checkpoint == at)
                {
                    // An earlier attempt whose answer was lost landed.
                    return Ok(());
                }
                if m.snapshots.iter().any(|s| s.name == to) {
                    return Err(VolumeError::SnapshotExists(to.to_string()));
                }
                m.snapshots.push(SnapshotEntry {
                    name: to.to_string(),
                    checkpoint: at,
                    lsn,
                    created_ms,
                    automatic: false,
                });
            }
            Ok(())
        })
        .await
    }

    async fn take_snapshot(&self, name: &str, automatic: bool) -> Result<SnapshotInfo> {
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        if self.find_snapshot(name).is_some() {
            return Err(VolumeError::SnapshotExists(name.to_string()));
        }
        let created_ms = self.clock.unix_ms();
        let mut taken = None;
        self.checkpoint(&mut w, true, |m, at, lsn| {
            // Again on the manifest written: an earlier attempt whose
            // answer was lost may have taken it already.
            if m.snapshots.iter().any(|s| s.name == name) {
                return Err(VolumeError::SnapshotExists(name.to_string()));
            }
            let s = SnapshotEntry {
                name: name.to_string(),
                checkpoint: at,
                lsn,
                created_ms,
                automatic,
            };
            taken = Some(SnapshotInfo::from(&s));
            m.snapshots.push(s);
            Ok(())
        })
        .await?;
        Ok(taken.expect("the checkpoint ran the edit"))
    }

    pub(crate) async fn snapshot_delete(&self, name: &str) -> Result<()> {
        refuse_point(name)?;
        self.life.check(Need::Write)?;
        let _w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        let Some(snapshot) = self.find_snapshot(name) else {
            return Err(VolumeError::SnapshotNotFound(name.to_string()));
        };
        // A clone being made now either sees the mark and fails, or put
        // its pin before the mark, which the listing then finds.
        let mark = self.mark_deletion(snapshot.lsn).await?;
        let deleted = async {
            self.refuse_if_cloned(name, snapshot.lsn).await?;
            self.write_manifest(&*self.store, |m| {
                m.snapshots.retain(|s| s.name != name);
                Ok(())
            })
            .await
        }
        .await;
        if let Err(e) = self.store.delete(&mark).await {
            tracing::warn!(error = %e, %mark, "could not remove a snapshot's deletion mark (clones of it are refused until it is 10 minutes old)");
        }
        deleted
    }

    /// Makes the head snapshot `target`'s (its tree and size) with a
    /// checkpoint whose manifest `edit` also changes (it gets the abandoned
    /// head's checkpoint place and LSN, and may refuse), then switches the
    /// head in memory to it.
    async fn reset_head_to(
        &self,
        w: &mut Writer,
        target: &SnapshotEntry,
        mut edit: impl FnMut(&mut Manifest, Entry, u64) -> Result<()>,
    ) -> Result<()> {
        let (cp, _) = self.segments.read_checkpoint(target.checkpoint).await?;
        self.checkpoint(w, true, |m, at, lsn| {
            edit(m, at, lsn)?;
            m.checkpoint = target.checkpoint;
            m.size = cp.size;
            Ok(())
        })
        .await?;
        let usage = SegmentUsage::from_checkpoint(self.block_size, cp.allocated_blocks, &cp.usage);
        self.map.lock().reset(cp.root, cp.depth, usage);
        self.size.store(cp.size, Ordering::SeqCst);
        Ok(())
    }

    /// Makes the head equal to snapshot `name`. The abandoned head is kept
    /// as an automatic snapshot, whose name is returned.
    pub(crate) async fn rollback(&self, name: &str) -> Result<String> {
        refuse_point(name)?;
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        let target = self
            .find_snapshot(name)
            .ok_or_else(|| VolumeError::SnapshotNotFound(name.to_string()))?;
        let stamp = self.clock.unix_ms();
        let mut auto_name = String::new();
        self.reset_head_to(&mut w, &target, |m, at, lsn| {
            // Again on the manifest written: an earlier attempt whose
            // answer was lost may have changed the snapshots.
            if !m.snapshots.contains(&target) {
                return Err(VolumeError::SnapshotNotFound(name.to_string()));
            }
            auto_name = keep_abandoned_head(m, name, at, lsn, stamp);
            Ok(())
        })
        .await?;
        Ok(auto_name)
    }

    /// Writes the tree of moment `t` of the retention window (its point's,
    /// with the log after it replayed up to `t`) to the log, with a
    /// checkpoint record of it: a snapshot entry for the moment, unnamed.
    async fn write_moment(&self, w: &mut Writer, t: u64) -> Result<SnapshotEntry> {
        let not_in_window = || {
            VolumeError::SnapshotNotFound(format!("(no moment {} in the retention window)", utc(t)))
        };
        let moment = match crate::open::open_read_only(
            self.backend.clone(),
            &OpenOptions::default(),
            View::AsOf(t),
        )
        .await
        {
            Ok(view) if matches!(view.shows, Shows::Moment { .. }) => view,
            Ok(_) | Err(VolumeError::SnapshotNotFound(_)) => return Err(not_in_window()),
            Err(e) => return Err(e),
        };
        self.write_back_tree(w, &moment.map, None)?;
        let cp = checkpoint_of(&moment.map, moment.size());
        let (at, lsn) = self.append_checkpoint_record(w, &cp)?;
        Ok(SnapshotEntry {
            name: String::new(),
            checkpoint: at,
            lsn,
            created_ms: t,
            automatic: true,
        })
    }

    /// Makes the head what it was at moment `t` of the retention window,
    /// resetting it to the moment's tree as to a snapshot. The abandoned
    /// head is kept as an automatic snapshot, whose name is returned.
    pub(crate) async fn rollback_to_moment(&self, t: u64) -> Result<String> {
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        let target = self.write_moment(&mut w, t).await?;
        let stamp = self.clock.unix_ms();
        let label = moment_label(t);
        let mut auto_name = String::new();
        self.reset_head_to(&mut w, &target, |m, at, lsn| {
            auto_name = keep_abandoned_head(m, &label, at, lsn, stamp);
            Ok(())
        })
        .await?;
        Ok(auto_name)
    }

    /// Keeps moment `t` of the retention window as an automatic snapshot
    /// (named `moment-` and its time), so that it outlives the window;
    /// returns its name. A moment kept so before is not kept twice.
    pub(crate) async fn keep_moment(&self, t: u64) -> Result<String> {
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        let name = format!("moment-{}", moment_label(t));
        let kept = |m: &Manifest| {
            m.snapshots
                .iter()
                .any(|s| s.name == name && s.automatic && s.created_ms == t)
        };
        if self.manifests.read(kept) {
            return Ok(name);
        }
        if self.find_snapshot(&name).is_some() {
            return Err(VolumeError::SnapshotExists(name));
        }
        let mut snapshot = self.write_moment(&mut w, t).await?;
        snapshot.name = name.clone();
        self.checkpoint(&mut w, true, |m, _, _| {
            // Again on the manifest written: an earlier attempt whose
            // answer was lost may have kept it already.
            if kept(m) {
                return Ok(());
            }
            if m.snapshots.iter().any(|s| s.name == name) {
                return Err(VolumeError::SnapshotExists(name.clone()));
            }
            m.snapshots.push(snapshot.clone());
            Ok(())
        })
        .await?;
        Ok(name)
    }
}

/// Moment `t` in a snapshot name: its UTC time to the millisecond, in
/// the characters a name may hold.
fn moment_label(t: u64) -> String {
    format!(
        "{}.{:03}Z",
        utc(t).trim_end_matches(" UTC").replace(' ', "T"),
        t % 1000
    )
}
