//! `hlfs`: create, inspect, import/export, snapshot, check and serve HLFS
//! volumes.

#[macro_use]
mod args;
mod cli;
mod cmd;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use hlfs_volume::{ErrorKind, VolumeError};

/// One malloc arena. Map pages are allocated on one runtime thread and freed
/// on another; with glibc's per-thread arenas the freed pages fragment, and
/// a 128 MiB map budget measured 263 MiB resident against 142 MiB with one
/// arena (which was also faster on this 2-core machine). MALLOC_ARENA_MAX
/// overrides it.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// The exit status of a failed command: 2 when what the user gave was
/// invalid (as clap does for a malformed command line), 1 otherwise.
fn exit_status(error: &anyhow::Error) -> ExitCode {
    let kind = error
        .chain()
        .find_map(|e| e.downcast_ref::<VolumeError>())
        .map(VolumeError::kind);
    match kind {
        Some(ErrorKind::InvalidInput) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let matches = cli::Cli::command().get_matches();
    let args = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = cmd::serve::Given::from_matches(&matches);
    // Taken before any other thread exists: taking them edits the
    // environment (LISTEN_FDS, LISTEN_PID).
    let inherited = listenfd::ListenFd::from_env();
    let filter = if args.global.verbose {
        "hlfs=debug,info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hlfs: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args, given, inherited)) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("hlfs: error: {e:#}");
            exit_status(&e)
        }
    }
}
