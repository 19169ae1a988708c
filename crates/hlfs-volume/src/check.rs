//! Offline verification: every manifest, every record of every segment, and
//! every map page and data block reachable from the head and the snapshots.

use std::collections::HashSet;

use hlfs_format::{
    manifest_name, parse_journal_name, parse_manifest_name, parse_segment_name, segment_name,
    Entry, Manifest,
};
use hlfs_store::StoreError;

use crate::backend::Backend;
use crate::cache::ReadCache;
use crate::error::{Result, VolumeError};
use crate::map::TreeWalk;
use crate::options::{OpenOptions, View};
use crate::segments::{ScanSource, ScanStop, Scanner, Segments};
use crate::volume::Volume;

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Damage: each names where it is.
    pub problems: Vec<String>,
    /// Not damage, but worth knowing (e.g. a torn journal tail a crash left).
    pub warnings: Vec<String>,
    pub manifests: u64,
    pub segments: u64,
    pub records: u64,
    pub map_pages: u64,
    pub blocks: u64,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Bytes of a remote volume's segments a check keeps locally at most.
const SCRATCH_CACHE: u64 = 1 << 30;

/// Checks the volume at `backend` without changing it. Errors only if there
/// is no volume or the store fails; damage goes in the report.
pub async fn check(backend: Backend) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let store = backend.requests();

    let mut newest: Option<Manifest> = None;
    let listed = match store.list("manifest/").await {
        Ok(l) => l,
        Err(StoreError::NotFound(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut seqs: Vec<u64> = listed
        .iter()
        .filter_map(|b| parse_manifest_name(&b.name))
        .collect();
    seqs.sort_unstable();
    if seqs.is_empty() {
        return Err(VolumeError::NotFound(backend.location.clone()));
    }
    for &seq in &seqs {
        let name = manifest_name(seq);
        report.manifests += 1;
        match Manifest::decode(&store.get(&name).await?) {
            Ok(m) if m.seq == seq => newest = Some(m),
            Ok(m) => report
                .problems
                .push(format!("{name}: says it is manifest {}", m.seq)),
            Err(e) => report.problems.push(format!("{name}: {e}")),
        }
    }
    let newest_seq = *seqs.last().expect("not empty");
    let Some(manifest) = newest else {
        report.problems.push("no readable manifest".into());
        return Ok(report);
    };
    if manifest.seq != newest_seq {
        report.problems.push(format!(
            "the newest manifest ({}) is unreadable",
            manifest_name(newest_seq)
        ));
    }
    let uuid = manifest.volume;

    // Every record of every sealed segment, then the journals. Journals are
    // listed first: one a writer seals meanwhile is then in the store list.
    let journals = backend.journal.list()?;
    let mut last_lsn = 0u64;
    for blob in store.list("segments/").await? {
        let Some(id) = parse_segment_name(&blob.name) else {
            continue;
        };
        report.segments += 1;
        let reader = store.clone().open_reader(&blob.name).await?;
        let mut scan = Scanner::new(ScanSource::Store(reader), blob.size);
        let mut prev: Option<u64> = None;
        loop {
            match scan.next(&uuid).await? {
                Ok((off, h, _)) => {
                    report.records += 1;
                    if prev.is_some_and(|p| h.lsn != p + 1) || (prev.is_none() && h.lsn <= last_lsn)
                    {
                        report.problems.push(format!(
                            "{} offset {off}: LSN {} out of order",
                            blob.name, h.lsn
                        ));
                    }
                    prev = Some(h.lsn);
                }
                Err(ScanStop::End) => break,
                Err(ScanStop::Unwritten { offset }) => {
                    report.problems.push(format!(
                        "{} offset {offset}: zeros where a record should start",
                        segment_name(id)
                    ));
                    break;
                }
                Err(ScanStop::Invalid { offset, reason, .. }) => {
                    report
                        .problems
                        .push(format!("{} offset {offset}: {reason}", segment_name(id)));
                    break;
                }
            }
        }
        last_lsn = last_lsn.max(prev.unwrap_or(0));
    }
    for name in journals {
        if parse_journal_name(&name).is_none() {
            continue;
        }
        let file = match backend.journal.open(&name) {
            Ok(f) => f,
            // Sealed by a running writer since the listing; a later check covers it.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let len = file.len()?;
        let mut scan = Scanner::new(ScanSource::Journal(file.clone()), len);
        loop {
            match scan.next(&uuid).await? {
                Ok(_) => report.records += 1,
                Err(ScanStop::End) => break,
                // The window a served volume writes ahead of its log is
                // zeros to the end; anything else after them is a lost
                // write of the disk's.
                Err(ScanStop::Unwritten { offset }) => {
                    let rest = file.read_at(offset, (len - offset) as usize)?;
                    if let Some(at) = rest.iter().position(|&b| b != 0) {
                        report.warnings.push(format!(
                            "journal {name}: the log ends at offset {offset} (zeros), yet bytes follow at offset {}; they will be dropped at the next open, as after a crash",
                            offset + at as u64
                        ));
                    }
                    break;
                }
                Err(ScanStop::Invalid {
                    offset,
                    other_volume: true,
                    ..
                }) => {
                    report.problems.push(format!(
                        "journal {name} offset {offset}: a record of another volume (a journal directory shared by two addresses)"
                    ));
                    break;
                }
                Err(ScanStop::Invalid { offset, reason, .. }) => {
                    report.warnings.push(format!(
                        "journal {name}: the log ends at offset {offset} ({reason}); what follows will be dropped at the next open, as after a crash"
                    ));
                    break;
                }
            }
        }
    }

    // The map trees of the head checkpoint and of every snapshot.
    // Every byte comes from the store; a remote one is read in large
    // ranges through a cache of the check's own.
    let scratch = match backend.remote {
        true => Some(ReadCache::scratch(SCRATCH_CACHE)?),
        false => None,
    };
    let segments = Segments::new(store.clone(), scratch, uuid);
    let mut seen_pages = HashSet::new();
    let mut roots = vec![("head".to_string(), manifest.checkpoint)];
    roots.extend(
        manifest
            .snapshots
            .iter()
            .map(|s| (format!("snapshot {:?}", s.name), s.checkpoint)),
    );
    for (what, at) in roots {
        if at.is_empty() {
            continue;
        }
        let cp = match segments.read_checkpoint(at).await {
            Ok((cp, _)) => cp,
            Err(e) => {
                report.problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        let mut allocated = 0u64;
        let tree = Tree {
            root: cp.root,
            depth: cp.depth,
            block_size: manifest.block_size,
            what: &what,
        };
        let complete = walk_tree(
            &segments,
            &tree,
            &mut seen_pages,
            &mut allocated,
            &mut report,
        )
        .await;
        if complete && allocated != cp.allocated_blocks {
            report.problems.push(format!(
                "{what}: the map holds {allocated} blocks but its checkpoint says {}",
                cp.allocated_blocks
            ));
        }
    }

    // Finally, the head as an open would see it, unsealed writes included.
    if let Err(e) = Volume::open_read_only(backend, &OpenOptions::default(), View::Head).await {
        report.problems.push(format!("opening the head: {e}"));
    }
    Ok(report)
}

/// One tree to verify, and how to name it in the report.
struct Tree<'a> {
    root: Entry,
    depth: u32,
    block_size: u32,
    what: &'a str,
}

/// Verifies every page and data block of `tree`. Pages already checked
/// (shared with another snapshot) are counted but their blocks not read
/// again. Returns false if some page could not be read, so counts are
/// partial.
async fn walk_tree(
    segments: &Segments,
    tree: &Tree<'_>,
    seen: &mut HashSet<Entry>,
    allocated: &mut u64,
    report: &mut CheckReport,
) -> bool {
    let bs = tree.block_size as u64;
    let what = tree.what;
    let mut complete = true;
    let mut walk = TreeWalk::new(tree.root, tree.depth);
    while let Some(node) = walk.next_node() {
        let page = match segments.read_page(node.at).await {
            Ok(p) => p,
            Err(e) => {
                report.problems.push(format!("{what}: {e}"));
                complete = false;
                continue;
            }
        };
        let fresh = seen.insert(node.at);
        if fresh {
            report.map_pages += 1;
        }
        if node.level > 0 {
            walk.descend(&node, &page);
            continue;
        }
        *allocated += page.stored() as u64;
        if !fresh {
            continue;
        }
        for (slot, e) in page.entries.iter().enumerate() {
            if e.is_empty() {
                continue;
            }
            let lba = node.lba(slot);
            report.blocks += 1;
            match segments.read(e.seg, e.off as u64, bs as usize).await {
                Ok(data) if crc32c::crc32c(&data) == e.crc => {}
                Ok(_) => report.problems.push(format!(
                    "{what}: block {lba} ({} offset {}): checksum mismatch",
                    segment_name(e.seg),
                    e.off
                )),
                Err(err) => report.problems.push(format!("{what}: block {lba}: {err}")),
            }
        }
    }
    complete
}
