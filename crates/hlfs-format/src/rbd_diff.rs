//! The RBD incremental diff stream: version 1, what `rbd export-diff`
//! writes and `rbd import-diff` reads, and version 2, the diffs inside an
//! image that `rbd export --export-format 2` writes and `rbd import
//! --export-format 2` reads (that image's header is here too), so that
//! diffs and whole images with their snapshots move between HLFS volumes
//! and Ceph RBD images both ways (docs/FORMAT.md §11).
//!
//! A 12-byte banner, then records, each a one-byte tag and its fields
//! (integers little-endian): the from- and to-snapshot names (`f`, `t`:
//! a 32-bit length and the name), the image size (`s`: 64 bits), then data
//! (`w`: offset, length, that many bytes) and zeroed ranges (`z`: offset,
//! length), and the end (`e`). In version 2 every record but the end has
//! a 64-bit length of its fields after its tag, a `p` record (whether the
//! to-snapshot is protected) may follow the to-snapshot, and records of
//! unknown tags are skipped by their length. It is a transport format, not an on-store
//! one, and carries no checksum: integrity in transit is the transport's.
//!
//! [`DiffDecoder`] takes the stream in pieces of any size (stdin, a pipe)
//! and gives its records one at a time, a data record's bytes as they come,
//! so memory stays bounded whatever the stream's length. It refuses with an
//! error, never a panic: another banner, an unknown tag, metadata after
//! data, data before the size, a range past the size, a name too long,
//! and anything after the end.

/// The banner of a version 1 stream.
pub const BANNER: &[u8; 12] = b"rbd diff v1\n";
/// The banner of a version 2 stream.
pub const BANNER_V2: &[u8; 12] = b"rbd diff v2\n";
/// The banner of an image in `rbd export --export-format 2`'s format.
pub const IMAGE_BANNER: &[u8; 13] = b"rbd image v2\n";
/// The banner between such an image's header and its diffs.
pub const IMAGE_DIFFS_BANNER: &[u8; 19] = b"rbd image diffs v2\n";
/// An image's header records (its options) take at most this many bytes.
pub const MAX_IMAGE_HEADER: usize = 1 << 20;
/// An image holds at most this many diffs (its snapshots and its head).
pub const MAX_IMAGE_DIFFS: u64 = 1 << 16;

/// The longest snapshot name a stream may carry.
pub const MAX_STREAM_NAME: usize = 4096;

/// A record as written: a data record's header only, its bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffRecord {
    FromSnapshot(String),
    ToSnapshot(String),
    Size(u64),
    /// `len` bytes of data at `offset`, which the caller writes next.
    DataHeader {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    End,
}

impl DiffRecord {
    /// The record as a stream of `version` (1 or 2) holds it.
    pub fn encode_for(&self, version: u8) -> Vec<u8> {
        let v1 = self.encode();
        if version < 2 || *self == DiffRecord::End {
            return v1;
        }
        // Version 2: the tag, then the length of what follows it, which
        // for data counts the bytes the caller writes next.
        let mut fields = (v1.len() - 1) as u64;
        if let DiffRecord::DataHeader { len, .. } = self {
            fields += len;
        }
        let mut out = Vec::with_capacity(v1.len() + 8);
        out.push(v1[0]);
        out.extend_from_slice(&fields.to_le_bytes());
        out.extend_from_slice(&v1[1..]);
        out
    }

    /// The version 2 record that says whether the to-snapshot is
    /// protected (RBD's guard against deleting a cloned snapshot).
    pub fn protection_v2(protected: bool) -> Vec<u8> {
        let mut out = vec![b'p'];
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(protected as u8);
        out
    }

    /// The record as a version 1 stream holds it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        let name = |out: &mut Vec<u8>, tag: u8, name: &str| {
            out.push(tag);
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        };
        let range = |out: &mut Vec<u8>, tag: u8, offset: u64, len: u64| {
            out.push(tag);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        };
        match self {
            DiffRecord::FromSnapshot(n) => name(&mut out, b'f', n),
            DiffRecord::ToSnapshot(n) => name(&mut out, b't', n),
            DiffRecord::Size(size) => {
                out.push(b's');
                out.extend_from_slice(&size.to_le_bytes());
            }
            DiffRecord::DataHeader { offset, len } => range(&mut out, b'w', *offset, *len),
            DiffRecord::Zero { offset, len } => range(&mut out, b'z', *offset, *len),
            DiffRecord::End => out.push(b'e'),
        }
        out
    }
}

/// What a stream says, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffEvent<'a> {
    FromSnapshot(String),
    ToSnapshot(String),
    Size(u64),
    /// Some of a data record's bytes, which belong at `offset`.
    Data {
        offset: u64,
        bytes: &'a [u8],
    },
    Zero {
        offset: u64,
        len: u64,
    },
    End,
}

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffStreamError {
    #[error("not an RBD diff stream (it does not start with \"rbd diff v1\" or \"rbd diff v2\")")]
    NotADiff,
    #[error(
        "RBD diff stream version {0:?} is not supported: only v1 (rbd export-diff) and v2 (inside rbd export --export-format 2)"
    )]
    UnsupportedVersion(String),
    #[error("a {tag:?} record declares {len} bytes of fields, not what it holds, at byte {at}")]
    BadLength { tag: char, len: u64, at: u64 },
    #[error("not an RBD image export (it does not start with \"rbd image v2\")")]
    NotAnImage,
    #[error("the image's header holds more than {MAX_IMAGE_HEADER} bytes of options")]
    ImageHeaderTooLong,
    #[error("the image says it holds {0} diffs (at most {MAX_IMAGE_DIFFS})")]
    TooManyDiffs(u64),
    #[error("unknown record tag {0:#04x} at byte {1}")]
    UnknownTag(u8, u64),
    #[error("a {0} record after the first data record, at byte {1}")]
    MetadataAfterData(&'static str, u64),
    #[error("the image size is given twice, at byte {0}")]
    SizeTwice(u64),
    #[error("a data or zero record before the image size, at byte {0}")]
    DataBeforeSize(u64),
    #[error("a snapshot name of {0} bytes (at most {MAX_STREAM_NAME})")]
    NameTooLong(u64),
    #[error("a snapshot name that is not UTF-8, at byte {0}")]
    NameNotUtf8(u64),
    #[error("range {offset}+{len} goes past the image's {size} bytes, at byte {at}")]
    PastEnd {
        offset: u64,
        len: u64,
        size: u64,
        at: u64,
    },
    #[error("bytes after the end record, at byte {0}")]
    AfterEnd(u64),
    #[error("the stream stops at byte {0}, before its end record")]
    CutOff(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Banner,
    Tag,
    /// The length of a version 2 record with this tag.
    Length(u8),
    /// The fixed fields of a record with this tag.
    Fields(u8),
    /// Bytes of a record to skip (version 2: an unknown tag, or `p`).
    Skip(u64),
    /// The name of an `f` or `t` record, this many bytes long.
    Name(u8, usize),
    /// The bytes of a data record: where the next belongs, how many are left.
    Payload {
        offset: u64,
        left: u64,
    },
    Ended,
}

/// Decodes a stream fed in pieces: see the module's documentation.
#[derive(Debug)]
pub struct DiffDecoder {
    state: State,
    /// The part of the current field read so far.
    field: Vec<u8>,
    size: Option<u64>,
    data_seen: bool,
    /// Bytes of the stream taken so far, for error messages.
    at: u64,
    /// 1 or 2, once the banner is read.
    version: u8,
    /// The length a version 2 record declared, to check against what it
    /// holds.
    declared: u64,
}

impl Default for DiffDecoder {
    fn default() -> Self {
        DiffDecoder::new()
    }
}

impl DiffDecoder {
    pub fn new() -> DiffDecoder {
        DiffDecoder {
            state: State::Banner,
            field: Vec::new(),
            size: None,
            data_seen: false,
            at: 0,
            version: 0,
            declared: 0,
        }
    }

    /// The next event of `input` (the bytes after those already taken),
    /// and how many bytes of `input` it took. No event means all of
    /// `input` was taken and more is needed, or, after the end record,
    /// that `input` is empty.
    pub fn next<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<DiffEvent<'a>>), DiffStreamError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Ended if rest.is_empty() => return Ok((used, None)),
                State::Ended => return Err(DiffStreamError::AfterEnd(self.at)),
                State::Payload { .. } | State::Skip(_) if rest.is_empty() => {
                    return Ok((used, None))
                }
                State::Skip(left) => {
                    let n = left.min(rest.len() as u64);
                    self.state = match left - n {
                        0 => State::Tag,
                        left => State::Skip(left),
                    };
                    self.at += n;
                    used += n as usize;
                    continue;
                }
                State::Payload { offset, left } => {
                    let n = left.min(rest.len() as u64);
                    self.state = match left - n {
                        0 => State::Tag,
                        left => State::Payload {
                            offset: offset + n,
                            left,
                        },
                    };
                    self.at += n;
                    let bytes = &rest[..n as usize];
                    return Ok((used + n as usize, Some(DiffEvent::Data { offset, bytes })));
                }
                _ => {}
            }
            let need = match self.state {
                State::Banner => BANNER.len(),
                State::Tag => 1,
                State::Length(_) => 8,
                State::Fields(b'f' | b't') => 4,
                State::Fields(b's') => 8,
                State::Fields(_) => 16,
                State::Name(_, len) => len,
                State::Payload { .. } | State::Skip(_) | State::Ended => {
                    unreachable!("handled above")
                }
            };
            let take = (need - self.field.len()).min(rest.len());
            self.field.extend_from_slice(&rest[..take]);
            used += take;
            self.at += take as u64;
            if self.field.len() < need {
                return Ok((used, None));
            }
            let field = std::mem::take(&mut self.field);
            if let Some(event) = self.complete(&field)? {
                return Ok((used, Some(event)));
            }
        }
    }

    /// Whether the end record has been read.
    pub fn ended(&self) -> bool {
        self.state == State::Ended
    }

    /// The stream has no more bytes: an error unless it ended.
    pub fn finish(&self) -> Result<(), DiffStreamError> {
        match self.ended() {
            true => Ok(()),
            false => Err(DiffStreamError::CutOff(self.at)),
        }
    }

    /// Acts on a whole field; the record's event once it is complete.
    fn complete(&mut self, field: &[u8]) -> Result<Option<DiffEvent<'static>>, DiffStreamError> {
        // Where the field began, for error messages.
        let at = self.at - field.len() as u64;
        let u64_at = |i: usize| u64::from_le_bytes(field[i..i + 8].try_into().expect("8 bytes"));
        match self.state {
            State::Banner => {
                self.version = match field {
                    f if f == BANNER => 1,
                    f if f == BANNER_V2 => 2,
                    f => {
                        return Err(match f.strip_prefix(b"rbd diff ") {
                            Some(v) => DiffStreamError::UnsupportedVersion(
                                String::from_utf8_lossy(v).trim_end().to_string(),
                            ),
                            None => DiffStreamError::NotADiff,
                        })
                    }
                };
                self.state = State::Tag;
            }
            State::Length(tag) => {
                let len = u64_at(0);
                let bad = || DiffStreamError::BadLength {
                    tag: tag as char,
                    len,
                    at: at - 1,
                };
                self.declared = len;
                self.state = match tag {
                    b'f' | b't' if len >= 4 => State::Fields(tag),
                    b's' if len == 8 => State::Fields(tag),
                    b'z' if len == 16 => State::Fields(tag),
                    b'w' if len >= 16 => State::Fields(tag),
                    // One byte whatever it declares, as rbd's own import
                    // reads it: Ceph 16 writes a length of 8 for it.
                    b'p' => State::Skip(1),
                    b'f' | b't' | b's' | b'z' | b'w' => return Err(bad()),
                    // Unknown: skipped, as version 2 allows.
                    _ if len == 0 => State::Tag,
                    _ => State::Skip(len),
                };
            }
            State::Tag => match field[0] {
                b'e' => {
                    self.state = State::Ended;
                    return Ok(Some(DiffEvent::End));
                }
                tag @ (b'f' | b't' | b's') => {
                    if self.data_seen {
                        let what = match tag {
                            b'f' => "from-snapshot",
                            b't' => "to-snapshot",
                            _ => "size",
                        };
                        return Err(DiffStreamError::MetadataAfterData(what, at));
                    }
                    if tag == b's' && self.size.is_some() {
                        return Err(DiffStreamError::SizeTwice(at));
                    }
                    self.state = self.fields_of(tag);
                }
                tag @ (b'w' | b'z') => {
                    if self.size.is_none() {
                        return Err(DiffStreamError::DataBeforeSize(at));
                    }
                    self.data_seen = true;
                    self.state = self.fields_of(tag);
                }
                tag if self.version == 2 => self.state = State::Length(tag),
                other => return Err(DiffStreamError::UnknownTag(other, at)),
            },
            State::Fields(tag @ (b'f' | b't')) => {
                let len = u32::from_le_bytes(field.try_into().expect("4 bytes")) as usize;
                if len > MAX_STREAM_NAME {
                    return Err(DiffStreamError::NameTooLong(len as u64));
                }
                if self.version == 2 && self.declared != 4 + len as u64 {
                    return Err(DiffStreamError::BadLength {
                        tag: tag as char,
                        len: self.declared,
                        at: at - 9,
                    });
                }
                self.state = State::Name(tag, len);
            }
            State::Name(tag, _) => {
                let name = String::from_utf8(field.to_vec())
                    .map_err(|_| DiffStreamError::NameNotUtf8(at))?;
                self.state = State::Tag;
                return Ok(Some(match tag {
                    b'f' => DiffEvent::FromSnapshot(name),
                    _ => DiffEvent::ToSnapshot(name),
                }));
            }
            State::Fields(b's') => {
                let size = u64_at(0);
                self.size = Some(size);
                self.state = State::Tag;
                return Ok(Some(DiffEvent::Size(size)));
            }
            State::Fields(tag) => {
                let (offset, len) = (u64_at(0), u64_at(8));
                if self.version == 2 && tag == b'w' && Some(self.declared) != len.checked_add(16) {
                    return Err(DiffStreamError::BadLength {
                        tag: 'w',
                        len: self.declared,
                        at: at - 9,
                    });
                }
                let size = self.size.expect("checked at the tag");
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    let at = at - if self.version == 2 { 9 } else { 1 };
                    return Err(DiffStreamError::PastEnd {
                        offset,
                        len,
                        size,
                        at,
                    });
                }
                self.state = State::Tag;
                if len == 0 {
                    return Ok(None);
                }
                if tag == b'w' {
                    self.state = State::Payload { offset, left: len };
                    return Ok(None);
                }
                return Ok(Some(DiffEvent::Zero { offset, len }));
            }
            State::Payload { .. } | State::Skip(_) | State::Ended => {
                unreachable!("no field is read")
            }
        }
        Ok(None)
    }

    /// What follows tag `tag`: its length first, in version 2.
    fn fields_of(&self, tag: u8) -> State {
        match self.version {
            2 => State::Length(tag),
            _ => State::Fields(tag),
        }
    }
}

/// An image's header, as `rbd export --export-format 2` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// log2 of the image's object size, if given.
    pub order: Option<u64>,
    /// The diffs that follow: one per snapshot, oldest first, then the
    /// head's.
    pub diffs: u64,
}

impl ImageHeader {
    /// The header of an image of objects of 2^`order` bytes, in one
    /// stripe, with RBD's layering feature, and `diffs` diffs.
    pub fn encode(order: u64, diffs: u64) -> Vec<u8> {
        let mut out = IMAGE_BANNER.to_vec();
        let option = |out: &mut Vec<u8>, tag: u8, value: u64| {
            out.push(tag);
            out.extend_from_slice(&8u64.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        };
        option(&mut out, b'O', order);
        option(&mut out, b'T', 1);
        option(&mut out, b'U', 1 << order);
        option(&mut out, b'C', 1);
        out.push(b'E');
        out.extend_from_slice(IMAGE_DIFFS_BANNER);
        out.extend_from_slice(&diffs.to_le_bytes());
        out
    }

    /// The header at the start of `input` and its length in bytes, or
    /// None if `input` stops inside it. Options other than the order
    /// (features, striping, image metadata) are skipped.
    pub fn parse(input: &[u8]) -> Result<Option<(usize, ImageHeader)>, DiffStreamError> {
        let banner = IMAGE_BANNER.len().min(input.len());
        if input[..banner] != IMAGE_BANNER[..banner] {
            return Err(DiffStreamError::NotAnImage);
        }
        let mut at = IMAGE_BANNER.len();
        let mut order = None;
        let u64_at = |i: usize| {
            input
                .get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        loop {
            if at > MAX_IMAGE_HEADER {
                return Err(DiffStreamError::ImageHeaderTooLong);
            }
            let Some(&tag) = input.get(at) else {
                return Ok(None);
            };
            if tag == b'E' {
                at += 1;
                break;
            }
            let Some(len) = u64_at(at + 1) else {
                return Ok(None);
            };
            if len > MAX_IMAGE_HEADER as u64 {
                return Err(DiffStreamError::ImageHeaderTooLong);
            }
            let fields = at + 9;
            let end = fields + len as usize;
            if input.len() < end {
                return Ok(None);
            }
            if tag == b'O' {
                if len != 8 {
                    return Err(DiffStreamError::BadLength {
                        tag: 'O',
                        len,
                        at: at as u64,
                    });
                }
                order = u64_at(fields);
            }
            at = end;
        }
        let banner_end = at + IMAGE_DIFFS_BANNER.len();
        let seen = &input[at.min(input.len())..banner_end.min(input.len())];
        if seen != &IMAGE_DIFFS_BANNER[..seen.len()] {
            return Err(DiffStreamError::NotAnImage);
        }
        let Some(diffs) = u64_at(banner_end) else {
            return Ok(None);
        };
        if diffs > MAX_IMAGE_DIFFS {
            return Err(DiffStreamError::TooManyDiffs(diffs));
        }
        Ok(Some((banner_end + 8, ImageHeader { order, diffs })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An owned event, to compare runs fed in different pieces.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        From(String),
        To(String),
        Size(u64),
        Data(u64, Vec<u8>),
        Zero(u64, u64),
        End,
    }

    /// Everything `stream` says, fed `piece` bytes at a time; data pieces
    /// merged back into whole records.
    fn decode(stream: &[u8], piece: usize) -> Result<Vec<Owned>, DiffStreamError> {
        let mut d = DiffDecoder::new();
        let mut out: Vec<Owned> = Vec::new();
        for chunk in stream.chunks(piece.max(1)) {
            let mut at = 0;
            loop {
                let (used, event) = d.next(&chunk[at..])?;
                at += used;
                let Some(event) = event else { break };
                match event {
                    DiffEvent::FromSnapshot(n) => out.push(Owned::From(n)),
                    DiffEvent::ToSnapshot(n) => out.push(Owned::To(n)),
                    DiffEvent::Size(s) => out.push(Owned::Size(s)),
                    DiffEvent::Data { offset, bytes } => match out.last_mut() {
                        Some(Owned::Data(o, b)) if *o + b.len() as u64 == offset => {
                            b.extend_from_slice(bytes)
                        }
                        _ => out.push(Owned::Data(offset, bytes.to_vec())),
                    },
                    DiffEvent::Zero { offset, len } => out.push(Owned::Zero(offset, len)),
                    DiffEvent::End => out.push(Owned::End),
                }
            }
        }
        d.finish()?;
        Ok(out)
    }

    fn encode(events: &[Owned]) -> Vec<u8> {
        encode_v(events, 1)
    }

    /// `events` as a stream of `version`; in version 2 with a protection
    /// record after the to-snapshot and a record of an unknown tag, which
    /// a decoder skips, before the size.
    fn encode_v(events: &[Owned], version: u8) -> Vec<u8> {
        let mut out = match version {
            1 => BANNER.to_vec(),
            _ => BANNER_V2.to_vec(),
        };
        for e in events {
            if version == 2 && matches!(e, Owned::Size(_)) {
                out.push(b'X');
                out.extend_from_slice(&3u64.to_le_bytes());
                out.extend_from_slice(b"new");
            }
            let record = match e {
                Owned::From(n) => DiffRecord::FromSnapshot(n.clone()),
                Owned::To(n) => DiffRecord::ToSnapshot(n.clone()),
                Owned::Size(s) => DiffRecord::Size(*s),
                Owned::Data(offset, bytes) => DiffRecord::DataHeader {
                    offset: *offset,
                    len: bytes.len() as u64,
                },
                Owned::Zero(offset, len) => DiffRecord::Zero {
                    offset: *offset,
                    len: *len,
                },
                Owned::End => DiffRecord::End,
            };
            out.extend_from_slice(&record.encode_for(version));
            if let Owned::Data(_, bytes) = e {
                out.extend_from_slice(bytes);
            }
            if version == 2 && matches!(e, Owned::To(_)) {
                out.extend_from_slice(&DiffRecord::protection_v2(true));
            }
        }
        out
    }

    fn events() -> impl Strategy<Value = Vec<Owned>> {
        let names = proptest::option::of("[a-z0-9]{1,12}");
        let data = (
            0u64..1 << 20,
            proptest::collection::vec(any::<u8>(), 1..300),
        )
            .prop_map(|(o, b)| Owned::Data(o, b));
        let zero = (0u64..1 << 20, 1u64..1 << 20).prop_map(|(o, l)| Owned::Zero(o, l));
        let body = proptest::collection::vec(prop_oneof![data, zero], 0..8);
        (names.clone(), names, body).prop_map(|(from, to, body)| {
            let mut events = Vec::new();
            events.extend(from.map(Owned::From));
            events.extend(to.map(Owned::To));
            events.push(Owned::Size(4 << 20));
            // Data records apart, as rbd writes them, so that merging the
            // decoded pieces gives the records back.
            let mut at = 0;
            for e in body {
                match e {
                    Owned::Data(gap, bytes) => {
                        at += gap % 4096 + 1;
                        events.push(Owned::Data(at, bytes.clone()));
                        at += bytes.len() as u64;
                    }
                    Owned::Zero(gap, len) => {
                        at += gap % 4096 + 1;
                        let len = len % 65536 + 1;
                        events.push(Owned::Zero(at, len));
                        at += len;
                    }
                    _ => unreachable!(),
                }
            }
            events.push(Owned::End);
            events
        })
    }

    proptest! {
        /// Encoding then decoding gives the records back, in pieces of
        /// any size.
        #[test]
        fn streams_round_trip_in_pieces_of_any_size(
            events in events(),
            piece in 1usize..64,
            version in 1u8..=2,
        ) {
            let stream = encode_v(&events, version);
            prop_assert_eq!(decode(&stream, stream.len()).unwrap(), events.clone());
            prop_assert_eq!(decode(&stream, piece).unwrap(), events);
        }

        /// An image's header parses back from any prefix long enough, and
        /// any shorter prefix asks for more.
        #[test]
        fn image_headers_round_trip(order in 12u64..26, diffs in 0u64..1000, extra in any::<u8>()) {
            let mut header = ImageHeader::encode(order, diffs);
            let len = header.len();
            header.push(extra);
            prop_assert_eq!(
                ImageHeader::parse(&header).unwrap(),
                Some((len, ImageHeader { order: Some(order), diffs }))
            );
            for cut in 0..len {
                prop_assert_eq!(ImageHeader::parse(&header[..cut]).unwrap(), None);
            }
        }

        /// Garbage after an image's banner is refused or asks for more,
        /// never a panic.
        #[test]
        fn image_header_garbage_gives_errors(garbage in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ImageHeader::parse(&garbage);
            let mut with_banner = IMAGE_BANNER.to_vec();
            with_banner.extend_from_slice(&garbage);
            let _ = ImageHeader::parse(&with_banner);
        }

        /// Garbage, and streams cut or with a byte changed, are refused
        /// or decoded, never a panic; a cut stream is always refused.
        #[test]
        fn garbage_and_damage_give_errors(
            events in events(),
            garbage in proptest::collection::vec(any::<u8>(), 0..200),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let _ = decode(&garbage, 7);
            let mut with_banner = BANNER.to_vec();
            with_banner.extend_from_slice(&garbage);
            let _ = decode(&with_banner, 5);
            let mut with_banner = BANNER_V2.to_vec();
            with_banner.extend_from_slice(&garbage);
            let _ = decode(&with_banner, 5);
            let stream = encode_v(&events, 2);
            let cut = cut.index(stream.len());
            prop_assert!(decode(&stream[..cut], 3).is_err(), "cut at {}", cut);
            let mut damaged = stream.clone();
            damaged[flip.index(stream.len())] = byte;
            let _ = decode(&damaged, 11);
            let stream = encode(&events);
            prop_assert!(decode(&stream[..cut.min(stream.len() - 1)], 3).is_err(), "cut at {}", cut);
            let mut damaged = stream.clone();
            damaged[flip.index(stream.len())] = byte;
            let _ = decode(&damaged, 11);
        }
    }

    #[test]
    fn bad_streams_say_what_is_wrong() {
        let err = |events: &[Owned], extra: &[u8]| {
            let mut s = encode(events);
            s.extend_from_slice(extra);
            decode(&s, 4).unwrap_err()
        };
        assert_eq!(
            decode(b"GIF89a......", 4).unwrap_err(),
            DiffStreamError::NotADiff
        );
        assert_eq!(
            decode(b"rbd diff v3\n", 4).unwrap_err(),
            DiffStreamError::UnsupportedVersion("v3".into())
        );
        // Version 2: lengths that do not match what the record holds.
        let v2 = |records: &[&[u8]]| {
            let mut s = BANNER_V2.to_vec();
            for r in records {
                s.extend_from_slice(r);
            }
            decode(&s, 3).unwrap_err()
        };
        let size_v2 = DiffRecord::Size(1 << 20).encode_for(2);
        let mut short_size = size_v2.clone();
        short_size[1] = 7;
        assert!(matches!(
            v2(&[&short_size]),
            DiffStreamError::BadLength {
                tag: 's',
                len: 7,
                at: 12
            }
        ));
        let mut long_name = DiffRecord::ToSnapshot("s1".into()).encode_for(2);
        long_name[1] = 7;
        assert!(matches!(
            v2(&[&long_name]),
            DiffStreamError::BadLength {
                tag: 't',
                len: 7,
                at: 12
            }
        ));
        let mut data = DiffRecord::DataHeader { offset: 0, len: 4 }.encode_for(2);
        data[1] += 1;
        assert!(matches!(
            v2(&[&size_v2, &data, b"abcd"]),
            DiffStreamError::BadLength {
                tag: 'w',
                len: 21,
                at: 29
            }
        ));
        // A protection record is one byte, whatever length it declares
        // (Ceph 16 declares 8).
        let mut protection = DiffRecord::protection_v2(false);
        protection[1] = 8;
        let mut s = BANNER_V2.to_vec();
        s.extend_from_slice(&DiffRecord::ToSnapshot("s1".into()).encode_for(2));
        s.extend_from_slice(&protection);
        s.extend_from_slice(&size_v2);
        s.extend_from_slice(&DiffRecord::End.encode_for(2));
        assert_eq!(
            decode(&s, 3).unwrap(),
            [Owned::To("s1".into()), Owned::Size(1 << 20), Owned::End]
        );
        // Image headers: another banner, a long option, too many diffs.
        assert_eq!(
            ImageHeader::parse(b"rbd image v1\n").unwrap_err(),
            DiffStreamError::NotAnImage
        );
        let mut huge = IMAGE_BANNER.to_vec();
        huge.push(b'M');
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            ImageHeader::parse(&huge).unwrap_err(),
            DiffStreamError::ImageHeaderTooLong
        );
        let mut many = ImageHeader::encode(22, 0);
        let n = many.len();
        many[n - 8..].copy_from_slice(&(MAX_IMAGE_DIFFS + 1).to_le_bytes());
        assert_eq!(
            ImageHeader::parse(&many).unwrap_err(),
            DiffStreamError::TooManyDiffs(MAX_IMAGE_DIFFS + 1)
        );
        let mut no_diffs_banner = ImageHeader::encode(22, 1);
        let at = no_diffs_banner.len() - 12;
        no_diffs_banner[at] = b'X';
        assert_eq!(
            ImageHeader::parse(&no_diffs_banner).unwrap_err(),
            DiffStreamError::NotAnImage
        );
        let size = Owned::Size(1 << 20);
        assert!(matches!(
            err(
                &[size.clone(), Owned::Zero(0, 4096), Owned::To("b".into())],
                b""
            ),
            DiffStreamError::MetadataAfterData("to-snapshot", _)
        ));
        assert!(matches!(
            err(&[Owned::Zero(0, 4096)], b""),
            DiffStreamError::DataBeforeSize(12)
        ));
        assert!(matches!(
            err(&[size.clone(), Owned::Zero(1 << 20, 1)], b""),
            DiffStreamError::PastEnd { at: 21, .. }
        ));
        assert!(matches!(
            err(&[size.clone(), Owned::Zero(u64::MAX, 2)], b""),
            DiffStreamError::PastEnd { .. }
        ));
        assert!(matches!(
            err(&[size.clone(), size.clone()], b""),
            DiffStreamError::SizeTwice(21)
        ));
        assert!(matches!(
            err(&[size.clone(), Owned::End], b"x"),
            DiffStreamError::AfterEnd(_)
        ));
        assert!(matches!(
            err(std::slice::from_ref(&size), b"q"),
            DiffStreamError::UnknownTag(b'q', 21)
        ));
        let mut long = BANNER.to_vec();
        long.push(b'f');
        long.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&long, 4).unwrap_err(),
            DiffStreamError::NameTooLong(_)
        ));
        assert!(matches!(err(&[size], b""), DiffStreamError::CutOff(21)));
    }
}
