//! What every command shares: the global options and the settings they
//! make, and the parsing and printing helpers (sizes, `VOLUME@SNAPSHOT`,
//! progress bars).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use hlfs_volume::{Backend, Durability, OpenOptions, StoreOptions, View, Volume, VolumeError};
use indicatif::{ProgressBar, ProgressStyle};

/// `println!` for a command's output. When the reader has gone away
/// (`hlfs snapshot list vm1 | head -1`), the command ends as Unix tools
/// do, by SIGPIPE, instead of panicking as `println!` does: Rust ignores
/// SIGPIPE so that a closed socket is an error, not death, and that stays
/// so for every socket.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::args::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::args::write_out(format_args!($($arg)*))
    };
}

pub fn write_out(text: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // SAFETY: restoring a signal's default action and raising it;
            // the process ends here, as a C tool writing to the pipe would.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            // Still here: SIGPIPE is blocked. The status a shell gives a
            // command killed by it.
            std::process::exit(128 + libc::SIGPIPE);
        }
        Err(e) => {
            eprintln!("hlfs: error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// Options every command takes.
#[derive(clap::Args, Debug)]
pub struct GlobalArgs {
    /// Log what the engine does (or set RUST_LOG).
    #[arg(short, long, global = true)]
    pub verbose: bool,

    /// Memory the block map may use while the volume is open.
    #[arg(long, global = true, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub map_budget: u64,

    /// Directory for the local journal and read cache of volumes on a
    /// remote store (s3://, rados://, hdfs://). Journals there hold writes not yet uploaded:
    /// keep it on a disk that survives reboots.
    #[arg(long, global = true, value_name = "DIR", env = "HLFS_CACHE_DIR", default_value_os_t = hlfs_volume::default_cache_dir())]
    pub cache_dir: PathBuf,

    /// Most bytes the cache directory holds: the read cache, and room set
    /// aside for the journal of each volume open for writing (5 segments).
    #[arg(long, global = true, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,

    /// When a FLUSH returns, the data is in: `local`, the local journal
    /// (synced; segments upload in the background), or `remote`, the
    /// store (each FLUSH seals and uploads; for hosts whose local disk is
    /// not trusted).
    #[arg(long, global = true, value_enum, default_value = "local")]
    pub durability: DurabilityArg,

    /// Seconds a store request is retried (backoff with jitter) before it
    /// fails, and that a write or flush waits for a stalled store before it
    /// fails with an I/O error. Nothing flushed is lost either way.
    #[arg(long, global = true, value_name = "SECS", default_value = "30")]
    pub store_timeout: u64,

    /// Ceph configuration file for rados:// volumes (else CEPH_CONF, else
    /// Ceph's default places). Further librados options: CEPH_ARGS.
    #[arg(long, global = true, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,

    /// Ceph client id for rados:// volumes: `ID` or `client.ID` (default
    /// admin).
    #[arg(long, global = true, value_name = "ID")]
    pub ceph_id: Option<String>,

    /// Keyring holding the Ceph client's key (else the one the
    /// configuration names).
    #[arg(long, global = true, value_name = "FILE")]
    pub ceph_keyring: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DurabilityArg {
    Local,
    Remote,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Durability {
        match d {
            DurabilityArg::Local => Durability::Local,
            DurabilityArg::Remote => Durability::Remote,
        }
    }
}

/// What the global options set for every command.
pub struct Settings {
    pub open: OpenOptions,
    pub store: StoreOptions,
}

impl Settings {
    pub fn new(global: &GlobalArgs) -> Settings {
        Settings {
            open: OpenOptions {
                map_budget: global.map_budget,
                durability: global.durability.into(),
                store_wait: Duration::from_secs(global.store_timeout),
                ..OpenOptions::default()
            },
            store: StoreOptions {
                cache_dir: global.cache_dir.clone(),
                cache_size: global.cache_size,
                retry_budget: Duration::from_secs(global.store_timeout),
                ceph: hlfs_volume::CephSettings {
                    conf: global.ceph_conf.clone(),
                    id: global.ceph_id.clone(),
                    keyring: global.ceph_keyring.clone(),
                },
            },
        }
    }

    /// Where the volume at `volume` lives; `create` makes a missing local
    /// directory.
    pub fn backend(&self, volume: &str, create: bool) -> Result<Backend> {
        Ok(Backend::parse(volume, create, &self.store)?)
    }
}

pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size ({e}); use e.g. 512M, 10G, 1T"))
}

/// Splits VOLUME@SNAPSHOT; a path that exists as given is never split.
pub fn split_snapshot(arg: &str) -> (&str, Option<&str>) {
    if Path::new(arg).exists() {
        return (arg, None);
    }
    match arg.rsplit_once('@') {
        Some((vol, snap)) if !snap.is_empty() && !snap.contains('/') => (vol, Some(snap)),
        _ => (arg, None),
    }
}

/// A retention window: a duration such as 30m, 1h or 7d (in ms), or
/// `off` (0).
pub fn parse_window(s: &str) -> std::result::Result<u64, String> {
    if s == "off" || s == "0" {
        return Ok(0);
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.as_millis() >= 1 => Ok(d.as_millis().min(u64::MAX as u128) as u64),
        _ => Err(format!(
            "{s:?} is not a retention window: give a duration such as 30m, 1h or 7d, or off"
        )),
    }
}

/// What the part after `@` of VOLUME@X names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    /// A snapshot (names never start with `-`).
    Snapshot(String),
    /// A moment before now (`-10m`), in ms since the epoch.
    Moment(u64),
    /// A UTC time (`2026-12-07T10:00:00Z`): a snapshot of that name if
    /// there is one, else that moment.
    SnapshotOrMoment(String, u64),
}

impl At {
    pub fn parse(s: &str, now_ms: u64) -> std::result::Result<At, String> {
        if let Some(ago) = s.strip_prefix('-') {
            let d = humantime::parse_duration(ago).map_err(|e| {
                format!("@{s}: {e}; a moment before now is written like @-10m or @-2h30m")
            })?;
            return Ok(At::Moment(
                now_ms.saturating_sub(d.as_millis().min(u64::MAX as u128) as u64),
            ));
        }
        // A date and an hour: a time, which must then parse.
        let b = s.as_bytes();
        let looks_like_time = b.len() >= 14
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[7] == b'-'
            && matches!(b[10], b'T' | b't' | b' ');
        Ok(match humantime::parse_rfc3339_weak(s) {
            Ok(t) => {
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| format!("@{s} is before 1970"))?
                    .as_millis() as u64;
                At::SnapshotOrMoment(s.to_string(), ms)
            }
            Err(e) if looks_like_time => {
                return Err(format!(
                    "@{s}: {e}; write a moment in UTC, like 2026-12-07T10:00:00Z or 2026-12-07T10:00:00.250Z"
                ))
            }
            Err(_) => At::Snapshot(s.to_string()),
        })
    }
}

/// Now, in ms since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A moment as RFC 3339 UTC with milliseconds, as `VOL@TIME` takes it.
pub fn utc_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Opens VOLUME or VOLUME@X read-only: the head, a snapshot, or a moment
/// (inside the retention window exactly; before it, the newest snapshot
/// taken at or before it).
pub async fn open_view(
    settings: &Settings,
    volume: &str,
    at: Option<&str>,
) -> anyhow::Result<Volume> {
    let backend = settings.backend(volume, false)?;
    let view = match at
        .map(|s| At::parse(s, now_ms()))
        .transpose()
        .map_err(anyhow::Error::msg)?
    {
        None => View::Head,
        Some(At::Snapshot(name)) => View::Snapshot(name),
        Some(At::Moment(t)) => View::AsOf(t),
        Some(At::SnapshotOrMoment(name, t)) => {
            match Volume::open_read_only(backend.clone(), &settings.open, View::Snapshot(name))
                .await
            {
                Err(VolumeError::SnapshotNotFound(_)) => View::AsOf(t),
                opened => return Ok(opened?),
            }
        }
    };
    Ok(Volume::open_read_only(backend, &settings.open, view).await?)
}

/// 1536 -> "1.5 KiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The longest grace period cleaning takes: a day; longer would be a
/// mistake, not a choice.
pub const MAX_GRACE_SECS: u64 = 86_400;

/// A space target: stored ÷ live, a finite number of at least 1.
pub fn parse_space_target(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 1.0 => Ok(t),
        _ => Err(format!(
            "the space target is stored ÷ live, a number of at least 1 (such as 1.2), not {s:?}"
        )),
    }
}

/// A progress bar on stderr, if it is a terminal: of `total` bytes, or a
/// spinner when the total is unknown.
pub fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .expect("valid template"),
        ),
    };
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn snapshot_addresses_split_unless_the_path_exists() {
        assert_eq!(split_snapshot("vm1@s1"), ("vm1", Some("s1")));
        assert_eq!(split_snapshot("s3://b/vm@x"), ("s3://b/vm", Some("x")));
        assert_eq!(split_snapshot("vm1@"), ("vm1@", None));
        assert_eq!(split_snapshot("a@b/c"), ("a@b/c", None));
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("disk@2024");
        std::fs::create_dir(&odd).unwrap();
        let odd = odd.to_str().unwrap();
        assert_eq!(split_snapshot(odd), (odd, None));
    }

    #[test]
    fn windows_and_moments_parse() {
        assert_eq!(parse_window("1h"), Ok(3_600_000));
        assert_eq!(parse_window("off"), Ok(0));
        assert!(parse_window("soon").is_err());
        let now = 1_800_000_000_000;
        assert_eq!(At::parse("-10m", now), Ok(At::Moment(now - 600_000)));
        assert!(At::parse("-ages", now).is_err());
        assert_eq!(At::parse("s1", now), Ok(At::Snapshot("s1".into())));
        assert_eq!(
            At::parse("2024-01-01", now),
            Ok(At::Snapshot("2024-01-01".into()))
        );
        assert!(At::parse("2026-12-07T10:00:00+01:00", now)
            .unwrap_err()
            .contains("UTC"));
        assert_eq!(
            At::parse("2026-12-07T10:00:00Z", now),
            Ok(At::SnapshotOrMoment(
                "2026-12-07T10:00:00Z".into(),
                1_796_637_600_000
            ))
        );
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
