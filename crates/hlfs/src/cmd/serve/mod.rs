//! `hlfs serve`: volumes and snapshots over NBD.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use hlfs_device::control::{self, Answer, Command, Live};
use hlfs_device::VolumeDevice;
use hlfs_nbd::proto::MAX_PAYLOAD;
use hlfs_nbd::{Export, ExportHold, Limits, Server};
use hlfs_volume::{
    import_diff, AutoClean, Backend, CreateOptions, FlattenOptions, GcOptions, OpenOptions,
    SnapshotInfo, View, Volume, VolumeError,
};
use listenfd::ListenFd;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use hlfs_device::metrics::RequestMetrics;
use prometheus_client::registry::Registry;

use super::metrics;
use crate::args::{
    open_view, parse_size, parse_space_target, split_snapshot, utc_ms, At, GlobalArgs, Settings,
    MAX_GRACE_SECS,
};

mod config;

pub use config::Given;
use config::ServeConfig;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Volumes to serve; VOLUME@SNAPSHOT serves a snapshot read-only. The
    /// export name is the volume's file name (plus @SNAPSHOT). Replaces
    /// the config file's `volumes`.
    #[arg(value_name = "VOLUME[@SNAPSHOT]")]
    volumes: Vec<String>,
    /// Read options from a TOML file (packaging/serve.toml shows every
    /// key). Options given on the command line win over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// TCP address to listen on (the default when --socket is not given).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Create a volume that does not exist yet (needs --size).
    #[arg(long, requires = "size")]
    create: bool,
    /// Size of a volume made with --create.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Require TLS, with the certificates in DIR: ca-cert.pem,
    /// server-cert.pem and server-key.pem (QEMU's tls-creds-x509 layout).
    #[arg(long, value_name = "DIR")]
    tls_certs: Option<PathBuf>,
    /// With --tls-certs: clients must present a certificate signed by
    /// ca-cert.pem.
    #[arg(long)]
    tls_verify_clients: bool,
    /// Clients connected at once; one more is closed as soon as it
    /// connects.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Clients connected at once to one export; one more is refused when it
    /// asks for the export (and may try again later).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections_per_export)]
    max_connections_per_export: usize,
    /// Seconds a client may take from connecting to choosing an export
    /// (TLS included) before it is cut off.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().handshake_timeout.as_secs())]
    handshake_timeout: u64,
    /// Bytes of requests and replies in flight on one connection; past it
    /// the server reads no more of that client's requests until it has read
    /// its replies. At least 33M (the largest request).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    in_flight: u64,
    /// Bytes in flight over all connections together, beyond the first
    /// MiB of each (what keeps small requests of every client going).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    in_flight_total: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics: requests, bytes,
    /// errors and latency per export and operation, connections, the
    /// store's requests, volume and map-cache figures. A port alone
    /// listens on 127.0.0.1.
    #[arg(long, value_name = "[HOST:]PORT")]
    metrics: Option<String>,
    /// Clean each volume served writable by itself once its stored bytes
    /// pass this many times its live bytes, down to 90 % of the way from 1
    /// to it (1.45 for 1.5). Lower keeps less garbage for more copying.
    #[arg(long, value_name = "RATIO", default_value_t = 1.5, value_parser = parse_space_target)]
    gc_target: f64,
    /// How often the automatic cleaner looks (one listing of the store
    /// each time); 0 turns it off, leaving cleaning to `hlfs gc`.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    gc_every: u64,
    /// How long the automatic cleaner keeps emptied segments after the
    /// manifest that frees them, for readers that opened the volume before
    /// (as `hlfs gc --grace`; 5 s at least).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    gc_grace: u64,
    /// While clients have made a request in the last 100 ms, the automatic
    /// cleaner goes through at most this many MiB of segments per second
    /// at its lower mark, so that they keep priority; more as stored rises
    /// to the target, and past it, as fast as it can copy. 0 never yields.
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    gc_busy_rate: u64,
}

impl ServeArgs {
    /// What the writable volumes' automatic cleaner does, if anything.
    fn auto_clean(&self) -> Option<AutoClean> {
        (self.gc_every > 0).then(|| AutoClean {
            every: Duration::from_secs(self.gc_every),
            grace: Duration::from_secs(self.gc_grace).max(MIN_SERVED_GRACE),
            busy_rate: self.gc_busy_rate.saturating_mul(1 << 20),
            ..AutoClean::new(self.gc_target)
        })
    }

    /// Fills the options the user did not give from --config's file.
    pub fn read_config(&mut self, given: &Given, global: &mut GlobalArgs) -> Result<()> {
        if let Some(path) = &self.config {
            ServeConfig::load(path)?.apply(given, global, self);
        }
        Ok(())
    }

    /// What must hold of the options, whether from the command line or
    /// the config file.
    fn check(&self) -> Result<(), VolumeError> {
        if self.volumes.is_empty() {
            return Err(VolumeError::InvalidArgument(
                "no volume to serve: name one, or list them as `volumes` in the --config file"
                    .into(),
            ));
        }
        if self.tls_verify_clients && self.tls_certs.is_none() {
            return Err(VolumeError::InvalidArgument(
                "--tls-verify-clients needs --tls-certs".into(),
            ));
        }
        // Manifests and the journal count as stored and are never cleaned:
        // a target of 1 could never be met, and the cleaner would churn.
        if !(self.gc_target.is_finite() && self.gc_target >= MIN_AUTO_TARGET) {
            return Err(VolumeError::InvalidArgument(format!(
                "--gc-target must be a number of at least {MIN_AUTO_TARGET} (stored ÷ live), not {}",
                self.gc_target
            )));
        }
        if self.gc_grace > MAX_GRACE_SECS {
            return Err(VolumeError::InvalidArgument(format!(
                "--gc-grace must be at most {MAX_GRACE_SECS} seconds (a day)"
            )));
        }
        Ok(())
    }

    fn limits(&self) -> Result<Limits> {
        let bytes = |what: &str, n: u64| {
            u32::try_from(n).map_err(|_| anyhow::anyhow!("{what} must be below 4G"))
        };
        let in_flight = bytes("--in-flight", self.in_flight)?;
        if in_flight < (MAX_PAYLOAD + (1 << 20)) {
            bail!("--in-flight must be at least 33M: the largest request must fit");
        }
        if self.max_connections == 0 || self.max_connections_per_export == 0 {
            bail!("--max-connections and --max-connections-per-export must be at least 1");
        }
        Ok(Limits {
            max_connections: self.max_connections,
            max_connections_per_export: self.max_connections_per_export,
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            connection_bytes: in_flight,
            total_bytes: bytes("--in-flight-total", self.in_flight_total)?,
        })
    }
}

const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// The export name of a volume address: its last path component.
fn export_name(volume: &str) -> String {
    let path = volume.strip_prefix("file://").unwrap_or(volume);
    Path::new(path.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// A listening unix socket, removing a stale one a crashed server left.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Opens every export; the volumes opened go into `volumes` as they open,
/// so the caller can close them if a later one fails.
async fn open_exports(
    args: &ServeArgs,
    settings: &Settings,
    requests: Option<&RequestMetrics>,
    volumes: &mut Vec<Volume>,
) -> Result<Vec<Export>> {
    let mut exports: Vec<Export> = Vec::new();
    for arg in &args.volumes {
        let (volume, snap) = split_snapshot(arg);
        let vol = match snap {
            Some(at) => open_view(settings, volume, Some(at))
                .await
                .with_context(|| format!("opening {arg}"))?,
            None => {
                let open = OpenOptions {
                    auto_clean: args.auto_clean(),
                    ..settings.open.clone()
                };
                let opened = match Backend::parse(volume, false, &settings.store) {
                    Ok(b) => Volume::open(b, &open).await,
                    Err(e) => Err(e),
                };
                match opened {
                    Err(VolumeError::NotFound(_)) if args.create => {
                        let create = CreateOptions {
                            size: args.size.expect("clap requires --size with --create"),
                            ..CreateOptions::default()
                        };
                        Volume::create(&settings.backend(volume, true)?, &create).await?;
                        eprintln!("created {volume}");
                        Volume::open(settings.backend(volume, false)?, &open)
                            .await
                            .with_context(|| format!("opening {volume}"))?
                    }
                    opened => opened.with_context(|| format!("opening {volume}"))?,
                }
            }
        };
        let name = match snap {
            Some(s) => format!("{}@{s}", export_name(volume)),
            None => export_name(volume),
        };
        if exports.iter().any(|e| e.name == name) {
            bail!("two volumes would both be exported as {name:?}");
        }
        let description = format!(
            "HLFS volume {volume}{}",
            match (snap, vol.moment()) {
                (Some(_), Some(t)) => format!(" (as of {}, read-only)", utc_ms(t)),
                (Some(_), None) => " (snapshot, read-only)".to_string(),
                (None, _) => String::new(),
            }
        );
        exports.push(Export {
            device: device(&vol, &name, requests),
            name,
            description,
        });
        volumes.push(vol);
    }
    Ok(exports)
}

/// `vol` as a block device, recording its requests if metrics are on.
fn device(vol: &Volume, export: &str, requests: Option<&RequestMetrics>) -> Arc<VolumeDevice> {
    Arc::new(match requests {
        Some(m) => VolumeDevice::with_metrics(vol.clone(), m.for_export(export)),
        None => VolumeDevice::new(vol.clone()),
    })
}

/// The exports of `hlfs serve`: those its command line names, and
/// `NAME@SNAP` for each snapshot of a volume it serves writable, opened
/// read-only when a client first asks for it, so snapshots taken while
/// serving are served too. A deleted snapshot is no longer offered;
/// clients already connected to it keep reading it.
struct Exports {
    fixed: BTreeMap<String, Export>,
    /// (export name, backend, volume) of each volume served writable.
    owned: Vec<(String, Backend, Volume)>,
    open: hlfs_volume::OpenOptions,
    requests: Option<Arc<RequestMetrics>>,
    /// Snapshot views opened on demand, with the snapshot they show.
    opened: tokio::sync::Mutex<BTreeMap<String, (Export, Volume, SnapshotId)>>,
}

/// The snapshots of a volume served writable that are exported: not the
/// engine's own (names starting with '-', such as an import's guard).
fn exported_snapshots(vol: &Volume) -> impl Iterator<Item = SnapshotInfo> {
    vol.snapshots()
        .into_iter()
        .filter(|s| !s.name.starts_with('-'))
}

/// What tells a snapshot from a later one of the same name.
type SnapshotId = (u64, u64);

impl Exports {
    /// The backend of the volume served writable as `export`, and the
    /// identity of its snapshot `snap`, if it has one by that name now.
    fn snapshot_of(&self, export: &str, snap: &str) -> Option<(&Backend, SnapshotId)> {
        let (_, backend, vol) = self.owned.iter().find(|(name, _, _)| name == export)?;
        let found = exported_snapshots(vol).find(|s| s.name == snap)?;
        Some((backend, (found.lsn, found.created_ms)))
    }

    /// `name` split as EXPORT@SNAP, if EXPORT is a volume served writable
    /// and SNAP is no moment: such names are looked up live, never from the
    /// fixed exports. A moment (EXPORT@TIME) is a fixed export, opened
    /// when the server started.
    fn owned_snapshot<'n>(&self, name: &'n str) -> Option<(&'n str, &'n str)> {
        name.rsplit_once('@').filter(|(export, snap)| {
            self.owned.iter().any(|(n, _, _)| n == export)
                && matches!(At::parse(snap, 0), Ok(At::Snapshot(_)))
        })
    }

    /// Closes the snapshot views opened on demand.
    async fn close_opened(&self) {
        for (_, vol, _) in std::mem::take(&mut *self.opened.lock().await).into_values() {
            let _ = vol.close().await;
        }
    }
}

#[async_trait::async_trait]
impl hlfs_nbd::Catalog for Exports {
    /// A snapshot of a volume served writable is looked up afresh each
    /// time, so a deleted one is offered no more and one deleted and taken
    /// again under the same name is opened again; clients already reading
    /// the old one keep it.
    async fn find(&self, name: &str) -> Option<Export> {
        let Some((export, snap)) = self.owned_snapshot(name) else {
            return self.fixed.get(name).cloned();
        };
        let mut opened = self.opened.lock().await;
        let current = self.snapshot_of(export, snap);
        if let Some((found, _, id)) = opened.get(name) {
            if current.is_some_and(|(_, now)| now == *id) {
                return Some(found.clone());
            }
        }
        if let Some((_, stale, _)) = opened.remove(name) {
            let _ = stale.close().await;
        }
        let (backend, id) = current?;
        let view = View::Snapshot(snap.to_string());
        let vol = match Volume::open_read_only(backend.clone(), &self.open, view).await {
            Ok(vol) => vol,
            Err(e) => {
                tracing::warn!(export = name, error = %e, "cannot open the snapshot for a client");
                return None;
            }
        };
        let found = Export {
            name: name.to_string(),
            description: format!("HLFS volume {} (snapshot, read-only)", vol.location()),
            device: device(&vol, name, self.requests.as_deref()),
        };
        opened.insert(name.to_string(), (found.clone(), vol, id));
        Some(found)
    }

    async fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .fixed
            .keys()
            .filter(|n| self.owned_snapshot(n).is_none())
            .cloned()
            .collect();
        for (export, _, vol) in &self.owned {
            names.extend(exported_snapshots(vol).map(|s| format!("{export}@{}", s.name)));
        }
        names.sort();
        names
    }
}

/// The lowest start mark the automatic cleaner takes.
const MIN_AUTO_TARGET: f64 = 1.1;

/// The shortest grace period a served volume's cleaning gets, whatever
/// is asked: its own clients' reads in flight need it.
const MIN_SERVED_GRACE: Duration = Duration::from_secs(5);

/// A volume this server owns, as its control socket sees it.
struct Owned {
    volume: Volume,
    server: Arc<Server>,
    export: String,
}

impl Owned {
    /// Keeps new clients off the export while `what` (which changes the
    /// disk under them) runs; refused while any client is connected.
    fn hold_idle(&self, what: &str) -> Result<ExportHold, VolumeError> {
        self.server.hold_idle(&self.export).map_err(|clients| {
            if clients == 0 {
                return VolumeError::Busy(format!(
                    "a rollback or an import of export {:?} is running",
                    self.export
                ));
            }
            VolumeError::Busy(format!(
                "{clients} client{} connected to export {:?}: {what} would change the disk under {}; disconnect {} first",
                if clients == 1 { " is" } else { "s are" },
                self.export,
                if clients == 1 { "it" } else { "them" },
                if clients == 1 { "it" } else { "them" },
            ))
        })
    }
}

#[async_trait::async_trait]
impl control::Owner for Owned {
    async fn run(&self, command: Command) -> Result<Answer, VolumeError> {
        if command != Command::Status {
            tracing::info!(export = %self.export, ?command, "command from the control socket");
        }
        match command {
            Command::SnapshotCreate { name } => Ok(Answer::Done(Some(
                self.volume.snapshot_create(&name).await?.name,
            ))),
            Command::SnapshotDelete { name } => {
                self.volume.snapshot_delete(&name).await?;
                Ok(Answer::Done(None))
            }
            Command::Rollback { name } => {
                // New clients wait until the rollback is over.
                let _idle = self.hold_idle("a rollback")?;
                Ok(Answer::Done(Some(self.volume.rollback(&name).await?)))
            }
            Command::RollbackToMoment { at_ms } => {
                let _idle = self.hold_idle("a rollback")?;
                Ok(Answer::Done(Some(
                    self.volume.rollback_to_moment(at_ms).await?,
                )))
            }
            Command::ImportDiff { path } => {
                // As a rollback: it changes the disk under any client.
                let _idle = self.hold_idle("an import")?;
                let file = tokio::fs::File::open(&path).await.map_err(|e| {
                    VolumeError::InvalidArgument(format!("the server cannot open {path}: {e}"))
                })?;
                let input = tokio::io::BufReader::new(file);
                Ok(Answer::Imported(
                    import_diff(&self.volume, input, &|_| {}).await?,
                ))
            }
            Command::Flatten { copy_rate } => {
                let opts = FlattenOptions {
                    copy_rate,
                    ..FlattenOptions::default()
                };
                Ok(Answer::Flattened(self.volume.flatten(opts, &|_| {}).await?))
            }
            Command::OfferForClone { source } => Ok(Answer::Done(Some(
                self.volume.offer_for_clone(&source).await?,
            ))),
            Command::Resize { size } => {
                self.volume.resize(size).await?;
                Ok(Answer::Done(None))
            }
            Command::Retain { window_ms } => {
                self.volume.set_retention(window_ms).await?;
                Ok(Answer::Done(None))
            }
            Command::Checkpoint => {
                self.volume.checkpoint().await?;
                Ok(Answer::Done(None))
            }
            Command::Gc { target, grace_ms } => {
                // Reads of this server's clients that looked a block up
                // before a pass committed may still be on their way to it.
                let opts = GcOptions {
                    target,
                    grace: Duration::from_millis(grace_ms).max(MIN_SERVED_GRACE),
                    ..GcOptions::default()
                };
                Ok(Answer::Gc(self.volume.gc(&opts, &|_| {}).await?))
            }
            Command::Status => Ok(Answer::Status(Live {
                pid: std::process::id(),
                export: self.export.clone(),
                connections: self.server.connections_to(&self.export) as u64,
                figures: self.volume.figures(),
                flatten: self.volume.flatten_progress(),
            })),
        }
    }
}

/// (export name, backend, volume) of each volume served writable.
fn owned_volumes(
    args: &ServeArgs,
    settings: &Settings,
    volumes: &[Volume],
    names: &[String],
) -> Result<Vec<(String, Backend, Volume)>> {
    let mut owned = Vec::new();
    for ((arg, volume), export) in args.volumes.iter().zip(volumes).zip(names) {
        if !volume.is_read_only() {
            let (address, _) = split_snapshot(arg);
            owned.push((
                export.clone(),
                settings.backend(address, false)?,
                volume.clone(),
            ));
        }
    }
    Ok(owned)
}

/// Binds the control socket of every volume served writable (each opened
/// here, so its journal lock is held) and answers commands on it until
/// `stop`. A volume whose socket cannot be bound (a filesystem without
/// sockets) is served all the same, without one.
fn start_control(
    owned: &[(String, Backend, Volume)],
    server: &Arc<Server>,
    stop: &watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Vec<PathBuf> {
    let mut sockets = Vec::new();
    for (export, backend, volume) in owned {
        let Some(path) = control::socket_path(backend) else {
            continue;
        };
        let listener = match control::bind(&path) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(
                    socket = %path.display(),
                    error = %e,
                    "no control socket: commands on this host cannot reach the volume while it is served"
                );
                continue;
            }
        };
        sockets.push(path);
        let owner = Arc::new(Owned {
            volume: volume.clone(),
            server: server.clone(),
            export: export.clone(),
        });
        tasks.spawn(control::serve(listener, owner, stop.clone()));
    }
    sockets
}

/// SIGINT and SIGTERM, listened for from creation on: a signal that
/// arrives before the server is ready still stops it cleanly.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Characters left as they are in a URI path segment (the export name).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@')
    .remove(b':');
/// Characters left as they are in a query value (the socket path).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// The NBD URI of `export` on a TCP address or a unix socket.
fn uri(scheme: &str, export: &str, tcp: Option<(&str, u16)>, socket: Option<&Path>) -> String {
    let name = utf8_percent_encode(export, PATH_SEGMENT);
    match (tcp, socket) {
        (Some((host, port)), _) => format!("{scheme}://{host}:{port}/{name}"),
        (None, Some(path)) => {
            let path = utf8_percent_encode(&path.to_string_lossy(), QUERY_VALUE).to_string();
            format!("{scheme}+unix:///{name}?socket={path}")
        }
        (None, None) => unreachable!("a URI needs a TCP address or a socket"),
    }
}

/// A start that failed after opening volumes: releases their writer claims
/// and the NBD sockets this process made, and gives back `error`.
async fn abandon(
    error: anyhow::Error,
    volumes: &[Volume],
    listeners: &[Listener],
) -> anyhow::Error {
    for vol in volumes {
        let _ = vol.close().await;
    }
    for listener in listeners {
        if let Listener::Unix {
            path, made: true, ..
        } = listener
        {
            let _ = std::fs::remove_file(path);
        }
    }
    error
}

/// A socket clients connect to.
enum Listener {
    /// With its address, read once it is bound.
    Tcp(TcpListener, std::net::SocketAddr),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Made by this process, and so removed when it stops; a socket a
        /// service manager passed in is its to keep.
        made: bool,
    },
}

/// The sockets to listen on: those a service manager passed in (systemd
/// socket activation: LISTEN_FDS), which outlive this process so clients
/// can reconnect across a restart; else --listen and --socket.
async fn listeners(args: &ServeArgs, mut inherited: ListenFd) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for i in 0..inherited.len() {
        let fd = i + 3;
        if let Ok(Some(tcp)) = inherited.take_tcp_listener(i) {
            tcp.set_nonblocking(true)?;
            let addr = tcp.local_addr()?;
            listeners.push(Listener::Tcp(TcpListener::from_std(tcp)?, addr));
            continue;
        }
        let unix = inherited
            .take_unix_listener(i)
            .ok()
            .flatten()
            .with_context(|| {
                format!("fd {fd} from the service manager (LISTEN_FDS) is not a listening TCP or unix stream socket")
            })?;
        unix.set_nonblocking(true)?;
        let path = unix
            .local_addr()?
            .as_pathname()
            .map(Path::to_path_buf)
            .with_context(|| format!("unix socket fd {fd} from the service manager has no path"))?;
        listeners.push(Listener::Unix {
            listener: UnixListener::from_std(unix)?,
            path,
            made: false,
        });
    }
    if !listeners.is_empty() {
        if args.listen.is_some() || args.socket.is_some() {
            tracing::warn!(
                "listening on the sockets the service manager passed in; --listen and --socket are not used"
            );
        }
        return Ok(listeners);
    }
    let listen = match (&args.listen, &args.socket) {
        (Some(l), _) => Some(l.clone()),
        (None, None) => Some(DEFAULT_LISTEN.to_string()),
        (None, Some(_)) => None,
    };
    if let Some(addr) = &listen {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = tcp.local_addr()?;
        listeners.push(Listener::Tcp(tcp, local));
    }
    if let Some(path) = &args.socket {
        listeners.push(Listener::Unix {
            listener: bind_unix(path)?,
            path: path.clone(),
            made: true,
        });
    }
    Ok(listeners)
}

/// Tells systemd (a `Type=notify` unit) how the server is doing; nothing
/// when not run by one.
fn notify_service_manager(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

pub async fn run(args: ServeArgs, settings: &Settings, inherited: ListenFd) -> Result<()> {
    let mut signals = StopSignals::install()?;
    // Everything that can fail without a volume, before any is opened (and
    // claimed): settings, certificates, listeners.
    args.check()?;
    let limits = args.limits()?;
    let tls = match &args.tls_certs {
        Some(dir) => Some(
            hlfs_nbd::tls::acceptor_from_dir(dir, args.tls_verify_clients)
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let metrics_listener = match &args.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let listeners = listeners(&args, inherited).await?;
    let mut registry = Registry::default();
    let requests = metrics_listener
        .is_some()
        .then(|| Arc::new(RequestMetrics::register(&mut registry)));
    let mut volumes = Vec::new();
    let opened = open_exports(&args, settings, requests.as_deref(), &mut volumes)
        .await
        .and_then(|exports| {
            let names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
            let owned = owned_volumes(&args, settings, &volumes, &names)?;
            Ok((exports, names, owned))
        });
    let (exports, names, owned) = match opened {
        Ok(opened) => opened,
        Err(e) => return Err(abandon(e, &volumes, &listeners).await),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let catalog = Arc::new(Exports {
        fixed: exports.into_iter().map(|e| (e.name.clone(), e)).collect(),
        owned: owned.clone(),
        open: settings.open.clone(),
        requests,
        opened: Default::default(),
    });
    let control_stop = stop_rx.clone();
    let server = Server::with_catalog(catalog.clone(), tls, limits, stop_rx);
    let mut metrics_task = tokio::task::JoinSet::new();
    if let Some(listener) = metrics_listener {
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => return Err(abandon(e.into(), &volumes, &listeners).await),
        };
        registry.register_collector(Box::new(metrics::Served {
            server: server.clone(),
            volumes: names.iter().cloned().zip(volumes.iter().cloned()).collect(),
        }));
        eprintln!("hlfs: metrics at http://{addr}/metrics");
        metrics_task.spawn(metrics::serve(listener, Arc::new(registry)));
    }
    let mut control_tasks = tokio::task::JoinSet::new();
    let sockets = start_control(&owned, &server, &control_stop, &mut control_tasks);
    let mut tasks = tokio::task::JoinSet::new();
    let mut uris = Vec::new();
    let mut made_sockets = Vec::new();
    for listener in listeners {
        match listener {
            Listener::Tcp(listener, local) => {
                let host = match local {
                    std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
                    std::net::SocketAddr::V4(a) => a.ip().to_string(),
                };
                for n in &names {
                    uris.push(uri(scheme, n, Some((&host, local.port())), None));
                }
                tasks.spawn(server.clone().serve_tcp(listener));
            }
            Listener::Unix {
                listener,
                path,
                made,
            } => {
                for n in &names {
                    uris.push(uri(scheme, n, None, Some(&path)));
                }
                if made {
                    made_sockets.push(path);
                }
                tasks.spawn(server.clone().serve_unix(listener));
            }
        }
    }
    // Only for whoever started the server: if its stdout is gone, the
    // server serves all the same.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        for uri in &uris {
            let _ = writeln!(stdout, "{uri}");
        }
        let _ = stdout.flush();
    }
    notify_service_manager(sd_notify::NotifyState::Ready);
    tracing::info!(exports = ?names, "serving; stop with SIGINT or SIGTERM");

    let outcome = tokio::select! {
        sig = signals.recv() => {
            tracing::info!("{sig}: draining in-flight requests");
            notify_service_manager(sd_notify::NotifyState::Stopping);
            Ok(())
        }
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the listener failed")),
            Err(e) => Err(anyhow::anyhow!("the listener stopped: {e}")),
        },
    };
    let _ = stop_tx.send(true);
    // A cleaning run would hold the shutdown for its passes and its grace
    // period: it stops at the next safe point instead.
    for vol in &volumes {
        vol.stop_cleaning();
    }
    // No more commands, and those running answer before the volumes
    // close. A CLI started from now on finds no owner, and is refused by
    // the journal lock until the close below releases it.
    while control_tasks.join_next().await.is_some() {}
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    metrics_task.shutdown().await;
    while tasks.join_next().await.is_some() {}
    for path in &made_sockets {
        let _ = std::fs::remove_file(path);
    }
    catalog.close_opened().await;
    // Flush, seal and release every writer claim, even after a failure.
    let mut closed = Ok(());
    for vol in volumes {
        if let Err(e) = vol.close().await {
            closed = Err(anyhow::Error::new(e).context(format!("closing {}", vol.location())));
        }
    }
    outcome?;
    closed?;
    tracing::info!("stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_percent_encoded() {
        assert_eq!(
            uri("nbd", "my vm@s1", Some(("127.0.0.1", 10809)), None),
            "nbd://127.0.0.1:10809/my%20vm@s1"
        );
        assert_eq!(
            uri("nbds", "a%b", None, Some(Path::new("/tmp/x y/s.sock"))),
            "nbds+unix:///a%25b?socket=/tmp/x%20y/s.sock"
        );
    }

    #[test]
    fn export_names_are_file_names() {
        assert_eq!(export_name("./vm1.hlfs"), "vm1.hlfs");
        assert_eq!(export_name("/var/lib/hlfs/vm2/"), "vm2");
        assert_eq!(export_name("file:///srv/disk"), "disk");
    }
}
