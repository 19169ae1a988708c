//! The server byte for byte, with a raw client over in-memory streams and an
//! in-memory device: option haggling, replies out of order, errors as the
//! protocol defines them, hostile input, draining on shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hlfs_nbd::proto::*;
use hlfs_nbd::{
    BlockDevice, ChangedRun, DeviceError, DeviceExtent, DeviceResult, Export, Limits, Server,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{watch, Mutex};

const BS: u64 = 4096;

/// A RAM disk; reads of offsets with bit 20 set sleep a little so replies
/// come back out of order; `fail` makes every request fail with EIO. Its
/// one change set, `since-start`, holds the blocks written or zeroed.
struct MemDevice {
    size: u64,
    data: Mutex<Vec<u8>>,
    /// Per block: changed since the device was made.
    changed: Mutex<Vec<bool>>,
    read_only: bool,
    fail: AtomicBool,
    /// Reads served so far.
    reads: AtomicU64,
}

impl MemDevice {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(MemDevice {
            size: size as u64,
            data: Mutex::new(vec![0; size]),
            changed: Mutex::new(vec![false; size.div_ceil(BS as usize)]),
            read_only,
            fail: AtomicBool::new(false),
            reads: AtomicU64::new(0),
        })
    }
    async fn touch(&self, offset: u64, len: u64) {
        let mut changed = self.changed.lock().await;
        for b in offset / BS..(offset + len).div_ceil(BS) {
            changed[b as usize] = true;
        }
    }
    fn check(&self) -> DeviceResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            Err(DeviceError::new(EIO, "injected failure"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> u32 {
        BS as u32
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        if offset & (1 << 20) != 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let d = self.data.lock().await;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> DeviceResult<()> {
        self.check()?;
        let mut d = self.data.lock().await;
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.touch(offset, data.len() as u64).await;
        Ok(())
    }
    async fn flush(&self) -> DeviceResult<()> {
        self.check()
    }
    async fn trim(&self, offset: u64, len: u64) -> DeviceResult<()> {
        self.write_zeroes(offset, len, false).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _no_hole: bool) -> DeviceResult<()> {
        self.check()?;
        let mut d = self.data.lock().await;
        d[offset as usize..(offset + len) as usize].fill(0);
        self.touch(offset, len).await;
        Ok(())
    }
    /// All-zero blocks are holes.
    async fn extents(&self, offset: u64, len: u64) -> DeviceResult<Vec<DeviceExtent>> {
        self.check()?;
        let d = self.data.lock().await;
        let mut out: Vec<DeviceExtent> = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let n = (BS - at % BS).min(offset + len - at);
            let allocated = d[at as usize..(at + n) as usize].iter().any(|&b| b != 0);
            match out.last_mut() {
                Some(x) if x.allocated == allocated => x.len += n,
                _ => out.push(DeviceExtent { len: n, allocated }),
            }
            at += n;
        }
        Ok(out)
    }
    fn change_sets(&self) -> Vec<String> {
        vec!["since-start".to_string()]
    }
    async fn changes(&self, set: &str, offset: u64, len: u64) -> DeviceResult<Vec<ChangedRun>> {
        self.check()?;
        if set != "since-start" {
            return Err(DeviceError::new(EINVAL, format!("no change set {set:?}")));
        }
        let changed = self.changed.lock().await;
        let mut out: Vec<ChangedRun> = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let n = (BS - at % BS).min(offset + len - at);
            let c = changed[(at / BS) as usize];
            match out.last_mut() {
                Some(x) if x.changed == c => x.len += n,
                _ => out.push(ChangedRun { len: n, changed: c }),
            }
            at += n;
        }
        Ok(out)
    }
}

struct Harness {
    server: Arc<Server>,
    stop: watch::Sender<bool>,
    rw: Arc<MemDevice>,
    ro: Arc<MemDevice>,
}

fn harness() -> Harness {
    harness_with(Limits::default())
}

fn harness_with(limits: Limits) -> Harness {
    let rw = MemDevice::new(8 << 20, false);
    let ro = MemDevice::new(1 << 20, true);
    let (stop, stop_rx) = watch::channel(false);
    let exports = vec![
        Export {
            name: "disk".into(),
            description: "a RAM disk".into(),
            device: rw.clone(),
        },
        Export {
            name: "disk@snap".into(),
            description: "read-only".into(),
            device: ro.clone(),
        },
    ];
    Harness {
        server: Server::new(exports, None, limits, stop_rx),
        stop,
        rw,
        ro,
    }
}

impl Harness {
    /// A client stream connected to a new server connection.
    fn connect(&self) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        self.connect_with_buffer(1 << 20)
    }

    /// The same, with `buffer` bytes between the two ends each way.
    fn connect_with_buffer(&self, buffer: usize) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server_side) = tokio::io::duplex(buffer);
        let task = tokio::spawn(self.server.clone().connection(server_side, "test".into()));
        (client, task)
    }
}

async fn greet(c: &mut DuplexStream, client_flags: u32) {
    assert_eq!(c.read_u64().await.unwrap(), NBD_MAGIC);
    assert_eq!(c.read_u64().await.unwrap(), IHAVEOPT);
    let flags = c.read_u16().await.unwrap();
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c.write_u32(client_flags).await.unwrap();
}

async fn send_option(c: &mut DuplexStream, option: u32, data: &[u8]) {
    c.write_u64(IHAVEOPT).await.unwrap();
    c.write_u32(option).await.unwrap();
    c.write_u32(data.len() as u32).await.unwrap();
    c.write_all(data).await.unwrap();
}

/// (option, reply type, payload)
async fn option_reply(c: &mut DuplexStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(c.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
    let option = c.read_u32().await.unwrap();
    let kind = c.read_u32().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    c.read_exact(&mut data).await.unwrap();
    (option, kind, data)
}

fn name_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Handshake with structured replies and base:allocation, then GO.
/// Returns the transmission flags.
async fn go(c: &mut DuplexStream, export: &str) -> u16 {
    greet(c, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(c, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(c).await.1, REP_ACK);
    send_option(
        c,
        OPT_SET_META_CONTEXT,
        &meta_request(export, &[BASE_ALLOCATION]),
    )
    .await;
    let (_, kind, data) = option_reply(c).await;
    assert_eq!(kind, REP_META_CONTEXT);
    assert_eq!(&data[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(option_reply(c).await.1, REP_ACK);
    send_option(c, OPT_GO, &name_request(export, &[])).await;
    let (_, kind, info) = option_reply(c).await;
    assert_eq!(kind, REP_INFO);
    assert_eq!(u16::from_be_bytes([info[0], info[1]]), INFO_EXPORT);
    let flags = u16::from_be_bytes([info[10], info[11]]);
    loop {
        let (_, kind, _) = option_reply(c).await;
        if kind == REP_ACK {
            return flags;
        }
        assert_eq!(kind, REP_INFO);
    }
}

async fn request(
    c: &mut DuplexStream,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) {
    let r = Request {
        flags,
        command,
        cookie,
        offset,
        len,
    };
    c.write_all(&encode_request(&r)).await.unwrap();
}

/// A simple reply: (error, cookie).
async fn simple(c: &mut DuplexStream) -> (u32, u64) {
    assert_eq!(c.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    (c.read_u32().await.unwrap(), c.read_u64().await.unwrap())
}

/// The next reply to a request without data, in a session with structured
/// replies: (errno, cookie), errno 0 for success. Success may be a simple
/// reply; an error must be a structured error chunk with a message.
async fn outcome(c: &mut DuplexStream) -> (u32, u64) {
    match c.read_u32().await.unwrap() {
        SIMPLE_REPLY_MAGIC => {
            let errno = c.read_u32().await.unwrap();
            assert_eq!(errno, 0, "an error as a simple reply: {errno}");
            (0, c.read_u64().await.unwrap())
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = c.read_u16().await.unwrap();
            let kind = c.read_u16().await.unwrap();
            let cookie = c.read_u64().await.unwrap();
            let len = c.read_u32().await.unwrap();
            let mut data = vec![0; len as usize];
            c.read_exact(&mut data).await.unwrap();
            assert_ne!(flags & REPLY_FLAG_DONE, 0, "one chunk per error");
            match kind {
                REPLY_TYPE_ERROR => {
                    let errno = u32::from_be_bytes(data[..4].try_into().unwrap());
                    let msg_len = u16::from_be_bytes([data[4], data[5]]) as usize;
                    assert!(msg_len > 0, "errors say why");
                    (errno, cookie)
                }
                REPLY_TYPE_NONE => (0, cookie),
                other => panic!("unexpected chunk type {other}"),
            }
        }
        magic => panic!("bad reply magic {magic:#x}"),
    }
}

/// A structured chunk: (flags, type, cookie, payload).
async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
    assert_eq!(c.read_u32().await.unwrap(), STRUCTURED_REPLY_MAGIC);
    let flags = c.read_u16().await.unwrap();
    let kind = c.read_u16().await.unwrap();
    let cookie = c.read_u64().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    c.read_exact(&mut data).await.unwrap();
    (flags, kind, cookie, data)
}

/// Reads a whole structured READ reply into `out` (positioned at `base`).
async fn structured_read(c: &mut DuplexStream, base: u64, out: &mut [u8]) -> (u64, Vec<u16>) {
    let mut kinds = Vec::new();
    loop {
        let (flags, kind, cookie, data) = chunk(c).await;
        kinds.push(kind);
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(data[..8].try_into().unwrap()) - base;
                out[at as usize..at as usize + data.len() - 8].copy_from_slice(&data[8..]);
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let at = u64::from_be_bytes(data[..8].try_into().unwrap()) - base;
                let len = u32::from_be_bytes(data[8..12].try_into().unwrap());
                out[at as usize..(at + len as u64) as usize].fill(0);
            }
            REPLY_TYPE_ERROR => panic!("error chunk {:?}", &data[..4]),
            other => panic!("unexpected chunk type {other}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            return (cookie, kinds);
        }
    }
}

#[tokio::test]
async fn haggling_goes_on_after_unknown_options_and_lists_exports() {
    let h = harness();
    let (mut c, _task) = h.connect();
    greet(&mut c, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut c, 99, b"whatever").await;
    let (opt, kind, _) = option_reply(&mut c).await;
    assert_eq!((opt, kind), (99, REP_ERR_UNSUP));
    send_option(&mut c, OPT_STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_POLICY);
    send_option(&mut c, OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = option_reply(&mut c).await;
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        names.push(String::from_utf8(data[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "disk@snap"]);
    send_option(&mut c, OPT_INFO, &name_request("nope", &[])).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_UNKNOWN);
    send_option(&mut c, OPT_INFO, &[1, 2, 3]).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_INVALID);
    // Options that take no data refuse some.
    for option in [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_STARTTLS] {
        send_option(&mut c, option, b"x").await;
        let kind = option_reply(&mut c).await.1;
        assert!(
            kind == REP_ERR_INVALID || (option == OPT_STARTTLS && kind == REP_ERR_POLICY),
            "option {option}: {kind:#x}"
        );
    }
    // A name as long as the protocol allows: the message naming it stays
    // short, and cut at a character boundary.
    let long = "é".repeat(2048);
    send_option(&mut c, OPT_INFO, &name_request(&long, &[])).await;
    let (_, kind, message) = option_reply(&mut c).await;
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(message.len() <= 300, "{} bytes", message.len());
    assert!(String::from_utf8(message).is_ok());
    // SET_META_CONTEXT before structured replies is refused; LIST is fine.
    send_option(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &[BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_INVALID);
    send_option(&mut c, OPT_LIST_META_CONTEXT, &meta_request("disk", &[])).await;
    assert_eq!(contexts(&mut c).await.len(), 2);
    send_option(
        &mut c,
        OPT_INFO,
        &name_request("disk@snap", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    )
    .await;
    let mut infos = Vec::new();
    loop {
        let (_, kind, data) = option_reply(&mut c).await;
        if kind == REP_ACK {
            break;
        }
        let info = u16::from_be_bytes([data[0], data[1]]);
        if info == INFO_EXPORT {
            assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), 1 << 20);
            assert!(u16::from_be_bytes([data[10], data[11]]) & TF_READ_ONLY != 0);
        }
        infos.push(info);
    }
    assert_eq!(
        infos,
        [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    send_option(&mut c, OPT_ABORT, &[]).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ACK);
}

#[tokio::test]
async fn export_name_option_sends_zero_padding_unless_declined() {
    let h = harness();
    let (mut c, _task) = h.connect();
    greet(&mut c, CLIENT_FIXED_NEWSTYLE).await;
    send_option(&mut c, OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.read_u64().await.unwrap(), 8 << 20);
    let flags = c.read_u16().await.unwrap();
    assert!(flags & TF_SEND_FLUSH != 0 && flags & TF_CAN_MULTI_CONN != 0);
    let mut zeros = [1u8; 124];
    c.read_exact(&mut zeros).await.unwrap();
    assert_eq!(zeros, [0; 124]);
    // Simple replies without structured negotiation.
    request(&mut c, CMD_WRITE, 0, 5, 0, 4).await;
    c.write_all(b"abcd").await.unwrap();
    assert_eq!(simple(&mut c).await, (0, 5));
    request(&mut c, CMD_READ, 0, 6, 0, 4).await;
    assert_eq!(simple(&mut c).await, (0, 6));
    let mut data = [0u8; 4];
    c.read_exact(&mut data).await.unwrap();
    assert_eq!(&data, b"abcd");
}

#[tokio::test]
async fn many_requests_in_flight_are_answered_out_of_order() {
    let h = harness();
    let (mut c, _task) = h.connect();
    go(&mut c, "disk").await;
    // Slow reads (offset with bit 20 set) first, fast ones after.
    for i in 0..8u64 {
        let offset = if i < 4 { (1 << 20) + i * BS } else { i * BS };
        request(&mut c, CMD_READ, CMD_FLAG_DF, i, offset, BS as u32).await;
    }
    let mut order = Vec::new();
    for _ in 0..8 {
        let (flags, kind, cookie, _) = chunk(&mut c).await;
        assert_eq!(
            (flags & REPLY_FLAG_DONE, kind),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)
        );
        order.push(cookie);
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..8).collect::<Vec<_>>());
    assert!(
        order[..4].iter().all(|&c| c >= 4),
        "fast replies should overtake slow ones: {order:?}"
    );
}

#[tokio::test]
async fn errors_follow_the_protocol() {
    let h = harness();
    let (mut c, _task) = h.connect();
    go(&mut c, "disk").await;
    let size = 8u64 << 20;
    request(&mut c, CMD_READ, 0, 1, size - 10, 20).await;
    assert_eq!(outcome(&mut c).await, (EINVAL, 1));
    // Writes past the end are ENOSPC, trims EINVAL.
    request(&mut c, CMD_WRITE, 0, 2, size - 2, 4).await;
    c.write_all(b"wxyz").await.unwrap();
    assert_eq!(outcome(&mut c).await, (ENOSPC, 2));
    request(&mut c, CMD_TRIM, 0, 3, size, 1).await;
    assert_eq!(outcome(&mut c).await, (EINVAL, 3));
    request(&mut c, CMD_WRITE_ZEROES, 0, 31, size - 4096, 8192).await;
    assert_eq!(outcome(&mut c).await, (ENOSPC, 31));
    request(&mut c, CMD_BLOCK_STATUS, 0, 32, size - 4096, 8192).await;
    assert_eq!(outcome(&mut c).await, (EINVAL, 32));
    // Zeros that must stay allocated are written as data: not fast.
    request(
        &mut c,
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        33,
        0,
        4096,
    )
    .await;
    assert_eq!(outcome(&mut c).await, (ENOTSUP, 33));
    request(&mut c, 77, 0, 4, 0, 0).await;
    assert_eq!(outcome(&mut c).await, (EINVAL, 4));
    h.rw.fail.store(true, Ordering::SeqCst);
    request(&mut c, CMD_FLUSH, 0, 5, 0, 0).await;
    assert_eq!(outcome(&mut c).await, (EIO, 5));
    h.rw.fail.store(false, Ordering::SeqCst);
    request(&mut c, CMD_FLUSH, 0, 6, 0, 0).await;
    assert_eq!(outcome(&mut c).await, (0, 6));

    let (mut r, _task) = h.connect();
    let flags = go(&mut r, "disk@snap").await;
    assert!(flags & TF_READ_ONLY != 0 && flags & TF_SEND_TRIM == 0);
    request(&mut r, CMD_WRITE, 0, 7, 0, 2).await;
    r.write_all(b"no").await.unwrap();
    assert_eq!(outcome(&mut r).await, (EPERM, 7));
    request(&mut r, CMD_WRITE_ZEROES, 0, 8, 0, 4096).await;
    assert_eq!(outcome(&mut r).await, (EPERM, 8));
    request(&mut r, CMD_TRIM, 0, 9, 0, 4096).await;
    assert_eq!(outcome(&mut r).await, (EPERM, 9));
    assert!(h.ro.data.lock().await.iter().all(|&b| b == 0));
}

/// Command flags: FUA on every command, DF only on reads and only with
/// structured replies, the others on the commands they belong to; any other
/// bit is EINVAL, on the wire, and the request does nothing.
#[tokio::test]
async fn command_flags_that_do_not_apply_are_refused() {
    let h = harness();
    let (mut c, _task) = h.connect();
    let flags = go(&mut c, "disk").await;
    assert_ne!(
        flags & TF_SEND_DF,
        0,
        "DF is offered with structured replies"
    );
    let refused: [(u16, u16); 9] = [
        (CMD_CACHE, CMD_FLAG_DF),
        (CMD_CACHE, 1 << 7),
        (CMD_READ, CMD_FLAG_NO_HOLE),
        (CMD_READ, CMD_FLAG_REQ_ONE),
        (CMD_TRIM, CMD_FLAG_NO_HOLE),
        (CMD_TRIM, CMD_FLAG_FAST_ZERO),
        (CMD_FLUSH, CMD_FLAG_DF),
        (CMD_WRITE_ZEROES, CMD_FLAG_DF),
        (CMD_BLOCK_STATUS, CMD_FLAG_NO_HOLE),
    ];
    for (i, &(command, flags)) in refused.iter().enumerate() {
        request(&mut c, command, flags, i as u64, 0, 4096).await;
        assert_eq!(
            outcome(&mut c).await,
            (EINVAL, i as u64),
            "command {command} with flags {flags:#x}"
        );
    }
    // A write with a flag it does not take: its data is read and dropped.
    request(&mut c, CMD_WRITE, CMD_FLAG_DF, 50, 0, 4).await;
    c.write_all(b"nope").await.unwrap();
    assert_eq!(outcome(&mut c).await, (EINVAL, 50));
    assert!(h.rw.data.lock().await[..4].iter().all(|&b| b == 0));
    // FUA is taken everywhere.
    for (i, command) in [CMD_READ, CMD_FLUSH, CMD_CACHE, CMD_TRIM]
        .into_iter()
        .enumerate()
    {
        let cookie = 60 + i as u64;
        request(&mut c, command, CMD_FLAG_FUA, cookie, 0, 4096).await;
        if command == CMD_READ {
            let mut out = vec![0u8; 4096];
            assert_eq!(structured_read(&mut c, 0, &mut out).await.0, cookie);
        } else {
            assert_eq!(outcome(&mut c).await, (0, cookie), "command {command}");
        }
    }
    // A read of nothing is answered with one empty chunk.
    request(&mut c, CMD_READ, 0, 70, 0, 0).await;
    assert_eq!(outcome(&mut c).await, (0, 70));

    // Without structured replies DF is neither offered nor taken.
    let (mut s, _task) = h.connect();
    greet(&mut s, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut s, OPT_GO, &name_request("disk", &[])).await;
    let (_, kind, info) = option_reply(&mut s).await;
    assert_eq!(kind, REP_INFO);
    let flags = u16::from_be_bytes([info[10], info[11]]);
    assert_eq!(flags & TF_SEND_DF, 0, "no DF without structured replies");
    while option_reply(&mut s).await.1 != REP_ACK {}
    request(&mut s, CMD_READ, CMD_FLAG_DF, 80, 0, 4096).await;
    assert_eq!(simple(&mut s).await, (EINVAL, 80));
    let (mut e, _task) = h.connect();
    greet(&mut e, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut e, OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(e.read_u64().await.unwrap(), 8 << 20);
    assert_eq!(e.read_u16().await.unwrap() & TF_SEND_DF, 0);
}

#[tokio::test]
async fn sparse_reads_and_block_status_report_holes() {
    let h = harness();
    let (mut c, _task) = h.connect();
    go(&mut c, "disk").await;
    // Data at [64K, 72K) only.
    request(&mut c, CMD_WRITE, CMD_FLAG_FUA, 1, 65536, 8192).await;
    c.write_all(&[0x5a; 8192]).await.unwrap();
    assert_eq!(simple(&mut c).await, (0, 1));
    let mut out = vec![0xffu8; 256 * 1024];
    request(&mut c, CMD_READ, 0, 2, 0, out.len() as u32).await;
    let (cookie, kinds) = structured_read(&mut c, 0, &mut out).await;
    assert_eq!(cookie, 2);
    assert_eq!(
        kinds,
        [
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert!(out[..65536].iter().all(|&b| b == 0));
    assert!(out[65536..73728].iter().all(|&b| b == 0x5a));
    assert!(out[73728..].iter().all(|&b| b == 0));

    // Replies are written over the buffers of earlier ones: after a large
    // read of data, reads of the same size elsewhere (whole, with DF, or
    // sparse) carry none of its bytes.
    let big = 256 * 1024;
    request(&mut c, CMD_WRITE, CMD_FLAG_FUA, 10, 1 << 20, big as u32).await;
    c.write_all(&vec![0x77; big]).await.unwrap();
    assert_eq!(simple(&mut c).await, (0, 10));
    for (cookie, offset, flags) in [(11, 1 << 20, 0), (12, 2 << 20, CMD_FLAG_DF), (13, 0, 0)] {
        let mut got = vec![0xffu8; big];
        request(&mut c, CMD_READ, flags, cookie, offset, big as u32).await;
        assert_eq!(structured_read(&mut c, offset, &mut got).await.0, cookie);
        let expected = match cookie {
            11 => vec![0x77; big],
            12 => vec![0; big],
            _ => out.clone(),
        };
        assert!(got == expected, "read {cookie}");
    }

    request(&mut c, CMD_BLOCK_STATUS, 0, 3, 0, 1 << 20).await;
    let (flags, kind, _, data) = chunk(&mut c).await;
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), 1);
    let descs: Vec<(u32, u32)> = data[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(descs, [(65536, hz), (8192, 0), ((1 << 20) - 73728, hz)]);
    request(
        &mut c,
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        4,
        65536,
        1 << 20,
    )
    .await;
    let (_, _, _, data) = chunk(&mut c).await;
    assert_eq!(data.len(), 12, "REQ_ONE gives one descriptor");

    request(&mut c, CMD_WRITE_ZEROES, 0, 5, 65536, 8192).await;
    assert_eq!(simple(&mut c).await, (0, 5));
    request(&mut c, CMD_CACHE, 0, 6, 0, 4096).await;
    assert_eq!(simple(&mut c).await, (0, 6));
    request(&mut c, CMD_DISC, 0, 7, 0, 0).await;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing after DISC");
}

/// Hostile and broken clients: each one's connection ends, the server and
/// the other clients carry on.
#[tokio::test]
async fn hostile_input_closes_only_that_connection() {
    let h = harness();
    let hostile: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 4],                                       // bad client flags
        [1u32.to_be_bytes().to_vec(), vec![0; 16]].concat(), // bad option magic
        [
            3u32.to_be_bytes().to_vec(),
            IHAVEOPT.to_be_bytes().to_vec(),
            OPT_GO.to_be_bytes().to_vec(),
            u32::MAX.to_be_bytes().to_vec(), // absurd option length
        ]
        .concat(),
        [
            3u32.to_be_bytes().to_vec(),
            IHAVEOPT.to_be_bytes().to_vec(),
            OPT_EXPORT_NAME.to_be_bytes().to_vec(),
            4u32.to_be_bytes().to_vec(),
            b"nope".to_vec(), // unknown export, old style
        ]
        .concat(),
        (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(), // noise
    ];
    let mut tasks = Vec::new();
    for bytes in hostile {
        let (mut c, task) = h.connect();
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        let _ = c.write_all(&bytes).await;
        tasks.push((c, task));
    }
    // In transmission: bad request magic, an absurd write, a write cut off.
    for kind in 0..3 {
        let (mut c, task) = h.connect();
        go(&mut c, "disk").await;
        match kind {
            0 => c.write_all(&[0xAB; 28]).await.unwrap(),
            1 => request(&mut c, CMD_WRITE, 0, 1, 0, u32::MAX).await,
            _ => {
                request(&mut c, CMD_WRITE, 0, 1, 0, 1 << 20).await;
                c.write_all(&[1; 1000]).await.unwrap();
            }
        }
        tasks.push((c, task));
    }
    for (c, task) in tasks {
        drop(c); // the client vanishes
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a hostile connection must end promptly")
            .unwrap();
    }
    // A well-behaved client is served as before.
    let (mut c, _task) = h.connect();
    go(&mut c, "disk").await;
    request(&mut c, CMD_WRITE, 0, 9, 4096, 3).await;
    c.write_all(b"ok!").await.unwrap();
    assert_eq!(simple(&mut c).await, (0, 9));
    assert_eq!(&h.rw.data.lock().await[4096..4099], b"ok!");
    assert!(
        h.rw.data.lock().await[..4096].iter().all(|&b| b == 0),
        "the cut-off write must not land"
    );
}

#[tokio::test]
async fn shutdown_drains_requests_already_read() {
    let h = harness();
    let (mut c, task) = h.connect();
    go(&mut c, "disk").await;
    for i in 0..16u64 {
        request(
            &mut c,
            CMD_READ,
            CMD_FLAG_DF,
            i,
            (1 << 20) + i * BS,
            BS as u32,
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.stop.send(true).unwrap();
    let mut answered = 0;
    let mut rest = Vec::new();
    while let Ok(Ok(magic)) = tokio::time::timeout(Duration::from_secs(5), c.read_u32()).await {
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let mut head = [0u8; 16];
        c.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        rest.resize(len as usize, 0);
        c.read_exact(&mut rest).await.unwrap();
        answered += 1;
    }
    assert_eq!(
        answered, 16,
        "every request read before shutdown is answered"
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// A device larger than a block-status descriptor can describe: data for
/// the first 0xFFFF_F800 bytes, then a hole.
struct Huge;

const HUGE_DATA: u64 = 0xFFFF_F800;

#[async_trait]
impl BlockDevice for Huge {
    fn size(&self) -> u64 {
        16 << 30
    }
    fn read_only(&self) -> bool {
        true
    }
    fn block_size(&self) -> u32 {
        BS as u32
    }
    async fn read(&self, _: u64, buf: &mut [u8]) -> DeviceResult<()> {
        buf.fill(1);
        Ok(())
    }
    async fn write(&self, _: u64, _: &[u8], _: bool) -> DeviceResult<()> {
        Err(DeviceError::new(EPERM, "read-only"))
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64) -> DeviceResult<()> {
        Err(DeviceError::new(EPERM, "read-only"))
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult<()> {
        Err(DeviceError::new(EPERM, "read-only"))
    }
    async fn extents(&self, offset: u64, len: u64) -> DeviceResult<Vec<DeviceExtent>> {
        let end = offset + len;
        let mut out = Vec::new();
        if offset < HUGE_DATA {
            out.push(DeviceExtent {
                len: HUGE_DATA.min(end) - offset,
                allocated: true,
            });
        }
        if end > HUGE_DATA {
            out.push(DeviceExtent {
                len: end - HUGE_DATA.max(offset),
                allocated: false,
            });
        }
        Ok(out)
    }
    fn change_sets(&self) -> Vec<String> {
        Vec::new()
    }
    async fn changes(&self, set: &str, _: u64, _: u64) -> DeviceResult<Vec<ChangedRun>> {
        Err(DeviceError::new(EINVAL, format!("no change set {set:?}")))
    }
}

#[tokio::test]
async fn block_status_never_calls_data_a_hole_when_a_run_is_too_long_for_one_descriptor() {
    let (_stop, stop_rx) = watch::channel(false);
    let export = Export {
        name: "huge".into(),
        description: String::new(),
        device: Arc::new(Huge),
    };
    let server = Server::new(vec![export], None, Limits::default(), stop_rx);
    let (mut c, server_side) = tokio::io::duplex(1 << 20);
    tokio::spawn(server.connection(server_side, "test".into()));
    go(&mut c, "huge").await;
    request(&mut c, CMD_BLOCK_STATUS, 0, 1, 0, u32::MAX).await;
    let (_, kind, _, data) = chunk(&mut c).await;
    assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
    let mut at = 0u64;
    for d in data[4..].chunks(8) {
        let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as u64;
        let flags = u32::from_be_bytes(d[4..].try_into().unwrap());
        if flags & STATE_HOLE != 0 {
            assert!(
                at >= HUGE_DATA,
                "bytes from {at} reported as a hole, but data runs to {HUGE_DATA}"
            );
        }
        at += len;
    }
    assert!(at > 0);
}

/// Option haggling after a failed SET_META_CONTEXT, LIST's context ids, and
/// options during shutdown.
#[tokio::test]
async fn meta_contexts_are_replaced_by_a_failed_set_and_listed_with_id_zero() {
    let h = harness();
    let (mut c, _task) = h.connect();
    greet(&mut c, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ACK);
    send_option(&mut c, OPT_LIST_META_CONTEXT, &meta_request("disk", &[])).await;
    assert_eq!(
        contexts(&mut c).await,
        [
            (0, BASE_ALLOCATION.to_string()),
            (0, "qemu:dirty-bitmap:since-start".to_string())
        ],
        "a listed context has id 0"
    );
    send_option(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &[BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(option_reply(&mut c).await.1, REP_META_CONTEXT);
    assert_eq!(option_reply(&mut c).await.1, REP_ACK);
    // A SET that fails still replaces the selection: none is left.
    send_option(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_request("nope", &[BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_UNKNOWN);
    send_option(&mut c, OPT_GO, &name_request("disk", &[])).await;
    while option_reply(&mut c).await.1 != REP_ACK {}
    request(&mut c, CMD_BLOCK_STATUS, 0, 1, 0, 4096).await;
    assert_eq!(outcome(&mut c).await, (EINVAL, 1));

    // During shutdown, options get ERR_SHUTDOWN and ABORT still works.
    let (mut d, task) = h.connect();
    greet(&mut d, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    h.stop.send(true).unwrap();
    send_option(&mut d, OPT_GO, &name_request("disk", &[])).await;
    assert_eq!(option_reply(&mut d).await.1, REP_ERR_SHUTDOWN);
    send_option(&mut d, OPT_ABORT, &[]).await;
    assert_eq!(option_reply(&mut d).await.1, REP_ACK);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// The META_CONTEXT replies up to the ACK: each context's id and name.
async fn contexts(c: &mut DuplexStream) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    loop {
        let (_, kind, data) = option_reply(c).await;
        if kind == REP_ACK {
            return out;
        }
        assert_eq!(kind, REP_META_CONTEXT);
        let id = u32::from_be_bytes(data[..4].try_into().unwrap());
        out.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
    }
}

/// Block status descriptors (length, flags) of a chunk's payload, after
/// its context id.
fn descriptors(data: &[u8]) -> Vec<(u32, u32)> {
    data[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

#[tokio::test]
async fn change_sets_are_served_as_dirty_bitmaps_beside_allocation() {
    let h = harness();
    let (mut c, _task) = h.connect();
    greet(&mut c, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ACK);
    send_option(
        &mut c,
        OPT_LIST_META_CONTEXT,
        &meta_request("disk", &["qemu:"]),
    )
    .await;
    let bitmap = "qemu:dirty-bitmap:since-start";
    assert_eq!(contexts(&mut c).await, [(0, bitmap.to_string())]);
    send_option(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &[bitmap, "qemu:dirty-bitmap:nope", BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(
        contexts(&mut c).await,
        [(1, bitmap.to_string()), (2, BASE_ALLOCATION.to_string())]
    );
    send_option(&mut c, OPT_GO, &name_request("disk", &[])).await;
    while option_reply(&mut c).await.1 != REP_ACK {}

    // Written data, then zeros written over data that was never there:
    // both changed; only the first allocated.
    let data = vec![0x77u8; 8192];
    request(&mut c, CMD_WRITE, 0, 1, 16384, data.len() as u32).await;
    c.write_all(&data).await.unwrap();
    assert_eq!(outcome(&mut c).await, (0, 1));
    request(&mut c, CMD_WRITE_ZEROES, 0, 2, 24576, 4096).await;
    assert_eq!(outcome(&mut c).await, (0, 2));
    request(&mut c, CMD_BLOCK_STATUS, 0, 3, 0, 65536).await;
    let (flags, kind, cookie, first) = chunk(&mut c).await;
    assert_eq!((flags, kind, cookie), (0, REPLY_TYPE_BLOCK_STATUS, 3));
    assert_eq!(u32::from_be_bytes(first[..4].try_into().unwrap()), 1);
    assert_eq!(
        descriptors(&first),
        [(16384, 0), (12288, STATE_DIRTY), (65536 - 28672, 0)]
    );
    let (flags, kind, cookie, second) = chunk(&mut c).await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 3)
    );
    assert_eq!(u32::from_be_bytes(second[..4].try_into().unwrap()), 2);
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        descriptors(&second),
        [(16384, hz), (8192, 0), (65536 - 24576, hz)]
    );
    // REQ_ONE: one descriptor per context.
    request(&mut c, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 20480, 65536).await;
    assert_eq!(descriptors(&chunk(&mut c).await.3), [(8192, STATE_DIRTY)]);
    assert_eq!(descriptors(&chunk(&mut c).await.3), [(4096, 0)]);

    // A failing change set is one error reply, not half an answer.
    h.rw.fail.store(true, Ordering::SeqCst);
    request(&mut c, CMD_BLOCK_STATUS, 0, 5, 0, 4096).await;
    assert_eq!(outcome(&mut c).await, (EIO, 5));
    h.rw.fail.store(false, Ordering::SeqCst);

    // Contexts chosen for one export are not those of another.
    let (mut d, _task) = h.connect();
    greet(&mut d, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut d, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut d).await.1, REP_ACK);
    send_option(
        &mut d,
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &[bitmap]),
    )
    .await;
    assert_eq!(contexts(&mut d).await.len(), 1);
    send_option(&mut d, OPT_GO, &name_request("disk@snap", &[])).await;
    while option_reply(&mut d).await.1 != REP_ACK {}
    request(&mut d, CMD_BLOCK_STATUS, 0, 1, 0, 4096).await;
    assert_eq!(outcome(&mut d).await, (EINVAL, 1));
}

/// A client that connects and says nothing is cut off after the handshake
/// timeout; the transmission phase has no such limit.
#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_cut_off() {
    let h = harness_with(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    let (mut silent, task) = h.connect();
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("cut off after the handshake timeout")
        .unwrap();
    let mut rest = Vec::new();
    silent.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // A client in transmission may stay idle longer.
    let (mut c, task) = h.connect();
    go(&mut c, "disk").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    request(&mut c, CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(outcome(&mut c).await, (0, 1));
    assert!(!task.is_finished());
}

/// One client too many for an export is refused when it asks for it, and
/// let in once a place is free.
#[tokio::test]
async fn an_export_takes_at_most_its_number_of_clients() {
    let h = harness_with(Limits {
        max_connections_per_export: 1,
        ..Limits::default()
    });
    let (mut first, first_task) = h.connect();
    go(&mut first, "disk").await;
    let (mut second, _task) = h.connect();
    greet(&mut second, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut second, OPT_GO, &name_request("disk", &[])).await;
    let (_, kind, message) = option_reply(&mut second).await;
    assert_eq!(kind, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&message).contains("too many"));
    // Another export still has room.
    send_option(&mut second, OPT_INFO, &name_request("disk@snap", &[])).await;
    while option_reply(&mut second).await.1 != REP_ACK {}
    request(&mut first, CMD_DISC, 0, 0, 0, 0).await;
    first_task.await.unwrap();
    send_option(&mut second, OPT_GO, &name_request("disk", &[])).await;
    let (_, kind, _) = option_reply(&mut second).await;
    assert_eq!(kind, REP_INFO, "let in once the first has gone");
}

/// An owner can keep an idle export idle while it changes the disk (a
/// rollback): refused while a client is connected, and while held, new
/// clients are told to try again later.
#[tokio::test]
async fn an_idle_export_can_be_held_against_new_clients() {
    let h = harness();
    let (mut first, first_task) = h.connect();
    go(&mut first, "disk").await;
    assert_eq!(
        h.server.hold_idle("disk").err(),
        Some(1),
        "one client is connected"
    );
    request(&mut first, CMD_DISC, 0, 0, 0, 0).await;
    first_task.await.unwrap();
    let hold = h.server.hold_idle("disk").expect("idle now");
    assert_eq!(h.server.hold_idle("disk").err(), Some(0), "held already");

    let (mut second, _task) = h.connect();
    greet(&mut second, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    send_option(&mut second, OPT_GO, &name_request("disk", &[])).await;
    let (_, kind, message) = option_reply(&mut second).await;
    assert_eq!(kind, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&message).contains("try again later"));
    // Other exports are not held.
    send_option(&mut second, OPT_INFO, &name_request("disk@snap", &[])).await;
    while option_reply(&mut second).await.1 != REP_ACK {}
    drop(hold);
    send_option(&mut second, OPT_GO, &name_request("disk", &[])).await;
    let (_, kind, _) = option_reply(&mut second).await;
    assert_eq!(kind, REP_INFO, "let in once the hold is dropped");
}

/// Past the server's number of connections, a new client is closed at once;
/// one more is let in when another leaves.
#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    let rw = MemDevice::new(1 << 20, false);
    let (stop, stop_rx) = watch::channel(false);
    let export = Export {
        name: "disk".into(),
        description: String::new(),
        device: rw,
    };
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let server = Server::new(vec![export], None, limits, stop_rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(server.serve_tcp(listener));
    let greeted = |mut s: tokio::net::TcpStream| async move {
        let mut greeting = [0u8; 18];
        let got = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting)).await;
        (got.expect("an answer in time").is_ok(), s)
    };
    let (ok1, one) = greeted(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    let (ok2, two) = greeted(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    let (ok3, _) = greeted(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    assert!(ok1 && ok2 && !ok3, "the third is closed at once");
    drop(one);
    let mut let_in = false;
    for _ in 0..50 {
        let (ok, _s) = greeted(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
        if ok {
            let_in = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(let_in, "a place freed by a client that left is given again");
    drop(two);
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("clients still in the handshake do not hold up shutdown")
        .unwrap()
        .unwrap();
}

/// A client that pipelines large reads and never reads the replies holds at
/// most its budget of bytes in flight: the server stops reading its requests,
/// and another client is served meanwhile.
#[tokio::test]
async fn a_client_that_does_not_read_its_replies_stalls_only_itself() {
    let h = harness_with(Limits {
        connection_bytes: 34 << 20,
        total_bytes: 16 << 20,
        ..Limits::default()
    });
    let mib = 1u32 << 20;
    let mut hostile = Vec::new();
    for _ in 0..3 {
        let (mut c, task) = h.connect_with_buffer(256 << 10);
        go(&mut c, "disk").await;
        let writer = tokio::spawn(async move {
            for i in 0..100_000u64 {
                let at = (i % 7) * u64::from(mib);
                if tokio::time::timeout(Duration::from_secs(1), async {
                    request(&mut c, CMD_READ, CMD_FLAG_DF, i, at, mib).await
                })
                .await
                .is_err()
                {
                    return (c, i);
                }
            }
            (c, 100_000)
        });
        hostile.push((writer, task));
    }
    let mut clients = Vec::new();
    for (writer, task) in hostile {
        let (c, sent) = writer.await.unwrap();
        assert!(sent < 100_000, "the server stopped reading requests");
        clients.push((c, task));
    }
    // Served: at most the total budget plus each connection's reserve, and
    // what the socket buffers hold, in MiB-sized reads.
    let served = h.rw.reads.load(Ordering::SeqCst);
    assert!(
        served <= 16 + 3 + 3,
        "{served} reads served while nobody read a reply"
    );
    // A small read of another client goes through at once.
    let (mut good, _task) = h.connect();
    go(&mut good, "disk").await;
    request(&mut good, CMD_READ, 0, 1, 0, 512).await;
    let mut out = [0u8; 512];
    let answered = tokio::time::timeout(
        Duration::from_secs(2),
        structured_read(&mut good, 0, &mut out),
    )
    .await;
    assert_eq!(answered.expect("answered while the others stall").0, 1);
    // The stalled clients leave: their connections end, and their bytes are
    // given back (a big read of the good client fits the total again).
    for (c, task) in clients {
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a stalled connection ends when its client goes")
            .unwrap();
    }
    request(&mut good, CMD_READ, CMD_FLAG_DF, 2, 0, 8 << 20).await;
    let mut big = vec![0u8; 8 << 20];
    let answered = tokio::time::timeout(
        Duration::from_secs(2),
        structured_read(&mut good, 0, &mut big),
    )
    .await;
    assert_eq!(answered.expect("the budget came back").0, 2);
}
