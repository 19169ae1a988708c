//! Connections: accepting them within the server's limits, the handshake
//! and option haggling, then the transmission phase (`transmission.rs`).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::proto::*;
use crate::transmission::{transmission, Budget, Ctx};
use crate::BlockDevice;

/// One named device on offer.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

/// Where a server finds its exports: a fixed set, or one that opens more
/// on demand (`hlfs serve` offers each snapshot of a volume it serves,
/// those taken while serving included).
#[async_trait::async_trait]
pub trait Catalog: Send + Sync {
    /// The export a client asks for by name, if there is one.
    async fn find(&self, name: &str) -> Option<Export>;
    /// Every export's name, for LIST.
    async fn names(&self) -> Vec<String>;
}

#[async_trait::async_trait]
impl Catalog for BTreeMap<String, Export> {
    async fn find(&self, name: &str) -> Option<Export> {
        self.get(name).cloned()
    }

    async fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// What a server exposed to a network allows each client and all of them.
/// What happens at each limit is written down in docs/SEMANTICS.md.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections at once. One more is accepted and closed at once.
    pub max_connections: usize,
    /// Connections at once to one export. One more is refused when it asks
    /// for the export (`NBD_REP_ERR_POLICY`, or a hang-up for the old-style
    /// option, which has no way to say no).
    pub max_connections_per_export: usize,
    /// From connecting to choosing an export, TLS included; a client still
    /// haggling then is cut off.
    pub handshake_timeout: Duration,
    /// Bytes of requests being served and replies not yet written, on one
    /// connection. A connection that reaches it is not read from until its
    /// replies drain. At least the largest request (32 MiB and a little).
    pub connection_bytes: u32,
    /// The same, over every connection together, beyond the first
    /// `RESERVE_BYTES` of each (so that small requests of other clients go
    /// through while some clients hold the rest).
    pub total_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_export: 64,
            handshake_timeout: Duration::from_secs(30),
            connection_bytes: 64 << 20,
            total_bytes: 256 << 20,
        }
    }
}

/// Bytes in flight each connection may hold outside the server's total.
pub const RESERVE_BYTES: u32 = 1 << 20;

/// Serves a set of exports until told to shut down.
pub struct Server {
    exports: Arc<dyn Catalog>,
    /// When set, clients must upgrade with STARTTLS before anything else.
    tls: Option<TlsAcceptor>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    /// Connections now, in all and per export.
    connections: AtomicUsize,
    per_export: Mutex<HashMap<String, ExportUse>>,
    /// The bytes every connection shares (see `Limits::total_bytes`).
    shared_bytes: Arc<Semaphore>,
}

/// How long shutdown waits for connections to finish their requests.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// How long a client still in the handshake has once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why a connection ended early. Logged, never fatal to the server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the handshake took longer than {0:?}")]
    HandshakeTimeout(Duration),
}

impl From<ProtoError> for ConnError {
    fn from(e: ProtoError) -> Self {
        ConnError::Protocol(e.to_string())
    }
}

/// What haggling settles: the export, whether replies are structured,
/// whether block status was negotiated, and the client's place among the
/// export's connections.
type Chosen<'a> = (Export, bool, Vec<MetaContext>, ExportSlot<'a>);

/// An export's clients now, and whether its owner keeps new ones off.
#[derive(Default)]
struct ExportUse {
    clients: usize,
    held: bool,
}

/// A place among an export's connections, given back when the client goes.
struct ExportSlot<'a> {
    server: &'a Server,
    export: String,
}

impl Drop for ExportSlot<'_> {
    fn drop(&mut self) {
        let mut per_export = self.server.per_export.lock();
        if let Some(u) = per_export.get_mut(&self.export) {
            u.clients -= 1;
        }
    }
}

/// New clients of an export are refused (and may try again) while this
/// lives: see [`Server::hold_idle`].
pub struct ExportHold {
    server: Arc<Server>,
    export: String,
}

impl Drop for ExportHold {
    fn drop(&mut self) {
        if let Some(u) = self.server.per_export.lock().get_mut(&self.export) {
            u.held = false;
        }
    }
}

/// A place among the server's connections, given back when the client goes.
struct ConnectionSlot(Arc<Server>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

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
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Server> {
        let fixed: BTreeMap<String, Export> =
            exports.into_iter().map(|e| (e.name.clone(), e)).collect();
        Server::with_catalog(Arc::new(fixed), tls, limits, shutdown)
    }

    /// A server whose exports `catalog` finds.
    pub fn with_catalog(
        exports: Arc<dyn Catalog>,
        tls: Option<TlsAcceptor>,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Server> {
        Arc::new(Server {
            exports,
            tls,
            shared_bytes: Arc::new(Semaphore::new(limits.total_bytes as usize)),
            limits,
            shutdown,
            connections: AtomicUsize::new(0),
            per_export: Mutex::new(HashMap::new()),
        })
    }

    /// Clients connected to `export` now.
    pub fn connections_to(&self, export: &str) -> usize {
        self.per_export.lock().get(export).map_or(0, |u| u.clients)
    }

    /// If no client is connected to `export`, keeps new ones off it until
    /// the hold is dropped (what changes a disk under its clients, such as
    /// a rollback, needs it idle throughout); otherwise how many are.
    pub fn hold_idle(self: &Arc<Self>, export: &str) -> Result<ExportHold, usize> {
        let mut per_export = self.per_export.lock();
        let u = per_export.entry(export.to_string()).or_default();
        if u.clients > 0 || u.held {
            return Err(u.clients);
        }
        u.held = true;
        Ok(ExportHold {
            server: self.clone(),
            export: export.to_string(),
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
                    let now = self.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let slot = ConnectionSlot(self.clone());
                    if now > self.limits.max_connections {
                        tracing::warn!(%peer, limit = self.limits.max_connections, "refusing a connection: too many at once");
                        drop((stream, slot));
                        continue;
                    }
                    conns.spawn(async move {
                        let server = slot.0.clone();
                        server.connection(stream, peer).await;
                        drop(slot);
                    });
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
        let deadline = Instant::now() + self.limits.handshake_timeout;
        match self.run_connection(stream, &peer, deadline).await {
            Ok(()) => tracing::info!(%peer, "client disconnected"),
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::info!(%peer, "client went away")
            }
            Err(e) => tracing::warn!(%peer, error = %e, "connection closed"),
        }
    }

    async fn run_connection<S>(
        &self,
        stream: S,
        peer: &str,
        deadline: Instant,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (stream, no_zeroes) = self.before(deadline, greet(stream)).await?;
        let Some(acceptor) = &self.tls else {
            return self
                .negotiate_and_serve(stream, no_zeroes, false, peer, deadline)
                .await;
        };
        match self
            .before(deadline, self.upgrade(stream, acceptor))
            .await?
        {
            Some(tls) => {
                tracing::info!(%peer, "TLS established");
                self.negotiate_and_serve(tls, no_zeroes, true, peer, deadline)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Runs a step of the handshake, which must be over by `deadline`, or
    /// `SHUTDOWN_GRACE` after the server starts shutting down: a client
    /// still haggling has that long to hear `ERR_SHUTDOWN` and leave.
    async fn before<T>(
        &self,
        deadline: Instant,
        step: impl std::future::Future<Output = Result<T, ConnError>>,
    ) -> Result<T, ConnError> {
        let mut shutdown = self.shutdown.clone();
        let stopping = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            result = step => result,
            _ = tokio::time::sleep_until(deadline) => {
                Err(ConnError::HandshakeTimeout(self.limits.handshake_timeout))
            }
            _ = stopping => Err(ConnError::Protocol("the server shut down during the handshake".into())),
        }
    }

    /// Until the client upgrades, only STARTTLS and ABORT are answered.
    /// Returns the TLS stream, or None if the client left.
    async fn upgrade<S>(
        &self,
        mut stream: S,
        acceptor: &TlsAcceptor,
    ) -> Result<Option<tokio_rustls::server::TlsStream<S>>, ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let (opt, data) = read_option(&mut stream).await?;
            let reply = |kind: u32, payload: &[u8]| option_reply(opt.option, kind, payload);
            let stopping = *self.shutdown.borrow();
            match opt.option {
                OPT_ABORT => {
                    let _ = stream.write_all(&reply(REP_ACK, &[])).await;
                    let _ = stream.flush().await;
                    return Ok(None);
                }
                OPT_EXPORT_NAME => {
                    return Err(ConnError::Protocol(
                        "export requested before STARTTLS on a TLS-only server".into(),
                    ))
                }
                _ if stopping => {
                    stream
                        .write_all(&reply(REP_ERR_SHUTDOWN, b"the server is shutting down"))
                        .await?
                }
                OPT_STARTTLS if data.is_empty() => {
                    stream.write_all(&reply(REP_ACK, &[])).await?;
                    stream.flush().await?;
                    return Ok(Some(acceptor.accept(stream).await?));
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
        deadline: Instant,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        let chosen = self
            .before(deadline, self.haggle(&mut rd, &mut wr, no_zeroes, tls))
            .await;
        let (export, structured, contexts, slot) = match chosen {
            Ok(Some(chosen)) => chosen,
            other => {
                // Over TLS this says goodbye properly (close_notify).
                let _ = wr.shutdown().await;
                return other.map(|_| ());
            }
        };
        tracing::info!(%peer, export = %export.name, "client chose export");
        let limits = &self.limits;
        let budget = Budget::new(
            limits.connection_bytes,
            RESERVE_BYTES,
            &self.shared_bytes,
            limits.total_bytes,
        );
        let ctx = Ctx {
            export,
            structured,
            contexts,
        };
        let served = transmission(rd, wr, ctx, budget, self.shutdown.clone()).await;
        drop(slot);
        give_back_memory();
        served
    }

    /// A place among the connections to `export`, or why there is none
    /// now (the client may try again later).
    fn export_slot(&self, export: &str) -> Result<ExportSlot<'_>, String> {
        let mut per_export = self.per_export.lock();
        let u = per_export.entry(export.to_string()).or_default();
        let name = short_text(export);
        if u.held {
            return Err(format!(
                "export {name:?} is being changed by its owner (a rollback); try again later"
            ));
        }
        if u.clients >= self.limits.max_connections_per_export {
            return Err(format!(
                "too many connections to export {name:?}; try again later"
            ));
        }
        u.clients += 1;
        Ok(ExportSlot {
            server: self,
            export: export.to_string(),
        })
    }

    /// DF only once structured replies are on: without them it cannot be
    /// used, and must not be offered.
    fn transmission_flags(&self, export: &Export, structured: bool) -> u16 {
        let mut flags =
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        if structured {
            flags |= TF_SEND_DF;
        }
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
    ) -> Result<Option<Chosen<'_>>, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut structured = false;
        // The contexts a SET chose, and for which export.
        let mut meta: Option<(String, Vec<MetaContext>)> = None;
        // Contexts apply only to the export they were chosen for.
        let contexts_for = |meta: &Option<(String, Vec<MetaContext>)>, export: &Export| match meta {
            Some((name, chosen)) if *name == export.name => chosen.clone(),
            _ => Vec::new(),
        };
        loop {
            let (opt, data) = read_option(rd).await?;
            let reply = |kind: u32, payload: &[u8]| option_reply(opt.option, kind, payload);
            let stopping = *self.shutdown.borrow();
            match opt.option {
                OPT_EXPORT_NAME => {
                    // The old-style option has no way to say no but hanging up.
                    let name = String::from_utf8_lossy(&data).into_owned();
                    if stopping {
                        return Err(ConnError::Protocol("the server is shutting down".into()));
                    }
                    let Some(export) = self.exports.find(&name).await else {
                        return Err(ConnError::Protocol(format!("no export named {name:?}")));
                    };
                    let slot = self.export_slot(&name).map_err(ConnError::Protocol)?;
                    wr.write_all(&export.device.size().to_be_bytes()).await?;
                    wr.write_all(&self.transmission_flags(&export, structured).to_be_bytes())
                        .await?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124]).await?;
                    }
                    wr.flush().await?;
                    let contexts = contexts_for(&meta, &export);
                    return Ok(Some((export, structured, contexts, slot)));
                }
                OPT_ABORT => {
                    let _ = wr.write_all(&reply(REP_ACK, &[])).await;
                    let _ = wr.flush().await;
                    return Ok(None);
                }
                _ if stopping => {
                    wr.write_all(&reply(REP_ERR_SHUTDOWN, b"the server is shutting down"))
                        .await?;
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        wr.write_all(&reply(REP_ERR_INVALID, b"LIST takes no data"))
                            .await?;
                    } else {
                        for name in self.exports.names().await {
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
                    Ok(req) => match self.exports.find(&req.name).await {
                        None => {
                            let msg = format!("no export named {:?}", short_text(&req.name));
                            wr.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                                .await?;
                        }
                        Some(export) => {
                            let slot = match opt.option {
                                OPT_GO => match self.export_slot(&req.name) {
                                    Ok(slot) => Some(slot),
                                    Err(msg) => {
                                        wr.write_all(&reply(REP_ERR_POLICY, msg.as_bytes()))
                                            .await?;
                                        wr.flush().await?;
                                        continue;
                                    }
                                },
                                _ => None,
                            };
                            let flags = self.transmission_flags(&export, structured);
                            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                            info.extend_from_slice(&export.device.size().to_be_bytes());
                            info.extend_from_slice(&flags.to_be_bytes());
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
                            if let Some(slot) = slot {
                                wr.flush().await?;
                                let contexts = contexts_for(&meta, &export);
                                return Ok(Some((export, structured, contexts, slot)));
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
                    if set {
                        // A SET replaces what an earlier one chose, even
                        // when it fails.
                        meta = None;
                    }
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
                        Ok(req) => match self.exports.find(&req.export).await {
                            None => {
                                let msg = format!("no export named {:?}", short_text(&req.export));
                                wr.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                                    .await?;
                            }
                            Some(export) => {
                                let sets = export.device.change_sets();
                                let chosen = choose_contexts(&req.queries, set, &sets);
                                for (i, c) in chosen.iter().enumerate() {
                                    let id = if set { i as u32 + 1 } else { 0 };
                                    let mut payload = id.to_be_bytes().to_vec();
                                    payload.extend_from_slice(c.name().as_bytes());
                                    wr.write_all(&reply(REP_META_CONTEXT, &payload)).await?;
                                }
                                if set {
                                    meta = Some((export.name.clone(), chosen));
                                }
                                wr.write_all(&reply(REP_ACK, &[])).await?;
                            }
                        },
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

/// Hands freed memory back to the system once a connection is over. Its
/// buffers (up to its whole budget) were freed to the allocator, which
/// would otherwise keep them for the process.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The greeting: the server's magic and flags, and the client's flags.
/// Returns whether the client declined the 124 zeros after EXPORT_NAME.
async fn greet<S>(mut stream: S) -> Result<(S, bool), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
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
    Ok((stream, client_flags & CLIENT_NO_ZEROES != 0))
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
