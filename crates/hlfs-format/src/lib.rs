//! On-store encodings of HLFS formats v1 to v4: log records, map pages, checkpoints,
//! manifests and clone pins. Pure functions over byte slices, no I/O, so that every
//! decoder can be fuzzed. docs/FORMAT.md describes the same layouts byte by
//! byte; keep the two in step.
//!
//! All integers are little-endian. Every record and every manifest carries a
//! CRC32C; decoders reject anything that does not check out with an error,
//! never a panic.

mod manifest;
mod pin;
pub mod rbd_diff;
mod record;
pub mod wire;

pub use manifest::{
    LogCounters, Manifest, ParentLink, Retention, RetentionPoint, SnapshotEntry, WriterClaim,
    MAX_ADDRESS_LEN, MAX_NAME_LEN, RETENTION_POINT_PREFIX,
};
pub use pin::{parse_pin_name, pin_name, Pin, PINS_PREFIX};
pub use record::{
    crc_of_record, decode_header, encode_header, encode_record, record_crc, verify_record,
    Checkpoint, RecordHeader, RecordKind, HEADER_LEN, MAX_DEPTH, MAX_PAYLOAD_LEN, RECORD_MAGIC,
};

/// The newest on-store format version this code writes and reads. It reads
/// every older one too: each manifest and record says its own version.
pub const FORMAT_VERSION: u16 = 4;
/// The first format. A volume stays v1 until it uses a v2 feature.
pub const FORMAT_V1: u16 = 1;
/// What a new volume is created as: the newest format a volume without a
/// parent needs.
pub const FORMAT_PLAIN: u16 = 3;
/// Clones (a parent link in the manifest, zero entries in map pages) and
/// pins.
pub const FORMAT_CLONES: u16 = 4;

/// Entries per map page; the map is a radix tree of this fanout.
pub const MAP_FANOUT: usize = 512;
/// log2(MAP_FANOUT).
pub const MAP_SHIFT: u32 = 9;

/// Smallest and largest supported block sizes.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;
/// Segment sizes are targets; a segment may overrun by one record plus the
/// checkpoint written when it is sealed. Offsets in a segment are 32-bit.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("belongs to another volume")]
    WrongVolume,
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

pub type Result<T> = std::result::Result<T, FormatError>;

/// Where a block or a map page lives: segment id, byte offset in the segment
/// and the CRC32C of what is there (the block's bytes, or the map page
/// record's CRC). `seg == 0` means nothing is stored: [`Entry::EMPTY`], a
/// block never written (a hole, or in a clone the parent's block) or an
/// empty subtree; or, in a leaf (format v4), [`Entry::ZERO`], a block a
/// clone zeroed or trimmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Entry {
    pub seg: u32,
    pub off: u32,
    pub crc: u32,
}

impl Entry {
    pub const EMPTY: Entry = Entry {
        seg: 0,
        off: 0,
        crc: 0,
    };
    /// A block zeroed in a clone: reads as zeros, not as the parent's.
    pub const ZERO: Entry = Entry {
        seg: 0,
        off: 1,
        crc: 0,
    };
    pub const ENCODED_LEN: usize = 12;

    /// Nothing stored: [`Entry::EMPTY`] or [`Entry::ZERO`].
    pub fn is_empty(&self) -> bool {
        self.seg == 0
    }

    /// Never written: in a clone, the parent's block; else a hole.
    pub fn is_unwritten(&self) -> bool {
        *self == Entry::EMPTY
    }

    pub fn is_zero(&self) -> bool {
        *self == Entry::ZERO
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seg.to_le_bytes());
        out.extend_from_slice(&self.off.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    pub fn decode(r: &mut wire::Reader<'_>) -> Result<Entry> {
        let e = Entry {
            seg: r.u32()?,
            off: r.u32()?,
            crc: r.u32()?,
        };
        if e.seg == 0 && !e.is_unwritten() && !e.is_zero() {
            return Err(FormatError::Invalid("empty entry with nonzero fields"));
        }
        Ok(e)
    }
}

/// One node of the map's radix tree: leaves map blocks to where their data
/// is, inner nodes map to child pages.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MapPage {
    pub entries: Box<[Entry; MAP_FANOUT]>,
}

impl Default for MapPage {
    fn default() -> Self {
        MapPage {
            entries: Box::new([Entry::EMPTY; MAP_FANOUT]),
        }
    }
}

const PAGE_DENSE: u8 = 0;
const PAGE_SPARSE: u8 = 1;

impl MapPage {
    /// True when no entry was ever written: the page need not be stored.
    pub fn is_empty(&self) -> bool {
        self.entries.iter().all(Entry::is_unwritten)
    }

    /// Entries a sparse encoding lists (zero entries among them).
    pub fn used(&self) -> usize {
        self.entries.iter().filter(|e| !e.is_unwritten()).count()
    }

    /// Entries that point at something stored.
    pub fn stored(&self) -> usize {
        self.entries.iter().filter(|e| !e.is_empty()).count()
    }

    /// The length of [`MapPage::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        Self::MAX_ENCODED_LEN.min(Self::sparse_len(self.used()))
    }

    /// The most bytes an encoded page takes (dense).
    pub const MAX_ENCODED_LEN: usize = 1 + MAP_FANOUT * Entry::ENCODED_LEN;

    fn sparse_len(used: usize) -> usize {
        3 + used * (2 + Entry::ENCODED_LEN)
    }

    /// Encodes densely or sparsely, whichever is smaller.
    pub fn encode(&self) -> Vec<u8> {
        let used = self.used();
        let dense_len = Self::MAX_ENCODED_LEN;
        let sparse_len = Self::sparse_len(used);
        if sparse_len < dense_len {
            let mut out = Vec::with_capacity(sparse_len);
            out.push(PAGE_SPARSE);
            out.extend_from_slice(&(used as u16).to_le_bytes());
            for (slot, e) in self.entries.iter().enumerate() {
                if !e.is_unwritten() {
                    out.extend_from_slice(&(slot as u16).to_le_bytes());
                    e.encode(&mut out);
                }
            }
            out
        } else {
            let mut out = Vec::with_capacity(dense_len);
            out.push(PAGE_DENSE);
            for e in self.entries.iter() {
                e.encode(&mut out);
            }
            out
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<MapPage> {
        let mut r = wire::Reader::new(bytes);
        let mut page = MapPage::default();
        match r.u8()? {
            PAGE_DENSE => {
                for e in page.entries.iter_mut() {
                    *e = Entry::decode(&mut r)?;
                }
            }
            PAGE_SPARSE => {
                let count = r.u16()? as usize;
                if count > MAP_FANOUT {
                    return Err(FormatError::Invalid("sparse page count"));
                }
                let mut next_min = 0usize;
                for _ in 0..count {
                    let slot = r.u16()? as usize;
                    if slot < next_min || slot >= MAP_FANOUT {
                        return Err(FormatError::Invalid("sparse page slot order"));
                    }
                    let e = Entry::decode(&mut r)?;
                    if e.is_unwritten() {
                        return Err(FormatError::Invalid("sparse page lists an empty slot"));
                    }
                    page.entries[slot] = e;
                    next_min = slot + 1;
                }
            }
            _ => return Err(FormatError::Invalid("page encoding")),
        }
        r.finish()?;
        Ok(page)
    }
}

/// The body of a blob that starts with `magic` and ends with the CRC32C
/// of all before it (manifests, pins); errors for anything else.
pub(crate) fn sealed_body<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    min_len: usize,
) -> Result<&'a [u8]> {
    if bytes.len() < min_len {
        return Err(FormatError::Truncated {
            need: min_len,
            have: bytes.len(),
        });
    }
    if bytes[0..4] != *magic {
        return Err(FormatError::BadMagic);
    }
    let (body, crc_bytes) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(FormatError::BadChecksum { stored, computed });
    }
    Ok(body)
}

/// Name of the manifest blob with sequence number `seq`.
pub fn manifest_name(seq: u64) -> String {
    format!("manifest/{seq:020}")
}

/// Parses a manifest blob name back to its sequence number.
pub fn parse_manifest_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("manifest/")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Name of the sealed segment blob with id `id`.
pub fn segment_name(id: u32) -> String {
    format!("segments/{id:010}")
}

pub fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("segments/")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Name of the journal file holding open segment `id`.
pub fn journal_name(id: u32) -> String {
    format!("{id:010}.journal")
}

pub fn parse_journal_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".journal")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_manifest_name(&manifest_name(42)), Some(42));
        assert_eq!(parse_segment_name(&segment_name(7)), Some(7));
        assert_eq!(parse_journal_name(&journal_name(9)), Some(9));
        assert_eq!(parse_segment_name("segments/12"), None);
        assert_eq!(parse_manifest_name("manifest/0000000000000000000x"), None);
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            9 => (1u32.., any::<u32>(), any::<u32>()).prop_map(|(seg, off, crc)| Entry { seg, off, crc }),
            1 => Just(Entry::ZERO),
        ]
    }

    #[test]
    fn only_the_empty_and_the_zero_entry_store_nothing() {
        let decode = |seg: u32, off: u32, crc: u32| {
            let mut bytes = Vec::new();
            Entry { seg, off, crc }.encode(&mut bytes);
            Entry::decode(&mut wire::Reader::new(&bytes))
        };
        assert_eq!(decode(0, 0, 0), Ok(Entry::EMPTY));
        assert_eq!(decode(0, 1, 0), Ok(Entry::ZERO));
        assert!(decode(0, 2, 0).is_err());
        assert!(decode(0, 1, 7).is_err());
        assert!(Entry::ZERO.is_empty() && !Entry::ZERO.is_unwritten());
        let mut page = MapPage::default();
        page.entries[3] = Entry::ZERO;
        assert!(!page.is_empty());
        assert_eq!(MapPage::decode(&page.encode()).unwrap(), page);
    }

    proptest! {
        #[test]
        fn page_round_trip(slots in proptest::collection::btree_map(0usize..MAP_FANOUT, entry(), 0..MAP_FANOUT)) {
            let mut page = MapPage::default();
            for (slot, e) in &slots {
                page.entries[*slot] = *e;
            }
            let bytes = page.encode();
            prop_assert_eq!(bytes.len(), page.encoded_len());
            let decoded = MapPage::decode(&bytes).unwrap();
            prop_assert_eq!(decoded, page);
        }

        #[test]
        fn page_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..8000)) {
            let _ = MapPage::decode(&bytes);
        }
    }
}
