//! NBD wire format: constants and pure encoders/decoders for the fixed
//! newstyle handshake and the transmission phase. No I/O, so every decoder
//! can be fuzzed.

use thiserror::Error;

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// qemu:dirty-bitmap:NAME status bit.
pub const STATE_DIRTY: u32 = 1 << 0;

pub const BASE_ALLOCATION: &str = "base:allocation";
/// The namespace and prefix of change sets, as qemu-nbd names its bitmaps.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A metadata context a client can ask block status of. Once selected, a
/// context's id is its place in the selection plus one (a context only
/// listed is given id 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// Which runs hold data and which are holes.
    Allocation,
    /// Which runs changed since the device's change set of this name.
    Changes(String),
}

impl MetaContext {
    pub fn name(&self) -> String {
        match self {
            MetaContext::Allocation => BASE_ALLOCATION.to_string(),
            MetaContext::Changes(set) => format!("{DIRTY_BITMAP_PREFIX}{set}"),
        }
    }
}

/// The contexts an export offers that a LIST (`set` false) or SET of
/// `queries` names, each once, in the order first named. SET takes whole
/// names only; LIST also takes a namespace ("base:", "qemu:", or the
/// bitmap prefix) for all its contexts, and no query at all for every
/// context. Names the export lacks are left out, as the protocol asks.
pub fn choose_contexts(queries: &[String], set: bool, change_sets: &[String]) -> Vec<MetaContext> {
    let offered = || {
        std::iter::once(MetaContext::Allocation)
            .chain(change_sets.iter().map(|s| MetaContext::Changes(s.clone())))
    };
    let mut chosen: Vec<MetaContext> = Vec::new();
    let mut choose = |c: MetaContext| {
        if !chosen.contains(&c) {
            chosen.push(c);
        }
    };
    if queries.is_empty() && !set {
        offered().for_each(&mut choose);
    }
    for q in queries {
        for c in offered() {
            let name = c.name();
            let whole = *q == name;
            let namespace = !set
                && match c {
                    MetaContext::Allocation => q == "base:" || q.is_empty(),
                    MetaContext::Changes(_) => q == "qemu:" || q == DIRTY_BITMAP_PREFIX,
                };
            if whole || namespace {
                choose(c);
            }
        }
    }
    chosen
}

// errno values on the wire (fixed by the protocol, not the host).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// Longest option payload accepted; longer ones are refused unread only if
/// they cannot fit, else read and answered with an error.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or context query.
pub const MAX_NAME_LEN: usize = 4096;
/// Largest READ or WRITE payload.
pub const MAX_PAYLOAD: u32 = 32 << 20;

pub const REQUEST_LEN: usize = 28;

/// Longest text (a message, a name in one) the server sends, in bytes: the
/// protocol's recommended most for a string.
pub const MAX_TEXT: usize = 256;

/// `text` cut to `MAX_TEXT` bytes at a character boundary.
pub fn short_text(text: &str) -> &str {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The command flags a request of `command` may carry; others are EINVAL.
/// FUA is allowed on every command (the protocol asks a server that
/// advertises it to accept it anywhere); DF only once structured replies
/// are on, which is also the only time DF is advertised.
pub fn allowed_flags(command: u16, structured: bool) -> u16 {
    let df = if structured { CMD_FLAG_DF } else { 0 };
    CMD_FLAG_FUA
        | match command {
            CMD_READ => df,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Bytes that do not make a valid message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("message truncated")]
    Truncated,
    #[error("{0}")]
    Invalid(&'static str),
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_NAME_LEN {
            return Err(ProtoError::Invalid("name too long"));
        }
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| ProtoError::Invalid("name is not UTF-8"))
    }
    fn done(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Invalid("trailing bytes"))
        }
    }
}

/// An option header from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn decode_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        len: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
    })
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut c = Cursor { buf: data };
    let len = c.u32()? as usize;
    let name = c.string(len)?;
    let count = c.u16()? as usize;
    let mut infos = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        infos.push(c.u16()?);
    }
    c.done()?;
    Ok(InfoRequest { name, infos })
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn decode_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut c = Cursor { buf: data };
    let len = c.u32()? as usize;
    let export = c.string(len)?;
    let count = c.u32()? as usize;
    if count > data.len() / 4 {
        return Err(ProtoError::Invalid("query count"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = c.u32()? as usize;
        queries.push(c.string(len)?);
    }
    c.done()?;
    Ok(MetaContextRequest { export, queries })
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        command: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// An option reply: header and payload.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A simple reply header (the data of a READ follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (always the last of its reply).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = short_text(message).as_bytes();
    let mut out = Vec::with_capacity(26 + msg.len());
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn info_request_round_trip() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"vm1");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = decode_info_request(&data).unwrap();
        assert_eq!(r.name, "vm1");
        assert_eq!(r.infos, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(decode_info_request(&data[..data.len() - 1]).is_err());
    }

    #[test]
    fn contexts_are_chosen_by_whole_name_or_listed_by_namespace() {
        let sets = vec!["s1".to_string(), "s2".to_string()];
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = |c: Vec<MetaContext>| c.iter().map(MetaContext::name).collect::<Vec<_>>();
        assert_eq!(
            names(choose_contexts(&[], false, &sets)),
            [
                "base:allocation",
                "qemu:dirty-bitmap:s1",
                "qemu:dirty-bitmap:s2"
            ]
        );
        assert!(choose_contexts(&[], true, &sets).is_empty());
        assert_eq!(
            names(choose_contexts(&q(&["qemu:"]), false, &sets)),
            ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"]
        );
        // SET takes whole names only, each once, in the order asked.
        assert!(choose_contexts(&q(&["qemu:", "base:"]), true, &sets).is_empty());
        assert_eq!(
            choose_contexts(
                &q(&[
                    "qemu:dirty-bitmap:s2",
                    "base:allocation",
                    "qemu:dirty-bitmap:s2",
                    "qemu:dirty-bitmap:s3"
                ]),
                true,
                &sets
            ),
            vec![MetaContext::Changes("s2".into()), MetaContext::Allocation]
        );
    }

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 77,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(decode_request(&encode_request(&r)).unwrap(), r);
    }

    proptest! {
        #[test]
        fn option_decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_info_request(&data);
            let _ = decode_meta_context_request(&data);
        }

        #[test]
        fn request_decoder_never_panics(data in proptest::array::uniform28(any::<u8>())) {
            let _ = decode_request(&data);
        }
    }
}
