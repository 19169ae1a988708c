//! Manifests: small numbered blobs; the newest one says where the volume's
//! head is, which snapshots exist and who holds the writer claim.

use crate::wire::Reader;
use crate::{
    Entry, FormatError, Result, FORMAT_CLONES, FORMAT_V1, FORMAT_VERSION, MAX_BLOCK_SIZE,
    MAX_SEGMENT_SIZE, MIN_BLOCK_SIZE, MIN_SEGMENT_SIZE,
};

pub const MANIFEST_MAGIC: [u8; 4] = *b"HLMF";
/// Snapshot names and host names are at most this many bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Volume addresses (a path or a URI) are at most this many bytes.
pub const MAX_ADDRESS_LEN: usize = 4096;
const MAX_SNAPSHOTS: usize = 1 << 20;
const FLAG_WRITER_OPEN: u16 = 1;
const SNAP_AUTOMATIC: u32 = 1;

/// Who is writing the volume, if anyone.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WriterClaim {
    pub host: String,
    pub pid: u32,
    pub since_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub name: String,
    /// The checkpoint record holding the snapshot's map root.
    pub checkpoint: Entry,
    /// LSN of that checkpoint: the snapshot holds every record before it.
    pub lsn: u64,
    pub created_ms: u64,
    /// Taken by the engine (e.g. the head abandoned by a rollback).
    pub automatic: bool,
}

/// What the volume's log has taken since counting began (format v2): the
/// data clients wrote, and the bytes appended for it and for everything
/// else (map pages, checkpoints, cleaning's copies). Their ratio is the
/// write amplification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogCounters {
    /// When counting began: the volume's creation, or its upgrade from v1.
    pub since_ms: u64,
    pub written_bytes: u64,
    pub appended_bytes: u64,
}

/// Names of the snapshot entries that are retention points start so; no
/// user can give such a name (user names never start with `-`).
pub const RETENTION_POINT_PREFIX: &str = "-retain-";

/// A retention point (format v3): a head checkpoint the manifest keeps so
/// that moments of the retention window can be opened. Its tree and LSN
/// are those of the snapshot entry of the same name; the moment's replay
/// reads the log from `replay_seg` on, records after that LSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPoint {
    pub name: String,
    pub replay_seg: u32,
}

/// The retention window (format v3): off when `window_ms` is 0, and then
/// there are no points.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Retention {
    pub window_ms: u64,
    /// Oldest first.
    pub points: Vec<RetentionPoint>,
}

/// A clone's link to the snapshot it reads what it has not written from
/// (format v4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLink {
    /// Where the parent is, as any process would open it: an absolute
    /// path or a URI, without credentials.
    pub address: String,
    /// The parent's volume id: a volume at the address with another id is
    /// not the parent.
    pub volume: [u8; 16],
    /// The snapshot, by name and LSN (a later snapshot of the same name
    /// has another LSN).
    pub snapshot: String,
    pub snapshot_lsn: u64,
    /// The snapshot's size in bytes: blocks past it read as zeros.
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The volume's format version: the newest whose features its store
    /// may hold. Readers that do not know it must not open the volume.
    pub version: u16,
    pub volume: [u8; 16],
    /// Equals the number in the blob's name.
    pub seq: u64,
    pub written_ms: u64,
    pub volume_created_ms: u64,
    pub block_size: u32,
    pub segment_size: u64,
    /// Logical size at the head checkpoint (replayed Resize records may have
    /// grown it since).
    pub size: u64,
    /// The head's checkpoint record; empty for a volume never sealed.
    pub checkpoint: Entry,
    /// Recovery replays records from this segment and LSN on.
    pub replay_from_seg: u32,
    pub replay_from_lsn: u64,
    /// Segment ids below this one have been handed out.
    pub next_seg: u32,
    pub writer: Option<WriterClaim>,
    pub snapshots: Vec<SnapshotEntry>,
    /// Present in v2 manifests (as of this one's writing), absent in v1.
    pub counters: Option<LogCounters>,
    /// Written in v3 manifests; before v3 it must be the default (off).
    pub retention: Retention,
    /// A clone's parent (v4 manifests; before v4 it must be None).
    pub parent: Option<ParentLink>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_str(r: &mut Reader<'_>) -> Result<String> {
    get_str_up_to(r, MAX_NAME_LEN)
}

pub(crate) fn get_str_up_to(r: &mut Reader<'_>, max: usize) -> Result<String> {
    let len = r.u16()? as usize;
    if len > max {
        return Err(FormatError::Invalid("name length"));
    }
    String::from_utf8(r.bytes(len)?.to_vec()).map_err(|_| FormatError::Invalid("name is not UTF-8"))
}

pub(crate) fn put_address(out: &mut Vec<u8>, address: &str) {
    debug_assert!(address.len() <= MAX_ADDRESS_LEN);
    put_str(out, address);
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.snapshots.len() * 64);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        let flags = if self.writer.is_some() {
            FLAG_WRITER_OPEN
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.volume);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.written_ms.to_le_bytes());
        out.extend_from_slice(&self.volume_created_ms.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.segment_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        self.checkpoint.encode(&mut out);
        out.extend_from_slice(&self.replay_from_seg.to_le_bytes());
        out.extend_from_slice(&self.replay_from_lsn.to_le_bytes());
        out.extend_from_slice(&self.next_seg.to_le_bytes());
        let writer = self.writer.clone().unwrap_or_default();
        put_str(&mut out, &writer.host);
        out.extend_from_slice(&writer.pid.to_le_bytes());
        out.extend_from_slice(&writer.since_ms.to_le_bytes());
        out.extend_from_slice(&(self.snapshots.len() as u32).to_le_bytes());
        for s in &self.snapshots {
            put_str(&mut out, &s.name);
            s.checkpoint.encode(&mut out);
            out.extend_from_slice(&s.lsn.to_le_bytes());
            out.extend_from_slice(&s.created_ms.to_le_bytes());
            let flags = if s.automatic { SNAP_AUTOMATIC } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        if self.version >= 2 {
            let c = self.counters.unwrap_or_default();
            out.extend_from_slice(&c.since_ms.to_le_bytes());
            out.extend_from_slice(&c.written_bytes.to_le_bytes());
            out.extend_from_slice(&c.appended_bytes.to_le_bytes());
        }
        if self.version >= 3 {
            let r = &self.retention;
            out.extend_from_slice(&r.window_ms.to_le_bytes());
            out.extend_from_slice(&(r.points.len() as u32).to_le_bytes());
            for p in &r.points {
                put_str(&mut out, &p.name);
                out.extend_from_slice(&p.replay_seg.to_le_bytes());
            }
        } else {
            debug_assert_eq!(self.retention, Retention::default(), "retention needs v3");
        }
        if self.version >= FORMAT_CLONES {
            match &self.parent {
                None => out.push(0),
                Some(p) => {
                    out.push(1);
                    put_address(&mut out, &p.address);
                    out.extend_from_slice(&p.volume);
                    put_str(&mut out, &p.snapshot);
                    out.extend_from_slice(&p.snapshot_lsn.to_le_bytes());
                    out.extend_from_slice(&p.size.to_le_bytes());
                }
            }
        } else {
            debug_assert!(self.parent.is_none(), "a parent link needs v4");
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let body = crate::sealed_body(bytes, &MANIFEST_MAGIC, 8)?;
        let mut r = Reader::new(body);
        r.bytes(4)?;
        let version = r.u16()?;
        if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let flags = r.u16()?;
        if flags & !FLAG_WRITER_OPEN != 0 {
            return Err(FormatError::Invalid("unknown manifest flags"));
        }
        let volume = r.uuid()?;
        let seq = r.u64()?;
        let written_ms = r.u64()?;
        let volume_created_ms = r.u64()?;
        let block_size = r.u32()?;
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(FormatError::Invalid("block size"));
        }
        let segment_size = r.u64()?;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
            return Err(FormatError::Invalid("segment size"));
        }
        let size = r.u64()?;
        let checkpoint = Entry::decode(&mut r)?;
        let replay_from_seg = r.u32()?;
        let replay_from_lsn = r.u64()?;
        let next_seg = r.u32()?;
        if replay_from_seg == 0 || replay_from_lsn == 0 || next_seg < replay_from_seg {
            return Err(FormatError::Invalid("replay position"));
        }
        let host = get_str(&mut r)?;
        let pid = r.u32()?;
        let since_ms = r.u64()?;
        let writer = (flags & FLAG_WRITER_OPEN != 0).then_some(WriterClaim {
            host,
            pid,
            since_ms,
        });
        let count = r.u32()? as usize;
        // Each snapshot takes at least 34 bytes: refuse counts the input cannot hold.
        if count > MAX_SNAPSHOTS || count > body.len() / 34 {
            return Err(FormatError::Invalid("snapshot count"));
        }
        let mut snapshots = Vec::with_capacity(count);
        for _ in 0..count {
            let name = get_str(&mut r)?;
            let checkpoint = Entry::decode(&mut r)?;
            let lsn = r.u64()?;
            let created_ms = r.u64()?;
            let flags = r.u32()?;
            if flags & !SNAP_AUTOMATIC != 0 || name.is_empty() || checkpoint.is_empty() {
                return Err(FormatError::Invalid("snapshot entry"));
            }
            snapshots.push(SnapshotEntry {
                name,
                checkpoint,
                lsn,
                created_ms,
                automatic: flags & SNAP_AUTOMATIC != 0,
            });
        }
        let counters = match version {
            FORMAT_V1 => None,
            _ => Some(LogCounters {
                since_ms: r.u64()?,
                written_bytes: r.u64()?,
                appended_bytes: r.u64()?,
            }),
        };
        let retention = if version >= 3 {
            decode_retention(&mut r, &snapshots, replay_from_lsn)?
        } else {
            Retention::default()
        };
        let parent = if version >= FORMAT_CLONES {
            decode_parent(&mut r, size)?
        } else {
            None
        };
        r.finish()?;
        Ok(Manifest {
            version,
            volume,
            seq,
            written_ms,
            volume_created_ms,
            block_size,
            segment_size,
            size,
            checkpoint,
            replay_from_seg,
            replay_from_lsn,
            next_seg,
            writer,
            snapshots,
            counters,
            retention,
            parent,
        })
    }
}

/// The v4 parent link: a flag, then the link if it is 1.
fn decode_parent(r: &mut Reader<'_>, size: u64) -> Result<Option<ParentLink>> {
    match r.u8()? {
        0 => Ok(None),
        1 => {
            let address = get_str_up_to(r, MAX_ADDRESS_LEN)?;
            let volume = r.uuid()?;
            let snapshot = get_str(r)?;
            let snapshot_lsn = r.u64()?;
            let parent_size = r.u64()?;
            // A clone starts at its parent's size and never shrinks.
            if address.is_empty() || snapshot.is_empty() || parent_size > size {
                return Err(FormatError::Invalid("parent link"));
            }
            Ok(Some(ParentLink {
                address,
                volume,
                snapshot,
                snapshot_lsn,
                size: parent_size,
            }))
        }
        _ => Err(FormatError::Invalid("parent flag")),
    }
}

/// The v3 retention fields. Each point names a snapshot entry with the
/// reserved prefix, and each such entry is a point: the two lists agree.
fn decode_retention(
    r: &mut Reader<'_>,
    snapshots: &[SnapshotEntry],
    replay_from_lsn: u64,
) -> Result<Retention> {
    let window_ms = r.u64()?;
    let count = r.u32()? as usize;
    let reserved = snapshots
        .iter()
        .filter(|s| s.name.starts_with(RETENTION_POINT_PREFIX))
        .count();
    if count != reserved || (window_ms == 0 && count > 0) {
        return Err(FormatError::Invalid("retention points"));
    }
    let mut points: Vec<RetentionPoint> = Vec::with_capacity(count);
    for _ in 0..count {
        let name = get_str(r)?;
        let replay_seg = r.u32()?;
        // A point's LSN is before the replay of any manifest after it.
        let known = name.starts_with(RETENTION_POINT_PREFIX)
            && snapshots
                .iter()
                .any(|s| s.name == name && s.lsn < replay_from_lsn)
            && !points.iter().any(|p| p.name == name);
        if !known || replay_seg == 0 {
            return Err(FormatError::Invalid("retention point"));
        }
        points.push(RetentionPoint { name, replay_seg });
    }
    Ok(Retention { window_ms, points })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            volume: [3; 16],
            seq: 42,
            written_ms: 1000,
            volume_created_ms: 900,
            block_size: 4096,
            segment_size: 64 << 20,
            size: 1 << 40,
            checkpoint: Entry {
                seg: 5,
                off: 77,
                crc: 1,
            },
            replay_from_seg: 6,
            replay_from_lsn: 1234,
            next_seg: 7,
            writer: Some(WriterClaim {
                host: "h".into(),
                pid: 9,
                since_ms: 5,
            }),
            snapshots: vec![
                SnapshotEntry {
                    name: "before-upgrade".into(),
                    checkpoint: Entry {
                        seg: 4,
                        off: 8,
                        crc: 2,
                    },
                    lsn: 1000,
                    created_ms: 950,
                    automatic: true,
                },
                SnapshotEntry {
                    name: "-retain-1100".into(),
                    checkpoint: Entry {
                        seg: 5,
                        off: 70,
                        crc: 3,
                    },
                    lsn: 1100,
                    created_ms: 990,
                    automatic: true,
                },
            ],
            counters: Some(LogCounters {
                since_ms: 900,
                written_bytes: 1 << 30,
                appended_bytes: 3 << 29,
            }),
            retention: Retention {
                window_ms: 3_600_000,
                points: vec![RetentionPoint {
                    name: "-retain-1100".into(),
                    replay_seg: 6,
                }],
            },
            parent: Some(ParentLink {
                address: "s3://golden/base".into(),
                volume: [8; 16],
                snapshot: "v1".into(),
                snapshot_lsn: 77,
                size: 1 << 30,
            }),
        }
    }

    #[test]
    fn retention_points_and_their_snapshots_must_agree() {
        let bad = |edit: &dyn Fn(&mut Manifest)| {
            let mut m = sample();
            edit(&mut m);
            Manifest::decode(&m.encode())
        };
        assert!(bad(&|_| {}).is_ok());
        assert!(
            bad(&|m| m.retention.points.clear()).is_err(),
            "an entry without its point"
        );
        assert!(
            bad(&|m| m.snapshots.truncate(1)).is_err(),
            "a point without its entry"
        );
        assert!(
            bad(&|m| m.retention.window_ms = 0).is_err(),
            "points while off"
        );
        assert!(bad(&|m| m.retention.points[0].replay_seg = 0).is_err());
        assert!(
            bad(&|m| {
                m.snapshots[1].name = "plain".into();
                m.retention.points[0].name = "plain".into();
            })
            .is_err(),
            "a point without the reserved name"
        );
        let off = bad(&|m| {
            m.snapshots.truncate(1);
            m.retention = Retention::default();
        });
        assert_eq!(off.unwrap().retention, Retention::default());
    }

    #[test]
    fn a_parent_link_must_fit_its_clone() {
        let with = |edit: &dyn Fn(&mut ParentLink)| {
            let mut m = sample();
            edit(m.parent.as_mut().unwrap());
            Manifest::decode(&m.encode())
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|p| p.address.clear()).is_err());
        assert!(with(&|p| p.snapshot.clear()).is_err());
        assert!(
            with(&|p| p.size = (1 << 40) + 1).is_err(),
            "larger than the clone"
        );
        let plain = Manifest {
            parent: None,
            ..sample()
        };
        assert_eq!(Manifest::decode(&plain.encode()).unwrap(), plain);
    }

    #[test]
    fn round_trip_and_every_flip_detected() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x01;
            assert!(
                Manifest::decode(&bad).is_err(),
                "flip at {pos} not detected"
            );
        }
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err());
        }
    }

    /// The examples of docs/FORMAT.md §8, byte for byte.
    #[test]
    fn the_documented_examples_are_what_encode_writes() {
        let new_volume = |version, counters| Manifest {
            version,
            volume: core::array::from_fn(|i| i as u8),
            seq: 1,
            written_ms: 0,
            volume_created_ms: 0,
            block_size: 4096,
            segment_size: 64 << 20,
            size: 1 << 30,
            checkpoint: Entry::EMPTY,
            replay_from_seg: 1,
            replay_from_lsn: 1,
            next_seg: 1,
            writer: None,
            snapshots: Vec::new(),
            counters,
            retention: Retention::default(),
            parent: None,
        };
        let hex = |m: &Manifest| {
            let bytes = m.encode();
            assert_eq!(Manifest::decode(&bytes).unwrap(), *m);
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let v1 = hex(&new_volume(FORMAT_V1, None));
        assert_eq!(v1.len(), 2 * 118);
        assert!(v1.starts_with("484c4d460100"), "{v1}");
        assert!(v1.ends_with("0000f1a32c3f"), "{v1}");
        let v2 = hex(&new_volume(2, Some(LogCounters::default())));
        assert_eq!(v2.len(), 2 * 142);
        assert!(v2.starts_with("484c4d460200"), "{v2}");
        assert!(
            v2.ends_with(&format!("{}7b8babbf", "00".repeat(24 + 2))),
            "{v2}"
        );
        let v3 = hex(&Manifest {
            retention: Retention {
                window_ms: 3_600_000,
                points: Vec::new(),
            },
            ..new_volume(3, Some(LogCounters::default()))
        });
        assert_eq!(v3.len(), 2 * 154);
        assert!(v3.starts_with("484c4d460300"), "{v3}");
        assert!(
            v3.ends_with(&format!(
                "{}80ee360000000000{}7a7f3b86",
                "00".repeat(24),
                "00".repeat(4)
            )),
            "{v3}"
        );
    }

    #[test]
    fn v1_to_v4_manifests_decode_and_later_ones_are_refused() {
        let before_v3 = Manifest {
            snapshots: sample().snapshots[..1].to_vec(),
            retention: Retention::default(),
            parent: None,
            ..sample()
        };
        for (version, counters) in [
            (FORMAT_V1, None),
            (2, sample().counters),
            (3, sample().counters),
            (FORMAT_VERSION, sample().counters),
        ] {
            let m = Manifest {
                version,
                counters,
                ..match version {
                    4.. => sample(),
                    3 => Manifest {
                        parent: None,
                        ..sample()
                    },
                    _ => before_v3.clone(),
                }
            };
            let bytes = m.encode();
            assert_eq!(bytes[4..6], version.to_le_bytes());
            assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        }
        let later = Manifest {
            version: FORMAT_VERSION + 1,
            ..sample()
        };
        assert_eq!(
            Manifest::decode(&later.encode()),
            Err(FormatError::UnsupportedVersion(FORMAT_VERSION + 1))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decode_with_valid_crc_never_panics(mut body in proptest::collection::vec(any::<u8>(), 4..400)) {
            body[0..4].copy_from_slice(&MANIFEST_MAGIC);
            let crc = crc32c::crc32c(&body);
            body.extend_from_slice(&crc.to_le_bytes());
            let _ = Manifest::decode(&body);
        }
    }
}
