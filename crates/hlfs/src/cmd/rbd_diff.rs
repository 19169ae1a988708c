//! `hlfs export-diff` and `hlfs import-diff`: changes as an RBD diff
//! stream (the format of `rbd export-diff` and `rbd import-diff`), to back
//! a volume up incrementally, or move changes between HLFS and Ceph RBD.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use hlfs_device::control::{Answer, Client, Command};
use hlfs_volume::{export_diff, export_image, import_diff, DiffStreamReport, View, Volume};
use tokio::io::AsyncRead;
use tokio::signal::unix::{signal, SignalKind};

use super::{finish, open_writer};
use crate::args::{human, progress, split_snapshot, Settings};

#[derive(clap::Args, Debug)]
pub struct ExportDiffArgs {
    /// VOLUME@SNAPSHOT, or VOLUME for its head (only of a volume no server
    /// holds: take a snapshot of a served one and export that).
    #[arg(value_name = "VOLUME[@SNAPSHOT]")]
    volume: String,
    /// Where to write the stream: a file (replaced once the export is
    /// whole and synced; left as it was if it fails), or - for stdout.
    #[arg(value_name = "FILE")]
    file: String,
    /// The older snapshot: only what changed since it. Without it, all the
    /// data (the start of a new replica).
    #[arg(long, value_name = "SNAPSHOT")]
    from: Option<String>,
    /// Every snapshot and the head, as `rbd export --export-format 2`
    /// writes an image (a diff per snapshot, in the v2 diff format):
    /// `rbd import --export-format 2 FILE IMAGE` makes an RBD image with
    /// the same snapshots, and `hlfs import-diff FILE NEWVOLUME` a volume.
    #[arg(long, conflicts_with = "from")]
    all_snapshots: bool,
    /// Print a JSON summary: {"from", "to", "size", "data_bytes",
    /// "zero_bytes"}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ImportDiffArgs {
    /// The stream: a file, or - for stdin.
    #[arg(value_name = "FILE")]
    file: String,
    /// The volume to apply it to. A served volume's server applies it, and
    /// only while no client is connected; it reads the stream from a file
    /// (stdin is first copied to one in $TMPDIR, which the server must be
    /// able to read: same user).
    volume: String,
    /// Print a JSON summary, as export-diff does.
    #[arg(long)]
    json: bool,
}

pub async fn export(args: ExportDiffArgs, settings: &Settings) -> Result<()> {
    if args.json && args.file == "-" {
        bail!("--json prints to stdout, where the stream goes: write the stream to a file");
    }
    let (volume, snap) = split_snapshot(&args.volume);
    if args.all_snapshots && snap.is_some() {
        bail!(
            "--all-snapshots exports every snapshot and the head: name the volume alone, not {}",
            args.volume
        );
    }
    let backend = settings.backend(volume, false)?;
    let vol = match snap {
        Some(s) => {
            let view = View::Snapshot(s.to_string());
            Volume::open_read_only(backend, &settings.open, view).await?
        }
        None => {
            if Client::connect(&backend).await?.is_some() {
                bail!(
                    "{volume} is served here, and its head changes while it is read: take a snapshot (hlfs snapshot create {volume} NAME) and export {volume}@NAME"
                );
            }
            // Held for writing, the head holds still while it is read.
            open_writer(volume, settings).await?
        }
    };
    let started = Instant::now();
    let bar = progress(None, "exporting changes");
    let tell = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let what = match args.all_snapshots {
        true => Export::Image(&settings.open),
        false => Export::Diff(args.from.as_deref()),
    };
    let exported = async {
        match args.file.as_str() {
            "-" => what.write(&vol, tokio::io::stdout(), &tell).await,
            path => export_to_file(&vol, what, path, &tell).await,
        }
    }
    .await;
    bar.finish_and_clear();
    let report = match snap {
        Some(_) => exported?,
        None => finish(vol, exported).await?,
    };
    summary(&report, args.json, "exported", &args.file, started)
}

pub async fn import(args: ImportDiffArgs, settings: &Settings) -> Result<()> {
    let backend = settings.backend(&args.volume, false)?;
    if let Some(owner) = Client::connect(&backend).await? {
        // Its server applies it, reading the file itself; it refuses while
        // clients are connected, as for a rollback.
        let started = Instant::now();
        let (owner, spooled) = match args.file.as_str() {
            "-" => {
                // Refused before stdin is read: it cannot be read again.
                if let Answer::Status(live) = owner.call(Command::Status).await? {
                    if live.connections > 0 {
                        bail!(
                            "{} is served here and {} client(s) connected: an import waits for none (nothing was read from stdin)",
                            args.volume,
                            live.connections
                        );
                    }
                }
                let spool = Spool::from_stdin().await?;
                let owner = Client::connect(&backend)
                    .await?
                    .with_context(|| format!("the server of {} has stopped", args.volume))?;
                (owner, Some(spool))
            }
            _ => (owner, None),
        };
        let path = match &spooled {
            Some(spool) => spool.file.path().to_path_buf(),
            None => std::fs::canonicalize(&args.file)
                .with_context(|| format!("cannot open {}", args.file))?,
        };
        let command = Command::ImportDiff {
            path: path.to_string_lossy().into_owned(),
        };
        let report = owner.call(command).await?.into_import_report()?;
        return summary(&report, args.json, "imported", &args.volume, started);
    }
    let (input, total): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) = match args.file.as_str()
    {
        "-" => (Box::new(tokio::io::stdin()), None),
        path => {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {path}"))?;
            let len = file.metadata().await.ok().map(|m| m.len());
            (Box::new(tokio::io::BufReader::new(file)), len)
        }
    };
    let vol = open_writer(&args.volume, settings).await?;
    let started = Instant::now();
    let bar = progress(total, "importing changes");
    let imported = import_diff(&vol, input, &|read| bar.set_position(read)).await;
    bar.finish_and_clear();
    let report = finish(vol, imported).await?;
    summary(&report, args.json, "imported", &args.volume, started)
}

/// Stdin copied to a new file in the temporary directory (readable by
/// this user alone), for a server that reads a stream from a file. The
/// file goes when this is dropped, or when the command is interrupted.
struct Spool {
    file: tempfile::NamedTempFile,
    on_signal: tokio::task::JoinHandle<()>,
}

impl Spool {
    async fn from_stdin() -> Result<Spool> {
        let file = tempfile::Builder::new()
            .prefix(".hlfs-import-diff-")
            .tempfile()
            .context("cannot create a file in the temporary directory to hold stdin")?;
        let path = file.path().to_path_buf();
        // Registered before anything can be interrupted.
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        let on_signal = tokio::spawn(async move {
            let code = tokio::select! {
                _ = interrupt.recv() => 130,
                _ = terminate.recv() => 143,
            };
            let _ = std::fs::remove_file(&path);
            eprintln!(
                "hlfs: interrupted; the copy of stdin is removed (a server already importing it goes on: `hlfs snapshot list` tells)"
            );
            std::process::exit(code);
        });
        let spool = Spool { file, on_signal };
        let copy = spool
            .file
            .reopen()
            .context("cannot reopen the file holding stdin")?;
        tokio::task::spawn_blocking(move || {
            let bar = progress(None, "reading stdin");
            let mut input = bar.wrap_read(std::io::stdin().lock());
            let mut copy = copy;
            let copied = std::io::copy(&mut input, &mut copy);
            bar.finish_and_clear();
            copied.context("cannot copy stdin to a temporary file")
        })
        .await
        .context("copying stdin stopped")??;
        Ok(spool)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.on_signal.abort();
    }
}

/// What `hlfs export-diff` writes.
#[derive(Clone, Copy)]
enum Export<'a> {
    /// A diff stream since this snapshot, or of all the data.
    Diff(Option<&'a str>),
    /// Every snapshot and the head as an RBD image; views opened so.
    Image(&'a hlfs_volume::OpenOptions),
}

impl Export<'_> {
    async fn write<W: tokio::io::AsyncWrite + Unpin>(
        self,
        vol: &Volume,
        out: W,
        tell: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> hlfs_volume::Result<DiffStreamReport> {
        match self {
            Export::Diff(from) => export_diff(vol, from, out, tell).await,
            Export::Image(opts) => export_image(vol, opts, out, tell).await,
        }
    }
}

/// Exports into `path` all or nothing: the stream goes to a temporary
/// file beside it, synced, then renamed over `path`; a failed export
/// leaves `path` as it was (an earlier backup of the same name included).
async fn export_to_file(
    vol: &Volume,
    what: Export<'_>,
    path: &str,
    tell: &(dyn Fn(u64, u64) + Send + Sync),
) -> hlfs_volume::Result<DiffStreamReport> {
    let target = std::path::Path::new(path);
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
    let temp = target.with_file_name(format!(
        ".{}.{}.partial",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let io = |what: &str, e: std::io::Error| {
        hlfs_volume::VolumeError::InvalidArgument(format!("cannot {what} {}: {e}", temp.display()))
    };
    let file = tokio::fs::File::create(&temp)
        .await
        .map_err(|e| io("create", e))?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let written = async {
        let report = what.write(vol, &mut out, tell).await?;
        out.get_ref().sync_all().await.map_err(|e| io("sync", e))?;
        std::fs::rename(&temp, target).map_err(|e| io("rename", e))?;
        Ok(report)
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

fn summary(
    r: &DiffStreamReport,
    json: bool,
    verb: &str,
    place: &str,
    started: Instant,
) -> Result<()> {
    if json {
        let v = serde_json::json!({
            "from": r.from,
            "to": r.to,
            "size": r.size,
            "data_bytes": r.data_bytes,
            "zero_bytes": r.zero_bytes,
            "diffs": r.diffs,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let span = match (&r.from, &r.to) {
        _ if r.diffs > 1 => format!(
            "an RBD image of {} diffs (its snapshots up to {}, then its head)",
            r.diffs,
            r.to.as_deref().unwrap_or("-")
        ),
        (Some(f), Some(t)) => format!("from {f} to {t}"),
        (Some(f), None) => format!("from {f} to the head"),
        (None, Some(t)) => format!("all of {t}"),
        (None, None) => "all of the head".to_string(),
    };
    eprintln!(
        "{verb} {span} ({place}): {} of data, {} zeroed, image {} in {:.1}s",
        human(r.data_bytes),
        human(r.zero_bytes),
        human(r.size),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
