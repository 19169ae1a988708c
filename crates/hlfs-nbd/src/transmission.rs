//! The transmission phase: requests read one after another, each run in a
//! task of its own, replies written as they complete; and the budget of
//! bytes in flight that makes a client who stops reading stall only itself.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::proto::*;
use crate::server::{ConnError, Export};
use crate::{BlockDevice, DeviceError, DeviceExtent};

/// Requests of one connection being worked on at once.
const MAX_IN_FLIGHT: usize = 128;
/// Reads at least this large are answered sparsely (holes as hole chunks).
const SPARSE_READ_MIN: u32 = 64 * 1024;
/// What a request costs the budget beyond its data: headers, chunks.
const REQUEST_OVERHEAD: u32 = 64;

/// Bytes in flight (requests being served and replies not yet written): at
/// most `per_connection` on one connection, and beyond each connection's
/// `reserve`, at most what the `shared` budget of the whole server allows.
/// A request waits for its bytes before it is read further, so a client
/// that does not read its replies stalls only its own connection, and the
/// reserve lets every other client's small requests through meanwhile.
pub(crate) struct Budget {
    connection: Arc<Semaphore>,
    capacity: u32,
    reserve: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    shared_capacity: u32,
}

/// A request's bytes, given back when its reply has been written.
pub(crate) struct Spent {
    _connection: OwnedSemaphorePermit,
    _reserve: Option<OwnedSemaphorePermit>,
    _shared: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(
        per_connection: u32,
        reserve: u32,
        shared: &Arc<Semaphore>,
        shared_capacity: u32,
    ) -> Budget {
        Budget {
            connection: Arc::new(Semaphore::new(per_connection as usize)),
            capacity: per_connection,
            reserve: Arc::new(Semaphore::new(reserve as usize)),
            shared: shared.clone(),
            shared_capacity,
        }
    }

    /// Waits until `cost` bytes are free, and takes them.
    async fn spend(&self, cost: u32) -> Spent {
        let cost = cost.min(self.capacity);
        let connection = self
            .connection
            .clone()
            .acquire_many_owned(cost)
            .await
            .expect("the budget is never closed");
        // Only this connection's reader takes from its reserve: what is
        // available now can be taken.
        let from_reserve = (self.reserve.available_permits() as u32).min(cost);
        let reserve = match from_reserve {
            0 => None,
            n => self.reserve.clone().try_acquire_many_owned(n).ok(),
        };
        let rest = (cost - reserve.as_ref().map_or(0, |r| r.num_permits() as u32))
            .min(self.shared_capacity);
        let shared = match rest {
            0 => None,
            n => Some(
                self.shared
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("the budget is never closed"),
            ),
        };
        Spent {
            _connection: connection,
            _reserve: reserve,
            _shared: shared,
        }
    }
}

/// The bytes a request may hold until its reply is written.
fn cost(req: &Request) -> u32 {
    let data = match req.command {
        // A sparse reply adds a chunk header per run; runs are at least a
        // 512-byte block.
        CMD_READ => req.len.saturating_add(req.len / 16),
        CMD_WRITE => req.len,
        // At most 8192 descriptors of 8 bytes.
        CMD_BLOCK_STATUS => 64 * 1024,
        _ => 0,
    };
    data.saturating_add(REQUEST_OVERHEAD)
}

type Reply = Vec<u8>;

/// Buffers of written replies, kept for the connection's next large reads:
/// such a read's reply is written over an earlier one instead of into
/// fresh memory that must first be zeroed (and faulted in). Every byte of
/// a reply made from a spare is written before it is sent.
#[derive(Clone, Default)]
struct Spares(Arc<parking_lot::Mutex<Vec<Vec<u8>>>>);

/// Replies smaller than this are cheap to allocate: not kept.
const MIN_SPARE: usize = 64 << 10;
/// Nor are buffers larger than this, so that an idle connection keeps
/// little memory: at most `MAX_SPARES` × `MAX_SPARE`.
const MAX_SPARE: usize = 2 << 20;
const MAX_SPARES: usize = 8;

impl Spares {
    /// A buffer of `len` bytes whose contents the caller overwrites.
    fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_SPARE {
            if let Some(mut buf) = self.0.lock().pop() {
                // Zeros only what it grows by.
                buf.resize(len, 0);
                return buf;
            }
        }
        vec![0u8; len]
    }

    /// A reply that has been written.
    fn give(&self, buf: Vec<u8>) {
        if (MIN_SPARE..=MAX_SPARE).contains(&buf.capacity()) {
            let mut spares = self.0.lock();
            if spares.len() < MAX_SPARES {
                spares.push(buf);
            }
        }
    }
}

/// What the reader and the requests' tasks of one connection share.
pub(crate) struct Ctx {
    pub export: Export,
    pub structured: bool,
    /// The metadata contexts chosen, in the order of their ids (from 1).
    pub contexts: Vec<MetaContext>,
}

/// Reads requests, runs each in its own task, and sends the replies in the
/// order they complete, until the client disconnects or the server stops.
pub(crate) async fn transmission<R, W>(
    mut rd: R,
    mut wr: W,
    ctx: Ctx,
    budget: Budget,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(Reply, Spent)>();
    let spares = Spares::default();
    let written_spares = spares.clone();
    let mut writer = tokio::spawn(async move {
        while let Some((reply, spent)) = rx.recv().await {
            wr.write_all(&reply).await?;
            written_spares.give(reply);
            drop(spent);
            // Batch: flush only once no other reply is waiting.
            while let Ok((reply, spent)) = rx.try_recv() {
                wr.write_all(&reply).await?;
                written_spares.give(reply);
                drop(spent);
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let ctx = Arc::new(ctx);
    // Set if the writer ended first: the client takes no more replies, so
    // requests it sent are not worth reading.
    let mut written = None;
    let result = loop {
        let mut head = [0u8; REQUEST_LEN];
        tokio::select! {
            read = rd.read_exact(&mut head) => {
                if let Err(e) = read {
                    break Err(e.into());
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
            ended = &mut writer => {
                written = Some(ended);
                break Ok(());
            }
        }
        let req = match decode_request(&head) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.command == CMD_DISC {
            break Ok(());
        }
        if req.command == CMD_WRITE && req.len > MAX_PAYLOAD {
            // Its data cannot be skipped safely: hang up.
            break Err(ConnError::Protocol(format!(
                "write of {} bytes is too large",
                req.len
            )));
        }
        // Nothing more is read from this client until its request fits in
        // the budget: replies it does not read hold it back.
        let (spent, slot) = tokio::select! {
            taken = async {
                let spent = budget.spend(cost(&req)).await;
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                (spent, slot)
            } => taken,
            _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
            ended = &mut writer => {
                written = Some(ended);
                break Ok(());
            }
        };
        let mut payload = Vec::new();
        if req.command == CMD_WRITE {
            // Read into spare capacity: no zero-filling of a buffer that is
            // about to be overwritten.
            payload = Vec::with_capacity(req.len as usize);
            match (&mut rd)
                .take(req.len as u64)
                .read_to_end(&mut payload)
                .await
            {
                Ok(n) if n == req.len as usize => {}
                Ok(_) => break Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Err(e) => break Err(e.into()),
            }
        }
        let ctx = ctx.clone();
        let tx = tx.clone();
        let spares = spares.clone();
        tasks.spawn(async move {
            let reply = ctx.execute(req, payload, &spares).await;
            let _ = tx.send((reply, spent));
            drop(slot);
        });
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    };
    // Let requests already read finish and be answered, then close.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let written = match written {
        Some(ended) => ended,
        None => writer.await,
    };
    let written = written.map_err(|e| io::Error::other(e.to_string()))?;
    result?;
    written.map_err(ConnError::Io)
}

impl Ctx {
    fn dev(&self) -> &dyn BlockDevice {
        &*self.export.device
    }

    /// The reply to a request that carries no data.
    fn done(&self, cookie: u64, result: Result<(), DeviceError>) -> Reply {
        match result {
            Ok(()) => simple_reply(0, cookie).to_vec(),
            Err(e) => self.error(cookie, e),
        }
    }

    /// An error: with its message in a structured error chunk when the
    /// client negotiated structured replies, else as a simple reply.
    fn error(&self, cookie: u64, e: DeviceError) -> Reply {
        tracing::debug!(export = %self.export.name, errno = e.errno, error = %e.message, "request failed");
        if self.structured {
            error_chunk(cookie, e.errno, &e.message)
        } else {
            simple_reply(e.errno, cookie).to_vec()
        }
    }

    /// Checks a request's range; writes past the end are ENOSPC, the rest
    /// EINVAL.
    fn check_range(&self, req: &Request, write: bool) -> Result<(), DeviceError> {
        let size = self.dev().size();
        if req
            .offset
            .checked_add(req.len as u64)
            .is_none_or(|end| end > size)
        {
            let errno = if write { ENOSPC } else { EINVAL };
            return Err(DeviceError::new(
                errno,
                format!(
                    "range {}+{} is beyond the end ({size} bytes)",
                    req.offset, req.len
                ),
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), DeviceError> {
        if self.dev().read_only() {
            return Err(DeviceError::new(EPERM, "the export is read-only"));
        }
        Ok(())
    }

    /// Flags the command does not take are EINVAL.
    fn check_flags(&self, req: &Request) -> Result<(), DeviceError> {
        let extra = req.flags & !allowed_flags(req.command, self.structured);
        if extra != 0 {
            return Err(DeviceError::new(
                EINVAL,
                format!("flags {extra:#x} do not apply to command {}", req.command),
            ));
        }
        Ok(())
    }

    async fn execute(&self, req: Request, payload: Vec<u8>, spares: &Spares) -> Reply {
        let cookie = req.cookie;
        let known = matches!(
            req.command,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        );
        if !known {
            let e = DeviceError::new(EINVAL, format!("unknown command {}", req.command));
            return self.error(cookie, e);
        }
        if let Err(e) = self.check_flags(&req) {
            return self.error(cookie, e);
        }
        match req.command {
            CMD_READ => self.read(req, spares).await,
            CMD_WRITE => {
                let r = async {
                    self.check_writable()?;
                    self.check_range(&req, true)?;
                    self.dev()
                        .write(req.offset, &payload, req.flags & CMD_FLAG_FUA != 0)
                        .await
                };
                self.done(cookie, r.await)
            }
            CMD_FLUSH => self.done(cookie, self.dev().flush().await),
            CMD_TRIM => {
                let r = async {
                    self.check_writable()?;
                    self.check_range(&req, false)?;
                    self.dev().trim(req.offset, req.len as u64).await?;
                    self.fua(&req).await
                };
                self.done(cookie, r.await)
            }
            CMD_WRITE_ZEROES => {
                let r = async {
                    self.check_writable()?;
                    self.check_range(&req, true)?;
                    let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
                    if no_hole && req.flags & CMD_FLAG_FAST_ZERO != 0 {
                        // Zeros kept allocated are written as data: not fast.
                        return Err(DeviceError::new(
                            ENOTSUP,
                            "zeroing without holes is not fast",
                        ));
                    }
                    self.dev()
                        .write_zeroes(req.offset, req.len as u64, no_hole)
                        .await?;
                    self.fua(&req).await
                };
                self.done(cookie, r.await)
            }
            // Everything is one page-cache read away already.
            CMD_CACHE => self.done(cookie, self.check_range(&req, false)),
            _ => self.block_status(req).await,
        }
    }

    async fn fua(&self, req: &Request) -> Result<(), DeviceError> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.dev().flush().await
        } else {
            Ok(())
        }
    }

    async fn read(&self, req: Request, spares: &Spares) -> Reply {
        let cookie = req.cookie;
        if req.len > MAX_PAYLOAD {
            let e = DeviceError::new(EINVAL, format!("read of {} bytes is too large", req.len));
            return self.error(cookie, e);
        }
        if let Err(e) = self.check_range(&req, false) {
            return self.error(cookie, e);
        }
        let len = req.len as usize;
        if !self.structured {
            let mut out = spares.take(16 + len);
            return match self.dev().read(req.offset, &mut out[16..]).await {
                Ok(()) => {
                    out[..16].copy_from_slice(&simple_reply(0, cookie));
                    out
                }
                Err(e) => self.error(cookie, e),
            };
        }
        if len == 0 {
            // A data chunk must carry at least a byte: nothing to say.
            return chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0).to_vec();
        }
        let whole = req.flags & CMD_FLAG_DF != 0 || req.len < SPARSE_READ_MIN;
        let extents = if whole {
            vec![DeviceExtent {
                len: req.len as u64,
                allocated: true,
            }]
        } else {
            match self.extents(req.offset, req.len as u64).await {
                Ok(x) => x,
                Err(e) => return self.error(cookie, e),
            }
        };
        // Every byte of the reply, chunk by chunk, is written below.
        let size = extents
            .iter()
            .map(|x| 28 + if x.allocated { x.len as usize } else { 4 })
            .sum();
        let mut out = spares.take(size);
        let mut pos = 0;
        fn put(out: &mut [u8], pos: &mut usize, bytes: &[u8]) {
            out[*pos..*pos + bytes.len()].copy_from_slice(bytes);
            *pos += bytes.len();
        }
        let mut at = req.offset;
        let last = extents.len() - 1;
        for (i, ext) in extents.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            if ext.allocated {
                let start = pos;
                put(
                    &mut out,
                    &mut pos,
                    &chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + ext.len as u32),
                );
                put(&mut out, &mut pos, &at.to_be_bytes());
                let data = &mut out[pos..pos + ext.len as usize];
                if let Err(e) = self.dev().read(at, data).await {
                    out.truncate(start);
                    out.extend_from_slice(&self.error(cookie, e));
                    return out;
                }
                pos += ext.len as usize;
            } else {
                put(
                    &mut out,
                    &mut pos,
                    &chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12),
                );
                put(&mut out, &mut pos, &at.to_be_bytes());
                put(&mut out, &mut pos, &(ext.len as u32).to_be_bytes());
            }
            at += ext.len;
        }
        debug_assert_eq!(pos, out.len());
        out
    }

    /// The device's extents over exactly `offset..offset+len` (asking again
    /// where the device answers short).
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<DeviceExtent>, DeviceError> {
        let mut out: Vec<DeviceExtent> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let got = self.dev().extents(at, end - at).await?;
            if got.is_empty() {
                return Err(DeviceError::new(EIO, "the device reported no extents"));
            }
            for x in got {
                let x = DeviceExtent {
                    len: x.len.min(end - at),
                    allocated: x.allocated,
                };
                if x.len == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(prev) if prev.allocated == x.allocated => prev.len += x.len,
                    _ => out.push(x),
                }
                at += x.len;
                if at >= end {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn block_status(&self, req: Request) -> Reply {
        let cookie = req.cookie;
        if !self.structured || self.contexts.is_empty() {
            let e = DeviceError::new(EINVAL, "no metadata context was negotiated");
            return self.error(cookie, e);
        }
        if req.len == 0 {
            return self.error(cookie, DeviceError::new(EINVAL, "zero-length block status"));
        }
        if let Err(e) = self.check_range(&req, false) {
            return self.error(cookie, e);
        }
        // One chunk per context, the last one done; nothing is sent before
        // every context has answered, so a failure is one error reply.
        let per_context = (MAX_DESCRIPTORS / self.contexts.len()).max(1);
        let mut out = Vec::new();
        for (i, context) in self.contexts.iter().enumerate() {
            let (offset, len) = (req.offset, req.len as u64);
            let runs: Result<Vec<(u64, u32)>, DeviceError> = match context {
                MetaContext::Allocation => self.dev().extents(offset, len).await.map(|x| {
                    x.iter()
                        .map(|x| {
                            (
                                x.len,
                                if x.allocated {
                                    0
                                } else {
                                    STATE_HOLE | STATE_ZERO
                                },
                            )
                        })
                        .collect()
                }),
                MetaContext::Changes(set) => self.dev().changes(set, offset, len).await.map(|x| {
                    x.iter()
                        .map(|x| (x.len, if x.changed { STATE_DIRTY } else { 0 }))
                        .collect()
                }),
            };
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let descriptors = match runs {
                Ok(runs) => descriptors(&runs, len, if one { 1 } else { per_context }),
                Err(e) => return self.error(cookie, e),
            };
            if descriptors.is_empty() {
                let e = DeviceError::new(EIO, "the device reported no extents");
                return self.error(cookie, e);
            }
            let last = i + 1 == self.contexts.len();
            out.extend_from_slice(&chunk_header(
                if last { REPLY_FLAG_DONE } else { 0 },
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                4 + descriptors.len() as u32,
            ));
            out.extend_from_slice(&(i as u32 + 1).to_be_bytes());
            out.extend_from_slice(&descriptors);
        }
        out
    }
}

/// Block status descriptors per reply, at most (over all its contexts).
const MAX_DESCRIPTORS: usize = 8 * 1024;

/// The descriptors (length, flags) of `runs` over at most `len` bytes, at
/// most `limit` of them.
fn descriptors(runs: &[(u64, u32)], len: u64, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = len;
    for &(run, flags) in runs {
        if left == 0 || out.len() >= limit * 8 {
            break;
        }
        // Descriptor lengths are 32-bit: stay block aligned below 4 GiB.
        let whole = run.min(left);
        let n = whole.min(0xFFFF_F000);
        if n == 0 {
            continue;
        }
        out.extend_from_slice(&(n as u32).to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        left -= n;
        // A clamped run must end the answer: the next run does not start
        // where the clamp stopped.
        if n < whole {
            break;
        }
    }
    out
}
