//! The command line: global options, the commands, and which module runs
//! each.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use listenfd::ListenFd;

use crate::args::{GlobalArgs, Settings};
use crate::cmd;
use crate::cmd::serve::Given;

/// HLFS: a log-structured virtual disk for virtual machines.
///
/// A VOLUME is a local directory path (e.g. ./vm1.hlfs), a file:// URI, or
/// s3://BUCKET/PREFIX/NAME (endpoint, region and credentials from the AWS
/// environment variables: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY).
/// Sizes take binary suffixes: 512K, 64M, 10G, 1T.
#[derive(Parser, Debug)]
#[command(name = "hlfs", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an empty thin volume.
    Create(cmd::create::CreateArgs),
    /// Describe a volume: size, space used, snapshots, its parent and
    /// clones.
    Info(cmd::info::InfoArgs),
    /// Make a writable clone of a snapshot (VOLUME@SNAPSHOT) at a new
    /// address, on the same backend or another, in O(1): nothing is
    /// copied, the clone reads from the snapshot what it has not written.
    /// The snapshot is pinned: it cannot be deleted while the clone exists.
    Clone(cmd::clone::CloneArgs),
    /// Copy into a clone what it still reads from its parent, then drop the
    /// link and the pin (the parent's snapshot can then be deleted). Works
    /// while the clone is served; refused while the clone has snapshots.
    Flatten(cmd::flatten::FlattenArgs),
    /// Copy a raw disk image (FILE, or - for stdin) into a volume. All-zero
    /// blocks are not stored, so the volume stays thin, and the holes of a
    /// sparse FILE are not even read. Into a volume that has data, holes
    /// and zeros are written as zeros.
    Import(cmd::import::ImportArgs),
    /// Copy a volume, one of its snapshots (VOLUME@SNAPSHOT), or a moment
    /// of its retention window (VOLUME@-10m, VOLUME@2026-12-07T10:00:00Z),
    /// to a raw image FILE (sparse where the volume has holes), or - for
    /// stdout.
    Export(cmd::export::ExportArgs),
    /// Grow a volume to a new size.
    Resize(cmd::resize::ResizeArgs),
    /// Keep a window of the volume's past: with `hlfs retain VOLUME 1h`,
    /// VOLUME@-10m or VOLUME@2026-12-07T10:00:00Z (UTC) opens it exactly as
    /// it was then, in `export` and `serve`. `off` turns it off.
    Retain(cmd::retain::RetainArgs),
    /// Create, list, delete or roll back to snapshots.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCommand),
    /// Verify every record's checksum, every map page and every block;
    /// exits non-zero and says where if anything is damaged.
    Check(cmd::check::CheckArgs),
    /// Segment cleaning: give back the space overwrites and deleted
    /// snapshots left; `--stats` shows where the space goes.
    Gc(cmd::gc::GcArgs),
    /// List what changed between two snapshots (or from a snapshot to the
    /// head): data and zeroed extents, from the map alone, at a cost that
    /// grows with what changed.
    Diff(cmd::diff::DiffArgs),
    /// Write what changed since a snapshot (or all the data) as an RBD diff
    /// stream, the format of `rbd export-diff`: an incremental backup that
    /// `hlfs import-diff` or `rbd import-diff` applies.
    ExportDiff(cmd::rbd_diff::ExportDiffArgs),
    /// Apply an RBD diff stream (from `hlfs export-diff` or `rbd
    /// export-diff`) to a volume, all or nothing: it must have the stream's
    /// from-snapshot, gets its to-snapshot, and is left as it was if the
    /// stream is cut off or malformed.
    ImportDiff(cmd::rbd_diff::ImportDiffArgs),
    /// Serve volumes and snapshots over NBD (to QEMU, nbd-client, libnbd,
    /// fio) until SIGINT or SIGTERM, then flush, seal and exit.
    Serve(cmd::serve::ServeArgs),
    /// Benchmark the engine on the local backend.
    Bench(cmd::bench::BenchArgs),
}

/// Runs the command. `given` names the options the user gave (which a
/// config file does not override); `inherited` holds the listening sockets
/// a service manager passed in (socket activation).
pub async fn run(mut cli: Cli, given: Given, inherited: ListenFd) -> Result<ExitCode> {
    if let Command::Serve(args) = &mut cli.command {
        args.read_config(&given, &mut cli.global)?;
    }
    let settings = Settings::new(&cli.global);
    match cli.command {
        Command::Create(args) => cmd::create::run(args, &settings).await?,
        Command::Info(args) => cmd::info::run(args, &settings).await?,
        Command::Clone(args) => cmd::clone::run(args, &settings).await?,
        Command::Flatten(args) => cmd::flatten::run(args, &settings).await?,
        Command::Import(args) => cmd::import::run(args, &settings).await?,
        Command::Export(args) => cmd::export::run(args, &settings).await?,
        Command::Resize(args) => cmd::resize::run(args, &settings).await?,
        Command::Retain(args) => cmd::retain::run(args, &settings).await?,
        Command::Snapshot(command) => cmd::snapshot::run(command, &settings).await?,
        Command::Check(args) => return cmd::check::run(args, &settings).await,
        Command::Gc(args) => cmd::gc::run(args, &settings).await?,
        Command::Diff(args) => cmd::diff::run(args, &settings).await?,
        Command::ExportDiff(args) => cmd::rbd_diff::export(args, &settings).await?,
        Command::ImportDiff(args) => cmd::rbd_diff::import(args, &settings).await?,
        Command::Serve(args) => cmd::serve::run(args, &settings, inherited).await?,
        Command::Bench(args) => cmd::bench::run(args, &settings).await?,
    }
    Ok(ExitCode::SUCCESS)
}
