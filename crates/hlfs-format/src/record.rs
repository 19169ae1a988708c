//! Log records: the unit of everything written to a segment.

use crate::wire::Reader;
use crate::{Entry, FormatError, Result, FORMAT_V1, FORMAT_VERSION};

pub const RECORD_MAGIC: [u8; 4] = *b"HLRC";
/// Bytes in a record header.
pub const HEADER_LEN: usize = 56;
/// Offset of the CRC field in the header; the CRC covers the bytes before it
/// and then the payload.
const CRC_OFFSET: usize = 52;
/// No single record carries more than this; larger writes are split.
pub const MAX_PAYLOAD_LEN: u32 = 64 << 20;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordKind {
    /// `arg0` = first block, `arg1` = block count; payload = the blocks.
    Data = 1,
    /// `arg0` = first block, `arg1` = block count; no payload. The range now
    /// reads as zeros and holds no space (trim and write-zeroes).
    Zero = 2,
    /// `arg0` = tree level (0 = leaf), `arg1` = node index; payload = page.
    MapPage = 3,
    /// No args; payload = [`Checkpoint`]. Reflects every record with a
    /// smaller LSN.
    Checkpoint = 4,
    /// `arg0` = new logical size in bytes; no payload.
    Resize = 5,
    /// Format v2. Laid out as `Data`: blocks segment cleaning copied for
    /// snapshots alone (the head no longer holds them). Only map pages
    /// point at them; recovery never replays them into the head.
    Copy = 6,
    /// Format v3. `arg0` = a time (ms since the epoch), `arg1` = 0; no
    /// payload. Written while a retention window is on: the records after
    /// it, up to the next Mark, were appended in that millisecond. Recovery
    /// skips it.
    Mark = 7,
}

impl RecordKind {
    fn from_u16(v: u16) -> Result<Self> {
        Ok(match v {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            3 => RecordKind::MapPage,
            4 => RecordKind::Checkpoint,
            5 => RecordKind::Resize,
            6 => RecordKind::Copy,
            7 => RecordKind::Mark,
            other => return Err(FormatError::UnknownKind(other)),
        })
    }

    /// The format version that introduced this kind, which records of it
    /// carry: logs of v1 kinds stay byte for byte what v1 wrote.
    pub fn version(self) -> u16 {
        match self {
            RecordKind::Copy => 2,
            RecordKind::Mark => 3,
            _ => FORMAT_V1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub volume: [u8; 16],
    pub lsn: u64,
    pub arg0: u64,
    pub arg1: u64,
    pub payload_len: u32,
    pub crc: u32,
}

impl RecordHeader {
    /// Total bytes of the record on the log.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len as u64
    }
}

fn header_prefix(
    kind: RecordKind,
    volume: &[u8; 16],
    lsn: u64,
    arg0: u64,
    arg1: u64,
    payload_len: u32,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4..6].copy_from_slice(&kind.version().to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..24].copy_from_slice(volume);
    h[24..32].copy_from_slice(&lsn.to_le_bytes());
    h[32..40].copy_from_slice(&arg0.to_le_bytes());
    h[40..48].copy_from_slice(&arg1.to_le_bytes());
    h[48..52].copy_from_slice(&payload_len.to_le_bytes());
    h
}

/// The CRC32C a record must carry: over the header's first 52 bytes, then
/// the payload, in one streaming pass.
pub fn record_crc(header_prefix: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header_prefix[..CRC_OFFSET]), payload)
}

/// A complete header for `payload`.
pub fn encode_header(
    kind: RecordKind,
    volume: &[u8; 16],
    lsn: u64,
    arg0: u64,
    arg1: u64,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    assert!(
        payload.len() <= MAX_PAYLOAD_LEN as usize,
        "record payload too large"
    );
    let mut h = header_prefix(kind, volume, lsn, arg0, arg1, payload.len() as u32);
    let crc = record_crc(&h, payload);
    h[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Header and payload in one buffer.
pub fn encode_record(
    kind: RecordKind,
    volume: &[u8; 16],
    lsn: u64,
    arg0: u64,
    arg1: u64,
    payload: &[u8],
) -> Vec<u8> {
    let header = encode_header(kind, volume, lsn, arg0, arg1, payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

/// The CRC a complete encoded record carries (as `encode_record` made it).
pub fn crc_of_record(record: &[u8]) -> u32 {
    u32::from_le_bytes(
        record[CRC_OFFSET..HEADER_LEN]
            .try_into()
            .expect("a whole header"),
    )
}

/// Decodes and sanity-checks a header. The CRC cannot be checked until the
/// payload is read: see [`verify_record`].
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader> {
    let mut r = Reader::new(bytes);
    if r.bytes(4)? != RECORD_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = r.u16()?;
    if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let kind = RecordKind::from_u16(r.u16()?)?;
    if kind.version() != version {
        return Err(FormatError::Invalid(
            "record kind of another format version",
        ));
    }
    let volume = r.uuid()?;
    let lsn = r.u64()?;
    let arg0 = r.u64()?;
    let arg1 = r.u64()?;
    let payload_len = r.u32()?;
    let crc = r.u32()?;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FormatError::Invalid("payload length"));
    }
    if lsn == 0 {
        return Err(FormatError::Invalid("zero LSN"));
    }
    let payload_ok = match kind {
        RecordKind::Data | RecordKind::Copy | RecordKind::MapPage | RecordKind::Checkpoint => {
            payload_len > 0
        }
        RecordKind::Zero | RecordKind::Resize | RecordKind::Mark => payload_len == 0,
    };
    if !payload_ok {
        return Err(FormatError::Invalid("payload length for record kind"));
    }
    if matches!(kind, RecordKind::Data | RecordKind::Copy | RecordKind::Zero)
        && (arg1 == 0 || arg0.checked_add(arg1).is_none())
    {
        return Err(FormatError::Invalid("block range"));
    }
    Ok(RecordHeader {
        kind,
        volume,
        lsn,
        arg0,
        arg1,
        payload_len,
        crc,
    })
}

/// Checks a whole record (header bytes followed by payload) against its CRC
/// and its volume id.
pub fn verify_record(
    header: &RecordHeader,
    header_bytes: &[u8],
    payload: &[u8],
    volume: &[u8; 16],
) -> Result<()> {
    if header_bytes.len() < HEADER_LEN || payload.len() != header.payload_len as usize {
        return Err(FormatError::Truncated {
            need: HEADER_LEN + header.payload_len as usize,
            have: header_bytes.len().min(HEADER_LEN) + payload.len(),
        });
    }
    let computed = record_crc(header_bytes, payload);
    if computed != header.crc {
        return Err(FormatError::BadChecksum {
            stored: header.crc,
            computed,
        });
    }
    if &header.volume != volume {
        return Err(FormatError::WrongVolume);
    }
    Ok(())
}

/// The state of the map at a point of the log: written when a segment is
/// sealed, and saved by snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// The root map page (empty if nothing was ever written).
    pub root: Entry,
    /// Levels in the map tree, at least 1.
    pub depth: u32,
    /// Logical size in bytes.
    pub size: u64,
    /// Blocks that hold data.
    pub allocated_blocks: u64,
    /// Live data bytes per segment, sorted by segment id, no zero entries.
    pub usage: Vec<(u32, u64)>,
}

/// Deepest tree a 64-bit block address can need with fanout 512.
pub const MAX_DEPTH: u32 = 8;

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44 + self.usage.len() * 12);
        self.root.encode(&mut out);
        out.extend_from_slice(&self.depth.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.allocated_blocks.to_le_bytes());
        out.extend_from_slice(&(self.usage.len() as u32).to_le_bytes());
        for (seg, live) in &self.usage {
            out.extend_from_slice(&seg.to_le_bytes());
            out.extend_from_slice(&live.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint> {
        let mut r = Reader::new(bytes);
        let root = Entry::decode(&mut r)?;
        let depth = r.u32()?;
        if depth == 0 || depth > MAX_DEPTH {
            return Err(FormatError::Invalid("map depth"));
        }
        let size = r.u64()?;
        let allocated_blocks = r.u64()?;
        let count = r.u32()? as usize;
        // Each usage entry takes 12 bytes: refuse counts the input cannot hold
        // before allocating for them.
        if count > bytes.len() / 12 {
            return Err(FormatError::Invalid("usage count"));
        }
        let mut usage = Vec::with_capacity(count);
        let mut prev = 0u32;
        for _ in 0..count {
            let seg = r.u32()?;
            let live = r.u64()?;
            if seg <= prev || live == 0 {
                return Err(FormatError::Invalid("usage table order"));
            }
            prev = seg;
            usage.push((seg, live));
        }
        r.finish()?;
        Ok(Checkpoint {
            root,
            depth,
            size,
            allocated_blocks,
            usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VOL: [u8; 16] = [7; 16];

    #[test]
    fn record_round_trip_and_corruption() {
        let rec = encode_record(RecordKind::Data, &VOL, 5, 100, 2, &[1u8; 8192]);
        let h = decode_header(&rec).unwrap();
        assert_eq!(
            (h.kind, h.lsn, h.arg0, h.arg1, h.payload_len),
            (RecordKind::Data, 5, 100, 2, 8192)
        );
        verify_record(&h, &rec, &rec[HEADER_LEN..], &VOL).unwrap();
        assert_eq!(
            verify_record(&h, &rec, &rec[HEADER_LEN..], &[8; 16]),
            Err(FormatError::WrongVolume)
        );
        for pos in [0, 10, 30, 50, 53, 60, 8000] {
            let mut bad = rec.clone();
            bad[pos] ^= 0x10;
            let caught = match decode_header(&bad) {
                Err(_) => true,
                Ok(h) => verify_record(&h, &bad, &bad[HEADER_LEN..], &VOL).is_err(),
            };
            assert!(caught, "flip at {pos} not detected");
        }
    }

    #[test]
    fn each_kind_carries_the_version_that_made_it() {
        let data = encode_record(RecordKind::Data, &VOL, 5, 100, 1, &[1u8; 4096]);
        // Logs of v1 kinds stay byte for byte what v1 wrote.
        assert_eq!(data[4..6], 1u16.to_le_bytes());
        let copy = encode_record(RecordKind::Copy, &VOL, 6, 100, 1, &[1u8; 4096]);
        assert_eq!(copy[4..6], 2u16.to_le_bytes());
        let h = decode_header(&copy).unwrap();
        assert_eq!((h.kind, h.arg0, h.arg1), (RecordKind::Copy, 100, 1));
        let mark = encode_record(RecordKind::Mark, &VOL, 7, 1_700_000_000_000, 0, &[]);
        assert_eq!(mark[4..6], 3u16.to_le_bytes());
        let h = decode_header(&mark).unwrap();
        assert_eq!((h.kind, h.arg0), (RecordKind::Mark, 1_700_000_000_000));
        assert!(
            decode_header(&encode_record(RecordKind::Mark, &VOL, 7, 1, 0, &[1])).is_err(),
            "a mark with a payload"
        );
        // A kind under another version's number is refused, and so is a
        // version from the future.
        for (record, version) in [
            (&data, 2u16),
            (&copy, 1),
            (&data, 3),
            (&copy, 3),
            (&mark, 2),
            (&mark, 4),
        ] {
            let mut bad = record.clone();
            bad[4..6].copy_from_slice(&version.to_le_bytes());
            assert!(decode_header(&bad).is_err(), "version {version} accepted");
        }
    }

    #[test]
    fn checkpoint_round_trip() {
        let cp = Checkpoint {
            root: Entry {
                seg: 3,
                off: 4096,
                crc: 9,
            },
            depth: 3,
            size: 1 << 40,
            allocated_blocks: 17,
            usage: vec![(1, 4096), (3, 8192)],
        };
        assert_eq!(Checkpoint::decode(&cp.encode()).unwrap(), cp);
    }

    proptest! {
        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode_header(&bytes);
        }

        #[test]
        fn checkpoint_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Checkpoint::decode(&bytes);
        }
    }
}
