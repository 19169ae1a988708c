//! Connections: the handshake, option haggling, then the transmission phase
//! with many requests in flight, answered as they complete.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::proto::*;
use crate::{BlockDevice, DeviceError, DeviceExtent};

/// One named device on offer.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

/// Serves a set of exports until told to shut down.
pub struct Server {
    exports: BTreeMap<String, Export>,
    /// When set, clients must upgrade with STARTTLS before anything else.
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
}

/// Requests of one connection being worked on at once; the reader waits when
/// this many are in flight, which bounds a connection's memory.
const MAX_IN_FLIGHT: usize = 128;
/// How long shutdown waits for connections to finish their requests.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// Reads at least this large are answered sparsely (holes as hole chunks).
const SPARSE_READ_MIN: u32 = 64 * 1024;

/// Why a connection ended early. Logged, never fatal to the server.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<ProtoError> for ConnError {
    fn from(e: ProtoError) -> Self {
        ConnError::Protocol(e.to_string())
    }
}

type Reply = Vec<u8>;

/// A source of client connections: a stream and a name for the log.
trait Listener: Send {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string()))
    }
}

/// Unix clients have no address: they are numbered.
struct UnixConnections {
    listener: UnixListener,
    next: u64,
}

impl Listener for UnixConnections {
    type Stream = tokio::net::UnixStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, _) = self.listener.accept().await?;
        self.next += 1;
        Ok((stream, format!("unix#{}", self.next)))
    }
}

impl Server {
    /// `shutdown` flips to true when the server should stop: it then stops
    /// accepting, lets every connection finish the requests it has read, and
    /// returns.
    pub fn new(
        exports: Vec<Export>,
        tls: Option<TlsAcceptor>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Server> {
        Arc::new(Server {
            exports: exports.into_iter().map(|e| (e.name.clone(), e)).collect(),
            tls,
            shutdown,
        })
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        self.serve(listener).await
    }

    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) -> io::Result<()> {
        self.serve(UnixConnections { listener, next: 0 }).await
    }

    /// Accepts clients until shutdown, then lets connections finish what
    /// they have read, for at most `DRAIN_DEADLINE`.
    async fn serve<L: Listener>(self: Arc<Self>, mut listener: L) -> io::Result<()> {
        let mut shutdown = self.shutdown.clone();
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(self.clone().connection(stream, peer));
                }
                Err(e) => {
                    // Out of descriptors, a connection reset before it was
                    // accepted...: the server itself is fine.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // A client stalled mid-request must not keep the volumes from
            // being flushed and closed.
            tracing::warn!(
                "{} connections still busy after {:?}; closing them",
                conns.len(),
                DRAIN_DEADLINE
            );
            conns.shutdown().await;
        }
        Ok(())
    }

    /// Serves one client on any byte stream.
    pub async fn connection<S>(self: Arc<Self>, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tracing::info!(%peer, "client connected");
        match self.run_connection(stream, &peer).await {
            Ok(()) => tracing::info!(%peer, "client disconnected"),
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::info!(%peer, "client went away")
            }
            Err(e) => tracing::warn!(%peer, error = %e, "connection closed"),
        }
    }

    async fn run_connection<S>(&self, mut stream: S, peer: &str) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        stream.write_all(&NBD_MAGIC.to_be_bytes()).await?;
        stream.write_all(&IHAVEOPT.to_be_bytes()).await?;
        stream
            .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await?;
        stream.flush().await?;
        let client_flags = stream.read_u32().await?;
        if client_flags & CLIENT_FIXED_NEWSTYLE == 0
            || client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        {
            return Err(ConnError::Protocol(format!(
                "unsupported client flags {client_flags:#x}"
            )));
        }
        let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        let Some(acceptor) = &self.tls else {
            return self
                .negotiate_and_serve(stream, no_zeroes, false, peer)
                .await;
        };
        // Until the client upgrades, only STARTTLS and ABORT are answered.
        loop {
            let (opt, data) = read_option(&mut stream).await?;
            let reply = |kind: u32, payload: &[u8]| option_reply(opt.option, kind, payload);
            match opt.option {
                OPT_STARTTLS if data.is_empty() => {
                    stream.write_all(&reply(REP_ACK, &[])).await?;
                    stream.flush().await?;
                    let tls = acceptor.accept(stream).await?;
                    tracing::info!(%peer, "TLS established");
                    return self.negotiate_and_serve(tls, no_zeroes, true, peer).await;
                }
                OPT_ABORT => {
                    let _ = stream.write_all(&reply(REP_ACK, &[])).await;
                    let _ = stream.flush().await;
                    return Ok(());
                }
                OPT_EXPORT_NAME => {
                    return Err(ConnError::Protocol(
                        "export requested before STARTTLS on a TLS-only server".into(),
                    ))
                }
                OPT_STARTTLS => {
                    stream
                        .write_all(&reply(REP_ERR_INVALID, b"STARTTLS takes no data"))
                        .await?
                }
                _ => {
                    stream
                        .write_all(&reply(REP_ERR_TLS_REQD, b"this server requires TLS"))
                        .await?
                }
            }
            stream.flush().await?;
        }
    }

    async fn negotiate_and_serve<S>(
        &self,
        stream: S,
        no_zeroes: bool,
        tls: bool,
        peer: &str,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        match self.haggle(&mut rd, &mut wr, no_zeroes, tls).await? {
            Some((export, structured, meta)) => {
                tracing::info!(%peer, export = %export.name, "client chose export");
                transmission(rd, wr, export, structured, meta, self.shutdown.clone()).await
            }
            None => Ok(()),
        }
    }

    fn transmission_flags(&self, export: &Export) -> u16 {
        let mut flags = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_DF
            | TF_CAN_MULTI_CONN
            | TF_SEND_CACHE;
        if export.device.read_only() {
            flags |= TF_READ_ONLY;
        } else {
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        flags
    }

    /// Haggles options until the client picks an export (Some) or leaves.
    async fn haggle<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        no_zeroes: bool,
        tls: bool,
    ) -> Result<Option<(Export, bool, bool)>, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut structured = false;
        let mut meta = false;
        loop {
            let (opt, data) = read_option(rd).await?;
            let reply = |kind: u32, payload: &[u8]| option_reply(opt.option, kind, payload);
            match opt.option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = self.exports.get(&name).cloned() else {
                        // The old-style option has no way to say no but hanging up.
                        return Err(ConnError::Protocol(format!("no export named {name:?}")));
                    };
                    wr.write_all(&export.device.size().to_be_bytes()).await?;
                    wr.write_all(&self.transmission_flags(&export).to_be_bytes())
                        .await?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124]).await?;
                    }
                    wr.flush().await?;
                    return Ok(Some((export, structured, meta)));
                }
                OPT_ABORT => {
                    let _ = wr.write_all(&reply(REP_ACK, &[])).await;
                    let _ = wr.flush().await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        wr.write_all(&reply(REP_ERR_INVALID, b"LIST takes no data"))
                            .await?;
                    } else {
                        for name in self.exports.keys() {
                            let mut payload = (name.len() as u32).to_be_bytes().to_vec();
                            payload.extend_from_slice(name.as_bytes());
                            wr.write_all(&reply(REP_SERVER, &payload)).await?;
                        }
                        wr.write_all(&reply(REP_ACK, &[])).await?;
                    }
                }
                OPT_STARTTLS if tls => {
                    wr.write_all(&reply(REP_ERR_INVALID, b"TLS is already on"))
                        .await?;
                }
                OPT_STARTTLS => {
                    wr.write_all(&reply(REP_ERR_POLICY, b"TLS is not enabled on this server"))
                        .await?;
                }
                OPT_INFO | OPT_GO => match decode_info_request(&data) {
                    Err(e) => {
                        wr.write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes()))
                            .await?
                    }
                    Ok(req) => match self.exports.get(&req.name).cloned() {
                        None => {
                            let msg = format!("no export named {:?}", req.name);
                            wr.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                                .await?;
                        }
                        Some(export) => {
                            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                            info.extend_from_slice(&export.device.size().to_be_bytes());
                            info.extend_from_slice(&self.transmission_flags(&export).to_be_bytes());
                            wr.write_all(&reply(REP_INFO, &info)).await?;
                            if req.infos.contains(&INFO_NAME) {
                                let mut info = INFO_NAME.to_be_bytes().to_vec();
                                info.extend_from_slice(export.name.as_bytes());
                                wr.write_all(&reply(REP_INFO, &info)).await?;
                            }
                            if req.infos.contains(&INFO_DESCRIPTION) {
                                let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
                                info.extend_from_slice(export.description.as_bytes());
                                wr.write_all(&reply(REP_INFO, &info)).await?;
                            }
                            let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                            info.extend_from_slice(&1u32.to_be_bytes());
                            info.extend_from_slice(&export.device.block_size().to_be_bytes());
                            info.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                            wr.write_all(&reply(REP_INFO, &info)).await?;
                            wr.write_all(&reply(REP_ACK, &[])).await?;
                            if opt.option == OPT_GO {
                                wr.flush().await?;
                                return Ok(Some((export, structured, meta)));
                            }
                        }
                    },
                },
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        wr.write_all(&reply(REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data"))
                            .await?;
                    } else {
                        structured = true;
                        wr.write_all(&reply(REP_ACK, &[])).await?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = opt.option == OPT_SET_META_CONTEXT;
                    match decode_meta_context_request(&data) {
                        Err(e) => {
                            wr.write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes()))
                                .await?
                        }
                        Ok(_) if set && !structured => {
                            wr.write_all(&reply(
                                REP_ERR_INVALID,
                                b"negotiate structured replies first",
                            ))
                            .await?
                        }
                        Ok(req) if !self.exports.contains_key(&req.export) => {
                            let msg = format!("no export named {:?}", req.export);
                            wr.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                                .await?;
                        }
                        Ok(req) => {
                            let matches = |q: &str| {
                                q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()))
                            };
                            let chosen = if req.queries.is_empty() {
                                !set
                            } else {
                                req.queries.iter().any(|q| matches(q))
                            };
                            if chosen {
                                let mut payload = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                                payload.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                wr.write_all(&reply(REP_META_CONTEXT, &payload)).await?;
                            }
                            if set {
                                meta = chosen;
                            }
                            wr.write_all(&reply(REP_ACK, &[])).await?;
                        }
                    }
                }
                other => {
                    let msg = format!("option {other} is not supported");
                    wr.write_all(&reply(REP_ERR_UNSUP, msg.as_bytes())).await?;
                }
            }
            wr.flush().await?;
        }
    }
}

/// Reads one option: its header and its data.
async fn read_option<R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<(OptionHeader, Vec<u8>), ConnError> {
    let mut head = [0u8; 16];
    rd.read_exact(&mut head).await?;
    let opt = decode_option_header(&head)?;
    if opt.len > MAX_OPTION_LEN {
        return Err(ConnError::Protocol(format!(
            "option {} of {} bytes is too long",
            opt.option, opt.len
        )));
    }
    let mut data = vec![0u8; opt.len as usize];
    rd.read_exact(&mut data).await?;
    Ok((opt, data))
}

/// The transmission phase: read requests, run each in its own task, send
/// replies in the order they complete.
async fn transmission<R, W>(
    mut rd: R,
    mut wr: W,
    export: Export,
    structured: bool,
    meta: bool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            wr.write_all(&reply).await?;
            // Batch: flush only once no other reply is waiting.
            while let Ok(reply) = rx.try_recv() {
                wr.write_all(&reply).await?;
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let ctx = Arc::new(Ctx {
        export,
        structured,
        meta,
    });
    let result = loop {
        let mut head = [0u8; REQUEST_LEN];
        tokio::select! {
            read = rd.read_exact(&mut head) => {
                if let Err(e) = read {
                    break Err(e.into());
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
        }
        let req = match decode_request(&head) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.command == CMD_DISC {
            break Ok(());
        }
        let mut payload = Vec::new();
        if req.command == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                // Its data cannot be skipped safely: hang up.
                break Err(ConnError::Protocol(format!(
                    "write of {} bytes is too large",
                    req.len
                )));
            }
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
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let ctx = ctx.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let reply = ctx.execute(req, payload).await;
            let _ = tx.send(reply);
            drop(permit);
        });
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    };
    // Let requests already read finish and be answered, then close.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let written = writer.await.map_err(|e| io::Error::other(e.to_string()))?;
    result?;
    written.map_err(ConnError::Io)
}

struct Ctx {
    export: Export,
    structured: bool,
    meta: bool,
}

impl Ctx {
    fn dev(&self) -> &dyn BlockDevice {
        &*self.export.device
    }

    fn simple(&self, cookie: u64, result: Result<(), DeviceError>) -> Reply {
        match result {
            Ok(()) => simple_reply(0, cookie).to_vec(),
            Err(e) => self.error(cookie, e, false),
        }
    }

    fn error(&self, cookie: u64, e: DeviceError, structured_cmd: bool) -> Reply {
        tracing::debug!(export = %self.export.name, errno = e.errno, error = %e.message, "request failed");
        if self.structured && structured_cmd {
            error_chunk(cookie, e.errno, &e.message)
        } else {
            simple_reply(e.errno, cookie).to_vec()
        }
    }

    /// Checks a request's range; writes past the end are ENOSPC, the rest EINVAL.
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

    async fn execute(&self, req: Request, payload: Vec<u8>) -> Reply {
        let cookie = req.cookie;
        match req.command {
            CMD_READ => self.read(req).await,
            CMD_WRITE => {
                let r = async {
                    self.check_writable()?;
                    self.check_range(&req, true)?;
                    self.dev()
                        .write(req.offset, &payload, req.flags & CMD_FLAG_FUA != 0)
                        .await
                };
                self.simple(cookie, r.await)
            }
            CMD_FLUSH => self.simple(cookie, self.dev().flush().await),
            CMD_TRIM => {
                let r = async {
                    self.check_writable()?;
                    self.check_range(&req, true)?;
                    self.dev().trim(req.offset, req.len as u64).await?;
                    self.fua(req).await
                };
                self.simple(cookie, r.await)
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
                    self.fua(req).await
                };
                self.simple(cookie, r.await)
            }
            // Everything is one page-cache read away already.
            CMD_CACHE => self.simple(cookie, self.check_range(&req, false)),
            CMD_BLOCK_STATUS => self.block_status(req).await,
            other => self.simple(
                cookie,
                Err(DeviceError::new(EINVAL, format!("unknown command {other}"))),
            ),
        }
    }

    async fn fua(&self, req: Request) -> Result<(), DeviceError> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.dev().flush().await
        } else {
            Ok(())
        }
    }

    async fn read(&self, req: Request) -> Reply {
        let cookie = req.cookie;
        if req.len > MAX_PAYLOAD {
            let e = DeviceError::new(EINVAL, format!("read of {} bytes is too large", req.len));
            return self.error(cookie, e, true);
        }
        if let Err(e) = self.check_range(&req, false) {
            return self.error(cookie, e, true);
        }
        let len = req.len as usize;
        if !self.structured {
            let mut out = vec![0u8; 16 + len];
            return match self.dev().read(req.offset, &mut out[16..]).await {
                Ok(()) => {
                    out[..16].copy_from_slice(&simple_reply(0, cookie));
                    out
                }
                Err(e) => self.error(cookie, e, true),
            };
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
                Err(e) => return self.error(cookie, e, true),
            }
        };
        let mut out = Vec::with_capacity(28 * extents.len() + len);
        let mut at = req.offset;
        let last = extents.len() - 1;
        for (i, ext) in extents.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            if ext.allocated {
                let start = out.len();
                out.extend_from_slice(&chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + ext.len as u32,
                ));
                out.extend_from_slice(&at.to_be_bytes());
                let data_at = out.len();
                out.resize(data_at + ext.len as usize, 0);
                if let Err(e) = self.dev().read(at, &mut out[data_at..]).await {
                    out.truncate(start);
                    out.extend_from_slice(&self.error(cookie, e, true));
                    return out;
                }
            } else {
                out.extend_from_slice(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12));
                out.extend_from_slice(&at.to_be_bytes());
                out.extend_from_slice(&(ext.len as u32).to_be_bytes());
            }
            at += ext.len;
        }
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
        if !self.structured || !self.meta {
            let e = DeviceError::new(EINVAL, "no metadata context was negotiated");
            return self.error(cookie, e, false);
        }
        if req.len == 0 {
            return self.error(
                cookie,
                DeviceError::new(EINVAL, "zero-length block status"),
                true,
            );
        }
        if let Err(e) = self.check_range(&req, false) {
            return self.error(cookie, e, true);
        }
        let extents = match self.dev().extents(req.offset, req.len as u64).await {
            Ok(x) if !x.is_empty() => x,
            Ok(_) => {
                return self.error(
                    cookie,
                    DeviceError::new(EIO, "the device reported no extents"),
                    true,
                )
            }
            Err(e) => return self.error(cookie, e, true),
        };
        let mut descriptors = Vec::new();
        let mut left = req.len as u64;
        for x in extents {
            if left == 0 {
                break;
            }
            // Descriptor lengths are 32-bit: stay block aligned below 4 GiB.
            let whole = x.len.min(left);
            let len = whole.min(0xFFFF_F000);
            if len == 0 {
                continue;
            }
            let flags = if x.allocated {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            descriptors.extend_from_slice(&(len as u32).to_be_bytes());
            descriptors.extend_from_slice(&flags.to_be_bytes());
            left -= len;
            // A clamped run must end the answer: the next device extent
            // does not start where the clamp stopped.
            if len < whole || req.flags & CMD_FLAG_REQ_ONE != 0 || descriptors.len() >= 8 * 1024 {
                break;
            }
        }
        let mut out = Vec::with_capacity(24 + descriptors.len());
        out.extend_from_slice(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            4 + descriptors.len() as u32,
        ));
        out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        out.extend_from_slice(&descriptors);
        out
    }
}
