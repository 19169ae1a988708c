//! `hlfs serve` driven by real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy and fio's nbd engine talk to the real server binary.
//!
//! Every external command runs in its own process group with a time limit;
//! a guard kills (SIGKILL) whatever a test started if it is still running
//! when the test ends, passes or fails. Each test has its own temporary
//! directory and unix socket, so the tests run in parallel.
//!
//! A missing client tool skips the test with a loud message, except under
//! `CI=true`, where it fails naming the Debian package to install
//! (`.ci/run` installs them).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const HLFS: &str = env!("CARGO_BIN_EXE_hlfs");

/// Longest any one client command may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the server may take to print its URIs.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// External tools

fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths).any(|dir| {
                std::fs::metadata(dir.join(tool))
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// Whether `tool` is installed. Under CI=true a missing tool is a failure;
/// elsewhere it skips the test, loudly.
fn have(tool: &str, package: &str) -> bool {
    if on_path(tool) {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{tool} is not installed: CI must install the Debian package {package} (see .ci/run)"
        );
    }
    // Straight to fd 2: the test harness captures eprintln! of passing
    // tests, and a skip must not go unnoticed.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n******** SKIPPED: {tool} not installed (apt-get install {package}) ********\n"
    );
    false
}

/// Returns from the test unless every tool is installed.
macro_rules! require {
    ($($tool:literal => $pkg:literal),+ $(,)?) => {
        let found = [$(have($tool, $pkg)),+];
        if !found.iter().all(|f| *f) {
            return;
        }
    };
}

// ---------------------------------------------------------------------------
// Processes

/// A child process in its own process group; dropping it kills the group
/// (SIGKILL) if the child has not been reaped yet.
struct Proc {
    child: Child,
    what: String,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let what = describe(cmd);
        cmd.process_group(0).env_remove("RUST_LOG");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc {
            child,
            what,
            status: None,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the child alone.
    fn signal(&mut self, sig: i32) {
        if self.poll().is_none() {
            // SAFETY: plain kill(2) on a child we have not reaped.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// SIGKILL to the whole process group, then reap.
    fn kill(&mut self) -> ExitStatus {
        if self.poll().is_none() {
            // SAFETY: the group leader is our unreaped child, so the group
            // id cannot have been reused.
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        }
        self.wait()
    }

    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    fn wait(&mut self) -> ExitStatus {
        if self.status.is_none() {
            self.status = Some(self.child.wait().expect("wait"));
        }
        self.status.unwrap()
    }

    /// The exit status, or None if it still runs after `timeout`.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.poll() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.poll().is_none() {
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// What a finished command printed.
struct Out {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Out {
        assert!(self.status.success(), "{self}");
        self
    }

    /// stdout and stderr together.
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` to completion, capturing its output; kills it and fails the
/// test if it takes longer than `timeout`.
#[track_caller]
fn run_cmd(cmd: &mut Command, timeout: Duration) -> Out {
    run_cmd_fed(cmd, Stdio::null(), timeout)
}

/// `run_cmd` with `stdin` as the command's standard input.
#[track_caller]
fn run_cmd_fed(cmd: &mut Command, stdin: Stdio, timeout: Duration) -> Out {
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn(cmd);
    let stdout = reader(p.child.stdout.take());
    let stderr = reader(p.child.stderr.take());
    let status = p.wait_timeout(timeout);
    let timed_out = status.is_none();
    let status = status.unwrap_or_else(|| p.kill());
    let out = Out {
        what: p.what.clone(),
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(!timed_out, "timed out after {timeout:?} and killed: {out}");
    out
}

#[track_caller]
fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Out {
    run_cmd(Command::new(program).args(args), CLIENT_TIMEOUT)
}

#[track_caller]
fn hlfs<S: AsRef<OsStr>>(args: &[S]) -> Out {
    run(HLFS, args)
}

/// A client started in the background with its output going to a file.
fn spawn_logged<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S]) -> (Proc, PathBuf) {
    let log = dir.join(format!("{program}-{}.log", next_id()));
    let f = std::fs::File::create(&log).unwrap();
    let p = Proc::spawn(
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f),
    );
    (p, log)
}

fn next_id() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// fio writing at random through `uri` in the background (2 jobs, up to a
/// minute), returned once both jobs are connected, with its log.
fn background_fio(d: &Path, uri: &str, shape: &[&str]) -> (Proc, PathBuf) {
    let mut opts = vec![
        "--rw=randwrite",
        "--numjobs=2",
        "--size=32M",
        "--time_based",
        "--runtime=60",
    ];
    opts.extend_from_slice(shape);
    let (fio, log) = spawn_logged(d, "fio", &fio_args(uri, &opts));
    wait_for_fio(&log, 2);
    (fio, log)
}

/// Fails if fio has already stopped: the test needs it mid-workload.
fn assert_fio_running(fio: &mut Proc, log: &Path) {
    assert!(
        fio.poll().is_none(),
        "fio stopped early: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------
// The server

/// A running `hlfs serve`. Dropping it kills the server if still running.
struct Server {
    proc: Proc,
    uris: Vec<String>,
    log: PathBuf,
}

impl Server {
    /// Starts `hlfs serve ARGS` and reads one URI line per export.
    fn try_start(dir: &Path, args: &[&str], exports: usize) -> Result<Server, String> {
        let log = dir.join(format!("serve-{}.log", next_id()));
        let f = std::fs::File::create(&log).unwrap();
        let mut proc = Proc::spawn(
            Command::new(HLFS)
                .arg("serve")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(f),
        );
        let stdout = proc.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut uris = Vec::new();
        while uris.len() < exports {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => uris.push(line.trim().to_string()),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    proc.kill();
                    return Err(format!(
                        "{} printed {} of {exports} URIs within {START_TIMEOUT:?}: {uris:?}\n{}",
                        proc.what,
                        uris.len(),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.wait();
                    return Err(format!(
                        "{} exited ({status}) after printing {uris:?}\n{}",
                        proc.what,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                }
            }
        }
        Ok(Server { proc, uris, log })
    }

    #[track_caller]
    fn start(dir: &Path, args: &[&str], exports: usize) -> Server {
        Server::try_start(dir, args, exports).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `hlfs serve VOLUMES --socket DIR/nbd.sock`, one URI per volume.
    #[track_caller]
    fn unix(dir: &Path, volumes: &[&str], extra: &[&str]) -> Server {
        let sock = path_str(&dir.join("nbd.sock"));
        let mut args: Vec<&str> = volumes.to_vec();
        args.extend(["--socket", &sock]);
        args.extend(extra);
        Server::start(dir, &args, volumes.len())
    }

    fn uri(&self) -> &str {
        &self.uris[0]
    }

    /// The URI of the export whose name is `name`.
    fn uri_of(&self, name: &str) -> &str {
        self.uris
            .iter()
            .find(|u| export_of(u) == name)
            .unwrap_or_else(|| panic!("no export {name} in {:?}", self.uris))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the server must exit within STOP_TIMEOUT.
    #[track_caller]
    fn stop(mut self) -> ExitStatus {
        self.proc.signal(libc::SIGTERM);
        self.wait_stopped()
    }

    /// Waits (at most STOP_TIMEOUT) for a server told to stop to exit.
    #[track_caller]
    fn wait_stopped(mut self) -> ExitStatus {
        match self.proc.wait_timeout(STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                self.proc.kill();
                panic!(
                    "server did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGTERM; the server must exit 0.
    #[track_caller]
    fn stop_ok(self) {
        let log = self.log.clone();
        let status = self.stop();
        assert!(
            status.success(),
            "server exited with {status} after SIGTERM\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// SIGKILL: a crash.
    fn crash(mut self) {
        self.proc.kill();
    }
}

/// The export name in an NBD URI (between the authority and the query).
fn export_of(uri: &str) -> &str {
    let rest = uri.split_once("://").map(|x| x.1).unwrap_or(uri);
    let path = rest.split_once('/').map(|x| x.1).unwrap_or("");
    path.split('?').next().unwrap()
}

// ---------------------------------------------------------------------------
// Files and clients

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hlfs-nbd-")
        .tempdir()
        .unwrap()
}

/// Where a test's volume lives: in its temp dir, or under the remote
/// address `HLFS_TEST_REMOTE_BASE` (`s3://BUCKET/PREFIX` or
/// `rados://POOL/PREFIX`: scripts/test-s3.sh and scripts/test-rados.sh run
/// this suite against Ceph).
fn volume_at(dir: &Path, name: &str) -> String {
    match std::env::var("HLFS_TEST_REMOTE_BASE") {
        Ok(base) => format!(
            "{}/{}-{}/{name}",
            base.trim_end_matches('/'),
            std::process::id(),
            next_id()
        ),
        Err(_) => path_str(&dir.join(name)),
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Writes `len` bytes from a seeded PRNG to `path`; returns their sha256.
fn random_file(path: &Path, len: u64, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    format!("{:x}", h.finalize())
}

fn sha256(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// qemu-io on an NBD URI with the commands given; `-r` opens read-only.
fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> Out {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// qemu-io that must succeed with every pattern verified.
#[track_caller]
fn qemu_io_ok(uri: &str, read_only: bool, cmds: &[&str]) -> Out {
    let out = qemu_io(uri, read_only, cmds).ok();
    let text = out.text();
    assert!(
        !text.contains("Pattern verification failed")
            && !text.contains("failed")
            && !text.contains("error"),
        "{out}"
    );
    out
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run("nbdinfo", &["--json", uri]).ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// One export's entry in `nbdinfo --json`.
fn export_info(uri: &str) -> serde_json::Value {
    let v = nbdinfo_json(uri);
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v}");
    exports[0].clone()
}

/// `nbdinfo --map` of base:allocation: (offset, length, type,
/// description), adjacent extents of the same type merged.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32, String)> {
    nbd_map_of(uri, "base:allocation")
}

/// `nbdinfo --map=CONTEXT`, as `nbd_map`.
fn nbd_map_of(uri: &str, context: &str) -> Vec<(u64, u64, u32, String)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]).ok();
    let mut map: Vec<(u64, u64, u32, String)> = Vec::new();
    for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let mut cols = line.split_whitespace();
        let mut num = || -> u64 {
            cols.next()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("bad map line {line:?}: {out}"))
        };
        let (offset, len, kind) = (num(), num(), num() as u32);
        let desc = line
            .split_whitespace()
            .skip(3)
            .collect::<Vec<_>>()
            .join(" ");
        match map.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == offset => last.1 += len,
            _ => map.push((offset, len, kind, desc)),
        }
    }
    map
}

#[track_caller]
fn check_volume(vol: &str) {
    let out = hlfs(&["check", vol]).ok();
    assert!(out.stdout.contains("no damage found"), "{out}");
}

/// `hlfs info --json`.
fn info_of(vol: &str) -> serde_json::Value {
    let out = hlfs(&["info", "--json", vol]).ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// Waits (at most 20 s) until `jobs` fio jobs say they are connected, so a
/// loaded machine does not turn "mid-workload" into "before the start".
fn wait_for_fio(log: &Path, jobs: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches("connected to NBD server").count() >= jobs {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("fio did not report {jobs} connections within 20 s; going on");
}

/// fio's nbd engine, in one process (--thread), as a command line.
fn fio_args(uri: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--name=interop".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--thread".to_string(),
        "--group_reporting".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

// ---------------------------------------------------------------------------
// A minimal NBD client, to see the server's own answer to a request that
// the real clients refuse to send.

struct RawNbd {
    sock: std::os::unix::net::UnixStream,
    flags: u16,
}

impl RawNbd {
    /// Fixed-newstyle handshake with NBD_OPT_GO; simple replies only.
    fn connect(socket: &str, export: &str) -> RawNbd {
        let mut sock = std::os::unix::net::UnixStream::connect(socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
        let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
        assert!(server_flags & 1 != 0, "not fixed newstyle");
        let no_zeroes = server_flags & 2 != 0;
        sock.write_all(&(1u32 | if no_zeroes { 2 } else { 0 }).to_be_bytes())
            .unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&opt).unwrap();
        let mut flags = None;
        loop {
            let mut head = [0u8; 20];
            sock.read_exact(&mut head).unwrap();
            assert_eq!(
                u64::from_be_bytes(head[..8].try_into().unwrap()),
                0x3e889045565a9
            );
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            sock.read_exact(&mut data).unwrap();
            match kind {
                1 => break, // NBD_REP_ACK
                3 if data.len() >= 12 && data[..2] == [0, 0] => {
                    // NBD_INFO_EXPORT: size u64, transmission flags u16
                    flags = Some(u16::from_be_bytes([data[10], data[11]]));
                }
                3 => {}
                k => panic!("NBD_OPT_GO for {export} answered with reply type {k:#x}"),
            }
        }
        RawNbd {
            sock,
            flags: flags.expect("no NBD_INFO_EXPORT"),
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.sock.write_all(&req).unwrap();
    }

    /// A simple reply: the error code (0 = success).
    fn reply(&mut self, cookie: u64) -> u32 {
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
        assert_eq!(u64::from_be_bytes(r[8..].try_into().unwrap()), cookie);
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(1, 0xa1, offset, data.len() as u32, data);
        self.reply(0xa1)
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, 0xb2, offset, len, &[]);
        let err = self.reply(0xb2);
        assert_eq!(err, 0, "NBD_CMD_READ failed");
        let mut buf = vec![0u8; len as usize];
        self.sock.read_exact(&mut buf).unwrap();
        buf
    }

    fn disconnect(mut self) {
        self.request(2, 0xc3, 0, 0, &[]);
    }

    /// The next simple reply as (cookie, error), or None at end of stream.
    fn next_reply(&mut self) -> Option<(u64, u32)> {
        let mut r = [0u8; 16];
        match self.sock.read_exact(&mut r) {
            Ok(()) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    || e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                return None
            }
            Err(e) => panic!("reading a reply: {e}"),
        }
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
        let cookie = u64::from_be_bytes(r[8..].try_into().unwrap());
        Some((cookie, u32::from_be_bytes(r[4..8].try_into().unwrap())))
    }
}

// ---------------------------------------------------------------------------
// The tests

/// 256 MiB of random data through qemu-img convert, in and out.
#[test]
fn qemu_img_convert_round_trip() {
    require!("qemu-img" => "qemu-utils");
    let dir = tempdir();
    let img = dir.path().join("in.img");
    let want = random_file(&img, 256 * MIB, 1);
    let vol = volume_at(dir.path(), "vm.hlfs");
    let srv = Server::unix(dir.path(), &[&vol], &["--create", "--size", "256M"]);
    let uri = srv.uri().to_string();
    assert!(uri.starts_with("nbd+unix:///vm.hlfs?socket="), "{uri}");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &path_str(&img),
            &uri,
        ],
    )
    .ok();
    let out = path_str(&dir.path().join("out.img"));
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &out],
    )
    .ok();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 256 * MIB);
    assert_eq!(
        sha256(Path::new(&out)),
        want,
        "image changed on its way through NBD"
    );
    srv.stop_ok();
}

/// Byte patterns at unaligned offsets, across block boundaries, with
/// discard and write-zeroes (with and without unmap) in between.
#[test]
fn qemu_io_unaligned_patterns() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let vol = volume_at(dir.path(), "vm.hlfs");
    let srv = Server::unix(dir.path(), &[&vol], &["--create", "--size", "64M"]);
    let uri = srv.uri();
    let session1 = [
        // Unaligned write inside fresh space; the zeros around it stay.
        "write -P 0xab 1000 5000",
        "read -P 0xab 1000 5000",
        "read -P 0 0 1000",
        "read -P 0 6000 10000",
        // Three bytes straddling the 4K block boundary.
        "write -P 0xcd 4095 3",
        "read -P 0xab 1000 3095",
        "read -P 0xcd 4095 3",
        "read -P 0xab 4098 1902",
        // A large write that starts one byte before 1 MiB and ends
        // mid-block.
        "write -P 0x11 1048575 131073",
        "read -P 0x11 1048575 131073",
        // An unaligned discard in the middle reads back as zeros.
        "discard 1050000 70000",
        "read -P 0x11 1048575 1425",
        "read -P 0 1050000 70000",
        "read -P 0x11 1120000 59648",
        // Write-zeroes keeping the allocation (NO_HOLE)...
        "write -P 0x22 2097152 65536",
        "write -z 2097252 10000",
        "read -P 0x22 2097152 100",
        "read -P 0 2097252 10000",
        "read -P 0x22 2107252 55436",
        // ...and allowing the unmap.
        "write -z -u 2110000 20000",
        "read -P 0x22 2107252 2748",
        "read -P 0 2110000 20000",
        "read -P 0x22 2130000 32688",
        // The last bytes of the disk.
        "write -P 0xee 67108861 3",
        "read -P 0xee 67108861 3",
        "read -P 0 67100000 8861",
        "flush",
    ];
    qemu_io_ok(uri, false, &session1);
    // A second connection sees the same bytes.
    qemu_io_ok(
        uri,
        true,
        &[
            "read -P 0 0 1000",
            "read -P 0xab 1000 3095",
            "read -P 0xcd 4095 3",
            "read -P 0xab 4098 1902",
            "read -P 0 6000 1042575",
            "read -P 0x11 1048575 1425",
            "read -P 0 1050000 70000",
            "read -P 0x11 1120000 59648",
            "read -P 0x22 2097152 100",
            "read -P 0 2097252 10000",
            "read -P 0x22 2107252 2748",
            "read -P 0 2110000 20000",
            "read -P 0x22 2130000 32688",
            "read -P 0xee 67108861 3",
        ],
    );
    // Reads past the end fail cleanly, and the server keeps serving.
    let past = qemu_io(uri, true, &["read 67108860 8"]);
    assert!(
        !past.status.success()
            || past.text().contains("error")
            || past.text().contains("Input/output"),
        "a read past the end succeeded: {past}"
    );
    qemu_io_ok(uri, true, &["read -P 0xee 67108861 3"]);
    srv.stop_ok();
    check_volume(&vol);
}

/// Block status tells holes from data: fresh, written, discarded.
#[test]
fn nbdinfo_map_tracks_allocation() {
    require!("nbdinfo" => "libnbd-bin", "qemu-io" => "qemu-utils");
    let dir = tempdir();
    let vol = volume_at(dir.path(), "vm.hlfs");
    let srv = Server::unix(dir.path(), &[&vol], &["--create", "--size", "64M"]);
    let uri = srv.uri();
    let size = 64 * MIB;

    let map = nbd_map(uri);
    assert_eq!(
        map,
        vec![(0, size, 3, "hole,zero".to_string())],
        "fresh volume"
    );

    qemu_io_ok(uri, false, &["write -P 0x42 0 1M", "flush"]);
    let map = nbd_map(uri);
    assert_eq!(
        map,
        vec![
            (0, MIB, 0, "data".to_string()),
            (MIB, size - MIB, 3, "hole,zero".to_string())
        ],
        "after writing [0, 1M)"
    );

    qemu_io_ok(uri, false, &["discard 0 1M", "flush"]);
    let map = nbd_map(uri);
    assert_eq!(
        map,
        vec![(0, size, 3, "hole,zero".to_string())],
        "after discard"
    );
    qemu_io_ok(uri, true, &["read -P 0 0 1M"]);
    srv.stop_ok();
}

/// nbdcopy out of an imported volume, and into it, checked by sha256
/// against `hlfs export`.
#[test]
fn nbdcopy_round_trip() {
    require!("nbdcopy" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let input = d.join("in.img");
    let want = random_file(&input, 64 * MIB, 2);
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["import", &path_str(&input), &vol, "--create"]).ok();

    let srv = Server::unix(d, &[&vol], &[]);
    let uri = srv.uri().to_string();
    let out = d.join("out.img");
    run("nbdcopy", &[uri.as_str(), &path_str(&out)]).ok();
    assert_eq!(sha256(&out), want, "nbdcopy out of the volume");

    let input2 = d.join("in2.img");
    let want2 = random_file(&input2, 64 * MIB, 3);
    run("nbdcopy", &[path_str(&input2).as_str(), &uri]).ok();
    srv.stop_ok();

    let exported = d.join("exported.img");
    hlfs(&["export", &vol, &path_str(&exported)]).ok();
    assert_eq!(sha256(&exported), want2, "nbdcopy into the volume");
    check_volume(&vol);
}

/// fio's nbd engine with several jobs and many requests in flight,
/// verifying every block it wrote.
#[test]
fn fio_verify() {
    require!("fio" => "fio");
    let dir = tempdir();
    let vol = volume_at(dir.path(), "vm.hlfs");
    let srv = Server::unix(dir.path(), &[&vol], &["--create", "--size", "128M"]);
    let uri = srv.uri();
    let common = [
        "--iodepth=16",
        "--numjobs=4",
        "--size=16M",
        "--offset_increment=32M",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    let mut randwrite = vec!["--rw=randwrite", "--bs=4k"];
    randwrite.extend(common);
    let mut randrw = vec!["--rw=randrw", "--bssplit=4k/50:16k/30:64k/20"];
    randrw.extend(common);
    for extra in [randwrite, randrw] {
        let out = run_cmd(
            Command::new("fio")
                .args(fio_args(uri, &extra))
                .current_dir(dir.path()),
            CLIENT_TIMEOUT,
        )
        .ok();
        let text = out.text();
        assert!(text.contains("err= 0"), "{out}");
        assert!(
            !text.contains("verify: bad") && !text.contains("verify failed"),
            "{out}"
        );
    }
    srv.stop_ok();
    check_volume(&vol);
}

/// A snapshot served next to its volume is read-only, keeps its content,
/// and the volume stays writable.
#[test]
fn snapshot_export_is_read_only() {
    require!("nbdinfo" => "libnbd-bin", "qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    qemu_io_ok(
        srv.uri(),
        false,
        &["write -P 0x5a 0 64K", "write -P 0x5b 1M 4096", "flush"],
    );
    srv.stop_ok();
    hlfs(&["snapshot", "create", &vol, "snap1"]).ok();

    let snap_arg = format!("{vol}@snap1");
    let srv = Server::unix(d, &[&vol, &snap_arg], &[]);
    let head = srv.uri_of("vm.hlfs").to_string();
    let snap = srv.uri_of("vm.hlfs@snap1").to_string();

    let info = export_info(&snap);
    assert_eq!(info["is_read_only"], true, "{info}");
    assert_eq!(info["export-size"], 16 * MIB, "{info}");
    let info = export_info(&head);
    assert_eq!(info["is_read_only"], false, "{info}");
    // NBD_OPT_LIST names both exports.
    let out = run("nbdinfo", &["--list", "--json", head.as_str()]).ok();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["vm.hlfs", "vm.hlfs@snap1"], "{out}");

    // qemu-io refuses or fails the write; it never reports it written.
    let w = qemu_io(&snap, false, &["write -P 0x99 0 4096"]);
    let text = w.text();
    assert!(
        !w.status.success()
            || text.contains("Operation not permitted")
            || text.contains("Permission denied")
            || text.contains("read-only")
            || text.contains("read only"),
        "a write to the snapshot export was accepted: {w}"
    );
    assert!(!text.contains("wrote 4096/4096"), "{w}");

    // The server itself refuses a WRITE on the snapshot with EPERM and
    // keeps the connection usable.
    let sock = path_str(&d.join("nbd.sock"));
    let mut raw = RawNbd::connect(&sock, "vm.hlfs@snap1");
    assert!(
        raw.flags & 2 != 0,
        "NBD_FLAG_READ_ONLY not set: {:#x}",
        raw.flags
    );
    let err = raw.write(0, &[0x99; 4096]);
    assert_eq!(
        err, 1,
        "WRITE to a read-only export: want EPERM (1), got {err}"
    );
    assert_eq!(raw.read(0, 4096), vec![0x5a; 4096]);
    raw.disconnect();

    // The head export is still writable while the snapshot is served.
    qemu_io_ok(
        &head,
        false,
        &["write -P 0x6b 0 64K", "read -P 0x6b 0 64K", "flush"],
    );
    qemu_io_ok(
        &snap,
        true,
        &[
            "read -P 0x5a 0 64K",
            "read -P 0 64K 960K",
            "read -P 0x5b 1M 4096",
        ],
    );
    qemu_io_ok(&head, true, &["read -P 0x6b 0 64K", "read -P 0x5b 1M 4096"]);
    srv.stop_ok();
    check_volume(&vol);
}

/// SIGTERM while a client is writing: the server drains, exits 0, and
/// leaves a clean volume with the writer claim released.
#[test]
fn sigterm_with_client_connected() {
    require!("fio" => "fio", "nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    let srv = Server::unix(d, &[&vol], &["--create", "--size", "64M"]);
    let (mut fio, fio_log) = background_fio(d, srv.uri(), &["--bs=4k", "--iodepth=16"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_fio_running(&mut fio, &fio_log);

    let t0 = Instant::now();
    let log = srv.log.clone();
    let status = srv.stop();
    let took = t0.elapsed();
    assert!(
        status.success(),
        "server exited with {status} after SIGTERM with a client connected\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!("server stopped {took:?} after SIGTERM with fio connected");
    // The client loses its connection and ends on its own.
    let fio_status = fio.wait_timeout(Duration::from_secs(30));
    assert!(
        fio_status.is_some(),
        "fio still runs 30 s after the server exited: {}",
        std::fs::read_to_string(&fio_log).unwrap_or_default()
    );

    // `hlfs info` and `hlfs check` are only run once the server is gone:
    // run while a server writes, they can fail with "NNN.journal not found"
    // when the writer seals its journal under them.
    check_volume(&vol);
    let info = info_of(&vol);
    assert!(
        info["writer"].is_null(),
        "writer claim not released: {info}"
    );
    assert!(
        info["allocated_bytes"].as_u64().unwrap() > 0,
        "fio wrote nothing before the SIGTERM: {info}"
    );
    let srv = Server::unix(d, &[&vol], &[]);
    let info = export_info(srv.uri());
    assert_eq!(info["export-size"], 64 * MIB, "{info}");
    srv.stop_ok();
    check_volume(&vol);
}

/// A client killed in the middle of writing does not hurt the server or
/// the volume.
#[test]
fn client_killed_mid_write() {
    require!("fio" => "fio", "nbdinfo" => "libnbd-bin", "qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    let srv = Server::unix(d, &[&vol], &["--create", "--size", "64M"]);
    let (mut fio, fio_log) =
        background_fio(d, srv.uri(), &["--bssplit=4k/50:64k/50", "--iodepth=32"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_fio_running(&mut fio, &fio_log);
    fio.kill();

    let info = export_info(srv.uri());
    assert_eq!(info["export-size"], 64 * MIB, "{info}");
    qemu_io_ok(
        srv.uri(),
        false,
        &["write -P 0x77 4000 9000", "read -P 0x77 4000 9000", "flush"],
    );
    srv.stop_ok();
    check_volume(&vol);
    let info = info_of(&vol);
    assert!(
        info["writer"].is_null(),
        "writer claim not released: {info}"
    );
    assert!(
        info["allocated_bytes"].as_u64().unwrap() > 64 * 1024,
        "fio wrote nothing before it was killed: {info}"
    );
}

/// SIGTERM with writes still in flight on a connection: every write the
/// server acknowledged is in the volume after it exits, and the rest are
/// all-or-nothing per block.
#[test]
fn sigterm_keeps_acknowledged_writes() {
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    let srv = Server::unix(d, &[&vol], &["--create", "--size", "16M"]);
    // The server installs its SIGTERM handler only after printing its
    // URIs; give it that moment (see sigterm_right_after_start_is_clean).
    std::thread::sleep(Duration::from_millis(300));
    let sock = path_str(&d.join("nbd.sock"));
    let mut raw = RawNbd::connect(&sock, "vm.hlfs");
    const N: u64 = 128;
    const LEN: u64 = 64 * 1024;
    // A sender thread streams the writes while this thread reads replies
    // and sends SIGTERM at the first one: requests keep arriving while the
    // server drains. Once the server hangs up the sender just stops.
    let mut tx = raw.sock.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        for i in 0..N {
            let mut req = Vec::with_capacity(28 + LEN as usize);
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
            req.extend_from_slice(&i.to_be_bytes());
            req.extend_from_slice(&(i * LEN).to_be_bytes());
            req.extend_from_slice(&(LEN as u32).to_be_bytes());
            req.resize(req.len() + LEN as usize, i as u8 + 1);
            if tx.write_all(&req).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let log = srv.log.clone();
    let mut srv = srv;
    let mut acked = vec![false; N as usize];
    let mut replies = 0;
    let mut signalled = false;
    while let Some((cookie, err)) = raw.next_reply() {
        assert!(cookie < N, "reply for unknown cookie {cookie}");
        assert!(!acked[cookie as usize], "two replies for cookie {cookie}");
        replies += 1;
        if err == 0 {
            acked[cookie as usize] = true;
        }
        // SIGTERM after the first reply, while later writes are in flight.
        if !signalled {
            srv.proc.signal(libc::SIGTERM);
            signalled = true;
        }
    }
    let status = srv.wait_stopped();
    assert!(
        status.success(),
        "server exited with {status} after SIGTERM\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let sent = sender.join().unwrap();
    let n_acked = acked.iter().filter(|a| **a).count();
    eprintln!(
        "{sent} writes sent, {replies} replies, {n_acked} acknowledged before the server stopped"
    );
    assert!(n_acked > 0);

    let img = d.join("out.img");
    hlfs(&["export", &vol, &path_str(&img)]).ok();
    let bytes = std::fs::read(&img).unwrap();
    for i in 0..N as usize {
        let region = &bytes[i * LEN as usize..(i + 1) * LEN as usize];
        let pat = i as u8 + 1;
        if acked[i] {
            assert!(
                region.iter().all(|b| *b == pat),
                "acknowledged write {i} is not in the volume after SIGTERM"
            );
        } else {
            for block in region.chunks(4096) {
                assert!(
                    block.iter().all(|b| *b == pat) || block.iter().all(|b| *b == 0),
                    "unacknowledged write {i} left a torn block"
                );
            }
        }
    }
    check_volume(&vol);
}

/// Two volumes behind one server, four clients at once, each checking its
/// own region; the regions of the others stay intact.
#[test]
fn many_clients_two_exports() {
    require!("qemu-io" => "qemu-utils", "nbdcopy" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let a = volume_at(d, "a.hlfs");
    let b = volume_at(d, "b.hlfs");
    for v in [&a, &b] {
        hlfs(&["create", v, "--size", "32M"]).ok();
    }
    let srv = Server::unix(d, &[&a, &b], &[]);
    let uris = [
        srv.uri_of("a.hlfs").to_string(),
        srv.uri_of("b.hlfs").to_string(),
    ];
    const REGION: u64 = 8 * MIB;
    const CHUNK: u64 = 256 * 1024;
    // Client i writes export i % 2, region i / 2, pattern 0x30 + i; each
    // chunk starts 1000 bytes in so nothing is aligned.
    let client = |i: usize| {
        let base = (i / 2) as u64 * REGION;
        let pat = 0x30 + i;
        let mut cmds = Vec::new();
        for k in 0..16 {
            let off = base + k * CHUNK + 1000;
            cmds.push(format!("write -P {pat:#x} {off} {}", CHUNK - 2000));
            cmds.push(format!("read -P {pat:#x} {off} {}", CHUNK - 2000));
        }
        for k in 0..16 {
            let off = base + k * CHUNK + 1000;
            cmds.push(format!("read -P {pat:#x} {off} {}", CHUNK - 2000));
        }
        cmds.push("flush".to_string());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_ok(&uris[i % 2], false, &cmds);
    };
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..4).map(|i| s.spawn(move || client(i))).collect();
        for c in clients {
            c.join().expect("client failed");
        }
    });

    // Whole images over nbdcopy: every region as its client left it.
    for (e, uri) in uris.iter().enumerate() {
        let img = d.join(format!("copy{e}.img"));
        run("nbdcopy", &[uri.as_str(), &path_str(&img)]).ok();
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(bytes.len() as u64, 32 * MIB);
        let mut want = vec![0u8; 32 * MIB as usize];
        for i in (e..4).step_by(2) {
            let base = (i / 2) as u64 * REGION;
            for k in 0..16 {
                let off = (base + k * CHUNK + 1000) as usize;
                want[off..off + (CHUNK - 2000) as usize].fill(0x30 + i as u8);
            }
        }
        let bad = bytes.iter().zip(&want).position(|(x, y)| x != y);
        assert!(bad.is_none(), "export {uri}: first wrong byte at {bad:?}");
    }
    srv.stop_ok();
    check_volume(&a);
    check_volume(&b);
}

/// `--listen 127.0.0.1:PORT` serves over TCP.
#[test]
fn tcp_listen() {
    require!("nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let vol = volume_at(dir.path(), "vm.hlfs");
    let mut tries = 0;
    let (srv, port) = loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let args = [
            vol.as_str(),
            "--listen",
            &listen,
            "--create",
            "--size",
            "8M",
        ];
        match Server::try_start(dir.path(), &args, 1) {
            Ok(s) => break (s, port),
            // Someone else took the port between our probe and the bind.
            Err(e) if tries < 5 && e.contains("cannot listen") => tries += 1,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(srv.uri(), format!("nbd://127.0.0.1:{port}/vm.hlfs"));
    let info = export_info(srv.uri());
    assert_eq!(info["export-size"], 8 * MIB, "{info}");
    assert_eq!(info["export-name"], "vm.hlfs", "{info}");
    assert_eq!(info["is_read_only"], false, "{info}");
    srv.stop_ok();
}

/// SIGKILL of the server after a flush: a restarted server takes over the
/// stale claim and serves every flushed byte.
#[test]
fn server_crash_recovery() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    let srv = Server::unix(d, &[&vol], &["--create", "--size", "32M"]);
    qemu_io_ok(
        srv.uri(),
        false,
        &[
            "write -P 0x3c 0 1M",
            "write -P 0x3d 5000000 12345",
            "write -P 0x3e 33550000 4432",
            "flush",
        ],
    );
    srv.crash();
    assert!(
        info_of(&vol)["writer"].is_string(),
        "a crashed server leaves its claim"
    );

    // Same socket path: the stale socket file is replaced too.
    let srv = Server::unix(d, &[&vol], &[]);
    qemu_io_ok(
        srv.uri(),
        true,
        &[
            "read -P 0x3c 0 1M",
            "read -P 0 1M 3951424",
            "read -P 0x3d 5000000 12345",
            "read -P 0 5012345 1000",
            "read -P 0x3e 33550000 4432",
        ],
    );
    // And it writes.
    qemu_io_ok(
        srv.uri(),
        false,
        &["write -P 0x3f 1M 4096", "read -P 0x3f 1M 4096", "flush"],
    );
    srv.stop_ok();
    check_volume(&vol);
    assert!(
        info_of(&vol)["writer"].is_null(),
        "writer claim not released"
    );
}

/// `text` with each `YYYY-MM-DD hh:mm:ss UTC` replaced by `DATE`.
fn mask_dates(text: &str) -> String {
    const SHAPE: &[u8] = b"0000-00-00 00:00:00 UTC";
    let fits = |at: &[u8]| {
        at.len() >= SHAPE.len()
            && SHAPE.iter().zip(at).all(|(want, got)| match want {
                b'0' => got.is_ascii_digit(),
                other => other == got,
            })
    };
    let bytes = text.as_bytes();
    let mut masked = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if fits(&bytes[at..]) {
            masked.extend_from_slice(b"DATE");
            at += SHAPE.len();
        } else {
            masked.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(masked).expect("only ASCII was replaced")
}

/// What a user sees of a command, with what differs between two volumes
/// by nature masked: the volume's address, dates, and times in
/// milliseconds (digit runs of ten or more, as in automatic snapshot
/// names).
fn seen(vol: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.replace("{v}", vol)).collect();
    let out = hlfs(&args);
    let mask = |text: &str| {
        let text = mask_dates(&text.replace(vol, "VOL"));
        let mut masked = String::new();
        let mut digits = String::new();
        for c in text.chars().chain(std::iter::once('\n')) {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            masked.push_str(if digits.len() >= 10 { "TIME" } else { &digits });
            digits.clear();
            masked.push(c);
        }
        masked
    };
    (out.status.code(), mask(&out.stdout), mask(&out.stderr))
}

/// Every command that changes a volume answers exactly the same, output,
/// errors and exit status, whether a server holds the volume (and carries
/// the command out) or not; the commands that read a volume work on both.
#[test]
fn every_command_answers_the_same_served_or_not() {
    let dir = tempdir();
    let d = dir.path();
    let alone = volume_at(d, "alone.hlfs");
    let served = volume_at(d, "served.hlfs");
    for vol in [&alone, &served] {
        hlfs(&["create", vol, "--size", "32M"]).ok();
    }
    let srv = Server::unix(d, &[&served], &[]);
    for command in [
        &["snapshot", "create", "{v}", "s1"][..],
        &["snapshot", "create", "{v}", "s1"],
        &["snapshot", "create", "{v}", "bad/name"],
        &["snapshot", "create", "{v}", "s2"],
        &["resize", "{v}", "--size", "4K"],
        &["resize", "{v}", "--size", "48M"],
        &["snapshot", "delete", "{v}", "none"],
        &["snapshot", "rollback", "{v}", "none"],
        &["snapshot", "rollback", "{v}", "s1"],
        // A v3 volume: its writer makes it v4 first.
        &["clone", "{v}@s1", "{v}-clone"],
        &["snapshot", "delete", "{v}", "s2"],
        &["snapshot", "list", "{v}"],
    ] {
        let (here, there) = (seen(&alone, command), seen(&served, command));
        let status = here.0;
        assert_eq!(here, there, "hlfs {command:?}: unserved, then served");
        let expected = match command[command.len() - 1] {
            "none" => Some(1),
            "bad/name" | "4K" => Some(2),
            _ if command[1] == "create" && here.2.contains("already exists") => Some(1),
            _ => Some(0),
        };
        assert_eq!(status, expected, "hlfs {command:?}: {here:?}");
    }
    let info = |vol: &str| {
        let out = hlfs(&["info", "--json", vol]).ok();
        let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        [
            "size",
            "block_size",
            "segment_size",
            "allocated_bytes",
            "format_version",
        ]
        .map(|key| info[key].clone())
    };
    assert_eq!(info(&alone), info(&served));
    assert_eq!(info(&served)[4], 4, "cloned, so v4");
    for vol in [&alone, &served] {
        check_volume(vol);
        let stats = gc_stats_of(vol);
        assert_eq!(
            stats["snapshots"].as_array().map(Vec::len),
            Some(2),
            "{stats}"
        );
    }
    // Served throughout: had a command opened the volume itself, it would
    // have been refused as busy.
    assert!(!info_of(&served)["writer"].is_null());
    srv.stop_ok();
}

/// One write of the snapshot model test, as its client saw it.
struct Written {
    first: u64,
    blocks: u64,
    seq: u64,
    started: Instant,
    acked: Instant,
}

/// Block `block` as write `seq` leaves it: seq and block, then a filler.
fn model_block(seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![(seq as u8) ^ (block as u8) ^ 0x5a; 4096];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b
}

/// Snapshots taken every second while two clients write: each, exported
/// afterwards, is a state the model allows. Every block holds a write
/// acknowledged before the snapshot was asked for or a later one started
/// before the command returned, never an older one, a newer one or a torn
/// block; and each write of several blocks is wholly in or wholly out.
#[test]
fn snapshots_taken_every_second_hold_states_the_model_allows() {
    const BS: u64 = 4096;
    const REGION: u64 = 512; // blocks per writer
    const SNAPSHOTS: usize = 5;
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "8M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    let socket = path_str(&d.join("nbd.sock"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut nbd = RawNbd::connect(&socket, "vm.hlfs");
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                let mut log = Vec::new();
                let mut seq = w + 1;
                while !stop.load(Ordering::Relaxed) {
                    let blocks = 1 + rng.next_u64() % 8;
                    let first = w * REGION + rng.next_u64() % (REGION - blocks);
                    let data: Vec<u8> = (first..first + blocks)
                        .flat_map(|b| model_block(seq, b))
                        .collect();
                    let started = Instant::now();
                    assert_eq!(nbd.write(first * BS, &data), 0, "write failed");
                    log.push(Written {
                        first,
                        blocks,
                        seq,
                        started,
                        acked: Instant::now(),
                    });
                    // Odd for one writer, even for the other: unique.
                    seq += 2;
                }
                nbd.disconnect();
                log
            })
        })
        .collect();
    let mut taken = Vec::new();
    for i in 0..SNAPSHOTS {
        std::thread::sleep(Duration::from_secs(1));
        let name = format!("s{i}");
        let asked = Instant::now();
        hlfs(&["snapshot", "create", &vol, &name]).ok();
        taken.push((name, asked, Instant::now()));
    }
    stop.store(true, Ordering::Relaxed);
    let log: Vec<Written> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("a writer failed"))
        .collect();
    assert!(log.len() > 100, "only {} writes", log.len());
    for (name, asked, returned) in &taken {
        let image = d.join(format!("{name}.raw"));
        hlfs(&["export", &format!("{vol}@{name}"), &path_str(&image)]).ok();
        let bytes = std::fs::read(&image).unwrap();
        let seq_at = |b: u64| -> u64 {
            let block = &bytes[(b * BS) as usize..((b + 1) * BS) as usize];
            if block.iter().all(|&x| x == 0) {
                return 0;
            }
            let seq = u64::from_le_bytes(block[..8].try_into().unwrap());
            assert_eq!(block, model_block(seq, b), "{name}: block {b} is torn");
            seq
        };
        let mut in_before = 0;
        for b in 0..2 * REGION {
            let found = seq_at(b);
            let covering = log
                .iter()
                .filter(|w| (w.first..w.first + w.blocks).contains(&b));
            let lowest = covering
                .clone()
                .filter(|w| w.acked < *asked)
                .map(|w| w.seq)
                .max()
                .unwrap_or(0);
            let highest = covering
                .clone()
                .filter(|w| w.started < *returned)
                .map(|w| w.seq)
                .max()
                .unwrap_or(0);
            // Within one writer's region, seqs grow with time.
            assert!(
                found >= lowest && found <= highest,
                "{name}: block {b} holds write {found}, outside {lowest}..={highest}"
            );
            assert!(found == 0 || covering.clone().any(|w| w.seq == found));
            in_before += usize::from(found > 0);
        }
        // Each write wholly in or wholly out: none of its blocks shows an
        // older write while another shows it.
        for w in &log {
            let seqs: Vec<u64> = (w.first..w.first + w.blocks).map(seq_at).collect();
            assert!(
                !(seqs.contains(&w.seq) && seqs.iter().any(|&s| s < w.seq)),
                "{name}: write {} of blocks {}..{} is torn: {seqs:?}",
                w.seq,
                w.first,
                w.first + w.blocks
            );
        }
        assert!(in_before > 0, "{name} holds no write at all");
    }
    srv.stop_ok();
    check_volume(&vol);
}

/// Snapshots, rollback and resize of a volume while it is served, through
/// the CLI as a user types them: the commands go to the server over its
/// control socket. A snapshot holds what was acknowledged before it was
/// asked for and nothing written after it returned, with writes in flight
/// on two other connections; rollback waits until no client is connected;
/// a server killed outright is taken over as before.
#[test]
fn snapshots_rollback_and_resize_of_a_served_volume() {
    require!("fio" => "fio");
    require!("qemu-io" => "qemu-utils");
    require!("nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "64M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    // A local volume's socket is in its journal directory (a remote one's
    // is in the cache directory's journal for it).
    let socket = (!vol.contains("://")).then(|| Path::new(&vol).join("journal/control.sock"));
    if let Some(socket) = &socket {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(socket).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o777,
            0o600,
            "the control socket is the owner's alone"
        );
    }

    // fio writes [0, 32M) on two connections throughout.
    let (mut fio, log) = background_fio(d, srv.uri(), &["--bs=4k", "--iodepth=8"]);
    let at = (40 << 20).to_string();
    qemu_io_ok(srv.uri(), false, &[&format!("write -P 0xa1 {at} 1M")]);
    let out = hlfs(&["snapshot", "create", &vol, "before"]).ok();
    assert!(out.stdout.contains("created snapshot before"), "{out}");
    qemu_io_ok(srv.uri(), false, &[&format!("write -P 0xb2 {at} 1M")]);
    assert_fio_running(&mut fio, &log);
    let refused = hlfs(&["snapshot", "create", &vol, "before"]);
    assert!(refused.stderr.contains("already exists"), "{refused}");

    // The snapshot, exported read-only by another process meanwhile.
    let img = d.join("before.img");
    hlfs(&["export", &format!("{vol}@before"), &path_str(&img)]).ok();
    let bytes = std::fs::read(&img).unwrap();
    let region = &bytes[40 << 20..41 << 20];
    assert!(
        region.iter().all(|&b| b == 0xa1),
        "the snapshot holds the write acknowledged before it, not the one after"
    );
    qemu_io_ok(srv.uri(), true, &[&format!("read -P 0xb2 {at} 1M")]);

    // Rollback under connected clients is refused, naming how many.
    let refused = hlfs(&["snapshot", "rollback", &vol, "before"]);
    assert_eq!(refused.status.code(), Some(1), "{refused}");
    assert!(
        refused.stderr.contains("2 clients are connected"),
        "{refused}"
    );
    assert_fio_running(&mut fio, &log);

    // Growing is seen by clients that connect afterwards.
    hlfs(&["resize", &vol, "--size", "96M"]).ok();
    assert_eq!(export_info(srv.uri())["export-size"], 96 << 20);

    fio.kill();
    // The server notices the clients are gone as their sockets close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = hlfs(&["snapshot", "rollback", &vol, "before"]);
        if !out.stderr.contains("connected to export") || Instant::now() > deadline {
            break out.ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.stdout.contains("rolled"), "{out}");
    qemu_io_ok(srv.uri(), true, &[&format!("read -P 0xa1 {at} 1M")]);
    let list = hlfs(&["snapshot", "list", &vol, "--json"]).ok();
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    hlfs(&["snapshot", "delete", &vol, "before"]).ok();

    // A server that dies leaves its socket; the next command takes over.
    srv.crash();
    assert!(socket.as_ref().is_none_or(|s| s.exists()));
    let out = hlfs(&["snapshot", "create", &vol, "after-crash"]).ok();
    assert!(out.stdout.contains("created snapshot after-crash"), "{out}");
    let srv = Server::unix(d, &[&vol], &[]);
    hlfs(&["snapshot", "delete", &vol, "after-crash"]).ok();
    srv.stop_ok();
    assert!(
        socket.is_none_or(|s| !s.exists()),
        "a clean stop removes the control socket"
    );
    check_volume(&vol);
}

/// The names an NBD LIST gives.
fn listed_exports(uri: &str) -> Vec<String> {
    let out = run("nbdinfo", &["--list", "--json", uri]).ok();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut names: Vec<String> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// A snapshot taken while the volume is served is served too, read-only,
/// on the same socket, without a restart; LIST names it; once deleted it
/// is offered no more.
#[test]
fn snapshots_taken_while_serving_are_exported_at_once() {
    require!("qemu-io" => "qemu-utils");
    require!("nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    let head = srv.uri().to_string();
    let snap = head.replacen("/vm.hlfs?", "/vm.hlfs@live?", 1);
    assert_eq!(listed_exports(&head), ["vm.hlfs"]);

    qemu_io_ok(&head, false, &["write -P 0xc1 0 1M"]);
    hlfs(&["snapshot", "create", &vol, "live"]).ok();
    qemu_io_ok(&head, false, &["write -P 0xc2 0 1M"]);
    assert_eq!(listed_exports(&head), ["vm.hlfs", "vm.hlfs@live"]);
    let info = export_info(&snap);
    assert_eq!(info["is_read_only"], true, "{info}");
    qemu_io_ok(&snap, true, &["read -P 0xc1 0 1M", "read -P 0 1M 15M"]);
    let w = qemu_io(&snap, false, &["write -P 0x99 0 4096"]);
    assert!(
        !w.status.success() || !w.text().contains("wrote"),
        "a snapshot export took a write: {w}"
    );
    qemu_io_ok(&head, true, &["read -P 0xc2 0 1M"]);

    hlfs(&["snapshot", "delete", &vol, "live"]).ok();
    assert_eq!(listed_exports(&head), ["vm.hlfs"]);
    let gone = run("nbdinfo", &["--json", &snap]);
    assert!(
        !gone.status.success(),
        "a deleted snapshot is still served: {gone}"
    );
    // Taken again under the same name: the new one is served.
    hlfs(&["snapshot", "create", &vol, "live"]).ok();
    qemu_io_ok(&snap, true, &["read -P 0xc2 0 1M"]);
    hlfs(&["snapshot", "delete", &vol, "live"]).ok();
    qemu_io_ok(&head, false, &["write -P 0xc3 0 1M"]);
    hlfs(&["snapshot", "create", &vol, "live"]).ok();
    qemu_io_ok(&snap, true, &["read -P 0xc3 0 1M"]);
    srv.stop_ok();
    check_volume(&vol);
}

/// `GET path` over HTTP/1.1 on `addr`: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name{labels}` in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// `hlfs serve --metrics PORT`: Prometheus text on loopback that counts
/// what clients did, and that promtool accepts.
#[test]
fn prometheus_metrics_of_a_served_volume() {
    require!("qemu-io" => "qemu-utils");
    require!("promtool" => "prometheus");
    let dir = tempdir();
    let d = dir.path();
    let (_, srv, addr) = served_with_metrics(d);
    assert!(
        addr.starts_with("127.0.0.1:"),
        "a port alone is loopback: {addr}"
    );

    qemu_io_ok(
        srv.uri(),
        false,
        &["write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M"],
    );
    let (status, text) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let op =
        |name: &str, op: &str| sample(&text, &format!("{name}{{export=\"vm.hlfs\",op=\"{op}\"}}"));
    assert!(op("hlfs_nbd_requests_total", "write") >= 1.0);
    assert!(op("hlfs_nbd_request_bytes_total", "write") >= (1 << 20) as f64);
    assert!(op("hlfs_nbd_request_bytes_total", "read") >= (1 << 20) as f64);
    assert!(op("hlfs_nbd_requests_total", "flush") >= 1.0);
    assert_eq!(op("hlfs_nbd_request_errors_total", "write"), 0.0);
    assert!(op("hlfs_nbd_request_duration_seconds_count", "write") >= 1.0);
    assert_eq!(
        sample(&text, "hlfs_volume_size_bytes{export=\"vm.hlfs\"}"),
        (16 << 20) as f64
    );
    assert!(sample(&text, "hlfs_volume_allocated_bytes{export=\"vm.hlfs\"}") >= (1 << 20) as f64);
    assert!(
        text.contains("hlfs_nbd_connections{export=\"vm.hlfs\"}"),
        "{text}"
    );
    assert!(
        text.contains("hlfs_store_requests_total{export=\"vm.hlfs\",kind=\"put\"}"),
        "{text}"
    );
    // What the engine did for that one client: 1 MiB written, appended to
    // the log with its record headers, and made durable by the flush.
    let volume = |name: &str| sample(&text, &format!("{name}{{export=\"vm.hlfs\"}}"));
    assert_eq!(volume("hlfs_volume_written_bytes_total"), MIB as f64);
    let appended = volume("hlfs_log_appended_bytes_total");
    assert!(
        appended > MIB as f64 && appended < (MIB + (64 << 10)) as f64,
        "{appended}"
    );
    assert!(volume("hlfs_flushes_total") >= 1.0);
    let syncs = volume("hlfs_journal_syncs_total");
    assert!(
        syncs >= 1.0 && syncs <= volume("hlfs_flushes_total"),
        "{text}"
    );
    assert!(volume("hlfs_journal_sync_seconds_total") > 0.0);
    // One flush is not synced load: nothing is written ahead.
    assert_eq!(volume("hlfs_journal_prewritten_bytes_total"), 0.0);
    assert!(volume("hlfs_upload_backlog_segments") <= volume("hlfs_upload_backlog_limit_segments"));
    assert!(text.contains("hlfs_map_page_hits_total{export=\"vm.hlfs\"}"));
    assert_eq!(volume("hlfs_store_retries_total"), 0.0, "{text}");
    assert!(text.contains("hlfs_store_errors_total{export=\"vm.hlfs\",kind=\"unavailable\"} 0"));
    // A read cache exists only for volumes on a remote store.
    assert_eq!(
        text.contains("hlfs_read_cache_hits_total{export=\"vm.hlfs\"}"),
        std::env::var_os("HLFS_TEST_REMOTE_BASE").is_some(),
        "{text}"
    );

    let checked = d.join("metrics.txt");
    std::fs::write(&checked, &text).unwrap();
    let out = run(
        "sh",
        &[
            "-c",
            &format!("promtool check metrics < '{}'", path_str(&checked)),
        ],
    );
    assert!(out.status.success(), "promtool: {out}");
    let (status, _) = http_get(&addr, "/elsewhere");
    assert!(status.contains("404"), "{status}");
    srv.stop_ok();
}

/// Hundreds of flushes a second put the journal in synced mode: its
/// window is written ahead (the metric counts it), and every write reads
/// back after the server stops, with no damage (no zeros in a segment).
#[test]
fn synced_writes_go_through_the_journals_window() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let (vol, srv, addr) = served_with_metrics(d);
    const WRITES: usize = 600;
    let pattern = |i: usize| (i % 255 + 1) as u8;
    let cmds: Vec<String> = (0..WRITES)
        .flat_map(|i| {
            [
                format!("write -P {} {} 4k", pattern(i), i * 4096),
                "flush".to_string(),
            ]
        })
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(srv.uri(), false, &cmds);
    let (_, text) = http_get(&addr, "/metrics");
    let volume = |name: &str| sample(&text, &format!("{name}{{export=\"vm.hlfs\"}}"));
    assert!(volume("hlfs_flushes_total") >= WRITES as f64, "{text}");
    assert!(
        volume("hlfs_journal_prewritten_bytes_total") >= (1 << 20) as f64,
        "no window under {WRITES} flushes: {text}"
    );
    srv.stop_ok();
    check_volume(&vol);
    let image = d.join("image.raw");
    hlfs(&["export", &vol, &path_str(&image)]).ok();
    let bytes = std::fs::read(&image).unwrap();
    for i in 0..WRITES {
        let block = &bytes[i * 4096..(i + 1) * 4096];
        assert!(block.iter().all(|&b| b == pattern(i)), "block {i}");
    }
    assert!(bytes[WRITES * 4096..].iter().all(|&b| b == 0));
}

/// A new 16 MiB volume `vm.hlfs` in `dir`, served with metrics: the
/// volume, its server, and the metrics address.
fn served_with_metrics(dir: &Path) -> (String, Server, String) {
    let vol = volume_at(dir, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let srv = Server::unix(dir, &[&vol], &["--metrics", "0"]);
    let addr = metrics_address(&srv.log());
    (vol, srv, addr)
}

/// The metrics address `hlfs serve --metrics` printed in its log.
fn metrics_address(log: &str) -> String {
    log.split("http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .unwrap_or_else(|| panic!("no metrics address in {log}"))
        .to_string()
}

/// Scraped during a fio run, the request counters have moved; after it,
/// they have moved by exactly what fio reports having done.
#[test]
fn metrics_move_by_what_fio_did() {
    require!("fio" => "fio");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "64M"]).ok();
    let srv = Server::unix(d, &[&vol], &["--metrics", "0"]);
    let addr = metrics_address(&srv.log());
    let scrape = || {
        let (status, text) = http_get(&addr, "/metrics");
        assert!(status.contains("200"), "{status}");
        text
    };
    let writes = |text: &str, name: &str| {
        let series = format!("{name}{{export=\"vm.hlfs\",op=\"write\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = scrape();
    let (mut fio, log) = spawn_logged(
        d,
        "fio",
        &fio_args(
            srv.uri(),
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--numjobs=2",
                "--size=32M",
                "--time_based",
                "--runtime=3",
                "--output-format=json",
            ],
        ),
    );
    wait_for_fio(&log, 2);
    std::thread::sleep(Duration::from_millis(1000));
    let during = scrape();
    let status = fio.wait_timeout(CLIENT_TIMEOUT).expect("fio ran too long");
    assert!(
        status.success(),
        "fio: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let after = scrape();
    // The log has fio's notes (the connections) before the JSON.
    let text = std::fs::read_to_string(&log).unwrap();
    let fio_said: serde_json::Value = text
        .find("\n{")
        .map(|at| &text[at + 1..])
        .or(text.starts_with('{').then_some(text.as_str()))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_else(|| panic!("no JSON in fio's output: {text}"));
    let job = &fio_said["jobs"][0]["write"];
    let (ios, bytes) = (
        job["total_ios"].as_f64().unwrap(),
        job["io_bytes"].as_f64().unwrap(),
    );
    assert!(ios > 0.0, "{fio_said}");
    let moved = |text: &str, name: &str| writes(text, name) - writes(&before, name);
    assert!(
        moved(&during, "hlfs_nbd_requests_total") > 0.0
            && moved(&during, "hlfs_nbd_requests_total") < ios,
        "mid-run: {} of {ios}",
        moved(&during, "hlfs_nbd_requests_total")
    );
    assert_eq!(moved(&after, "hlfs_nbd_requests_total"), ios);
    assert_eq!(moved(&after, "hlfs_nbd_request_bytes_total"), bytes);
    assert_eq!(
        moved(&after, "hlfs_nbd_request_duration_seconds_count"),
        ios
    );
    assert_eq!(
        sample(
            &after,
            "hlfs_volume_written_bytes_total{export=\"vm.hlfs\"}"
        ),
        bytes
    );
    srv.stop_ok();
}

/// `hlfs info` of a served volume adds what its server sees now: the
/// serving pid, connected clients, and the counts since it opened the
/// volume; of a volume nobody serves, `live` is null.
#[test]
fn info_of_a_served_volume_gives_its_live_figures() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    qemu_io_ok(srv.uri(), false, &["write -P 0x3c 0 1M", "flush"]);
    // A client that stays connected while info asks.
    let (_held, held_log) =
        spawn_logged(d, "qemu-io", &["-f", "raw", "-c", "sleep 20000", srv.uri()]);
    let deadline = Instant::now() + START_TIMEOUT;
    let live = loop {
        let out = hlfs(&["info", "--json", &vol]).ok();
        let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        if info["live"]["connections"] == 1 {
            break info["live"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the held client never showed: {info}\n{}",
            std::fs::read_to_string(&held_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(live["pid"], srv.proc.pid(), "{live}");
    assert_eq!(live["export"], "vm.hlfs", "{live}");
    assert_eq!(live["figures"]["written_bytes"], MIB, "{live}");
    assert!(live["figures"]["flushes"].as_u64() >= Some(1), "{live}");
    assert!(live["flushes_per_sync"].as_f64() >= Some(1.0), "{live}");
    let amplification = live["write_amplification"].as_f64().unwrap();
    assert!((1.0..1.1).contains(&amplification), "{live}");
    let text = hlfs(&["info", &vol]).ok().stdout;
    assert!(
        text.contains(&format!(
            "served by:      pid {} as export vm.hlfs, 1 client connected",
            srv.proc.pid()
        )),
        "{text}"
    );
    srv.stop_ok();
    let out = hlfs(&["info", "--json", &vol]).ok();
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(info["live"].is_null(), "{info}");
    assert!(!hlfs(&["info", &vol]).ok().stdout.contains("served by"));
}

/// The URIs the server prints must work for export names that need
/// percent-encoding in a URI: "my vm.hlfs" printed as is is no URI (libnbd
/// cannot parse it), and "a%20b" printed as is names the export "a b".
#[test]
fn printed_uris_are_percent_encoded() {
    require!("nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let spaced = volume_at(d, "my vm.hlfs");
    let percent = path_str(&d.join("a%20b"));
    let srv = Server::unix(d, &[&spaced, &percent], &["--create", "--size", "8M"]);
    for (uri, name) in srv.uris.iter().zip(["my vm.hlfs", "a%20b"]) {
        let info = export_info(uri);
        assert_eq!(info["export-name"], name, "{uri}: {info}");
    }
    srv.stop_ok();
}

/// SIGTERM as soon as the server has printed its URIs (and so accepts
/// clients) must still stop it cleanly: flushed, sealed, its writer claim
/// released. The signal handlers are installed before anything is bound,
/// so there is no window in which SIGTERM kills it outright.
#[test]
fn sigterm_right_after_start_is_clean() {
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "8M"]).ok();
    for i in 0..40 {
        let srv = Server::unix(d, &[&vol], &[]);
        let log = srv.log.clone();
        let status = srv.stop();
        assert!(
            status.success(),
            "start {i}: server exited with {status} on an early SIGTERM\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    assert!(info_of(&vol)["writer"].is_null());
}

/// `hlfs gc --stats --json` of a served volume: consistent figures of its
/// last checkpoint, newer segments counted whole.
fn gc_stats_of(vol: &str) -> serde_json::Value {
    let out = hlfs(&["gc", vol, "--stats", "--json"]).ok();
    let stats: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    let figure = |s: &serde_json::Value, key: &str| s[key].as_u64().expect(key);
    let (mut size, mut live) = (0, 0);
    for s in stats["segments"].as_array().expect("segments") {
        assert!(figure(s, "live_bytes") <= figure(s, "size"), "{s}");
        if s["recent"] == true {
            assert_eq!(figure(s, "live_bytes"), figure(s, "size"), "{s}");
        }
        size += figure(s, "size");
        live += figure(s, "live_bytes");
    }
    assert_eq!(size, figure(&stats, "segment_bytes"), "{stats}");
    assert_eq!(live, figure(&stats, "live_bytes"), "{stats}");
    stats
}

/// `hlfs info`, `hlfs check` and `hlfs gc --stats` need no writer claim
/// (README), so they must work on a volume a server is writing.
#[test]
fn info_check_and_gc_stats_while_serving() {
    require!("fio" => "fio");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    // Small segments, so the writer seals journals while info and check read.
    hlfs(&["create", &vol, "--size", "64M", "--segment-size", "256K"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    // Enough to seal segments now and then, not so much that each check
    // has gigabytes of segments to read.
    // On a remote store each check reads every segment with its own
    // requests: fewer.
    let (rate, rounds) = match std::env::var_os("HLFS_TEST_REMOTE_BASE") {
        Some(_) => ("--rate_iops=200", 3),
        None => ("--rate_iops=1000", 10),
    };
    let (mut fio, _) = background_fio(d, srv.uri(), &["--bs=4k", "--iodepth=16", rate]);
    for _ in 0..rounds {
        let info = info_of(&vol);
        assert!(info["writer"].is_string(), "{info}");
        check_volume(&vol);
        gc_stats_of(&vol);
    }
    fio.kill();
    srv.stop_ok();
    check_volume(&vol);
    let stats = gc_stats_of(&vol);
    // Closed: exact, and random 4 KiB overwrites left space to reclaim.
    assert!(
        stats["segments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["recent"] == false),
        "{stats}"
    );
    assert!(stats["reclaimable_bytes"].as_u64().unwrap() > 0, "{stats}");
}

/// Writes 0x11 over the first 32 MiB, then 0x22 over the first half of
/// each of those MiB: 16 MiB of garbage, in segments that stay half live.
fn half_overwrite(uri: &str) {
    let halves: Vec<String> = (0..32)
        .map(|i| format!("write -P 0x22 {i}M 512k"))
        .collect();
    let mut writes = vec!["write -P 0x11 0 32M"];
    writes.extend(halves.iter().map(String::as_str));
    writes.push("flush");
    qemu_io_ok(uri, false, &writes);
}

/// A 64 MiB volume `vm.hlfs` in `d` with 1 MiB segments, so that a few
/// MiB of overwrites give cleaning many segments to work on.
fn cleanable_volume(d: &Path) -> String {
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "64M", "--segment-size", "1M"]).ok();
    vol
}

/// What `half_overwrite` wrote reads back.
fn assert_half_overwritten(uri: &str) {
    let reads: Vec<String> = (0..32)
        .flat_map(|i| {
            [
                format!("read -P 0x22 {i}M 512k"),
                format!("read -P 0x11 {}k 512k", i * 1024 + 512),
            ]
        })
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io_ok(uri, true, &reads);
}

/// `hlfs gc` of a served volume: its server cleans while a client writes
/// elsewhere on the disk, and what was there before reads the same.
#[test]
fn gc_of_a_served_volume_while_its_client_writes() {
    require!("fio" => "fio", "qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = cleanable_volume(d);
    let srv = Server::unix(d, &[&vol], &[]);
    half_overwrite(srv.uri());
    let (mut fio, log) = background_fio(d, srv.uri(), &["--bs=4k", "--iodepth=8", "--offset=32M"]);
    let started = Instant::now();
    let out = hlfs(&["gc", &vol, "--grace", "0", "--target", "1.1", "--json"]).ok();
    // A served volume's grace is 5 s at least, whatever is asked.
    assert!(started.elapsed() >= Duration::from_secs(5), "{out}");
    assert_fio_running(&mut fio, &log);
    let report: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    let figure = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {report}"))
    };
    assert!(figure("deleted_segments") >= 4, "{report}");
    assert!(figure("freed_bytes") >= 16 << 20, "{report}");
    assert!(figure("copied_bytes") >= 8 << 20, "{report}");
    fio.kill();
    assert_half_overwritten(srv.uri());
    srv.stop_ok();
    check_volume(&vol);
}

/// Another process serves a snapshot and its client reads it over and
/// over while the volume's server cleans, moving what the snapshot holds
/// and deleting the segments it was in: every read gives the snapshot's
/// bytes, during the run and after its deletes (the export reopens at the
/// newer manifest).
#[test]
fn a_snapshot_served_by_another_process_reads_the_same_through_cleaning() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = cleanable_volume(d);
    let srv = Server::unix(d, &[&vol], &[]);
    // Half of each MiB overwritten before the snapshot: its segments are
    // half dead, and the other half only s1 will hold.
    let mut writes = vec!["write -P 0x11 0 16M".to_string()];
    writes.extend((0..16).map(|i| format!("write -P 0x12 {i}M 512k")));
    writes.push("flush".to_string());
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io_ok(srv.uri(), false, &writes);
    hlfs(&["snapshot", "create", &vol, "s1"]).ok();
    let mut writes = vec!["write -P 0x22 0 16M".to_string()];
    for round in 0..3 {
        writes.push(format!("write -P 0x3{round} 16M 16M"));
    }
    writes.push("flush".to_string());
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io_ok(srv.uri(), false, &writes);
    let s1_reads: Vec<String> = (0..16)
        .flat_map(|i| {
            [
                format!("read -P 0x12 {i}M 512k"),
                format!("read -P 0x11 {}k 512k", i * 1024 + 512),
            ]
        })
        .collect();
    let s1_reads: Vec<&str> = s1_reads.iter().map(String::as_str).collect();

    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    let reader_args = ["--metrics", "0"];
    let reader_srv = Server::unix(&other, &[&format!("{vol}@s1")], &reader_args);
    let uri = reader_srv.uri().to_string();
    let done = Arc::new(AtomicBool::new(false));
    // During the run, the client reads s1's first 2 MiB over and over;
    // the rest, only after the deletes, from segments the export never
    // opened before (an open segment file would still read once deleted).
    let reader = {
        let (uri, done) = (uri.clone(), done.clone());
        let reads: Vec<String> = s1_reads[..4].iter().map(|r| r.to_string()).collect();
        std::thread::spawn(move || {
            let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
            let mut rounds = 0;
            while !done.load(Ordering::SeqCst) || rounds == 0 {
                qemu_io_ok(&uri, true, &reads);
                rounds += 1;
            }
            rounds
        })
    };
    let out = hlfs(&["gc", &vol, "--target", "1.0", "--grace", "0", "--json"]).ok();
    done.store(true, Ordering::SeqCst);
    let rounds = reader.join().expect("every read of s1 gave its bytes");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        report["deleted_segments"].as_u64().unwrap_or(0) >= 8,
        "{report}"
    );
    // s1's half that it alone holds was copied.
    assert!(
        report["copied_bytes"].as_u64().unwrap_or(0) >= 8 << 20,
        "{report}"
    );
    assert!(rounds >= 2, "{rounds} rounds of reads during the run");
    // After the deletes, all of it, from the same open view (which
    // reopens at the newer manifest) and from a new one.
    qemu_io_ok(&uri, true, &s1_reads);
    let (status, text) = http_get(&metrics_address(&reader_srv.log()), "/metrics");
    assert!(status.contains("200"), "{status}");
    let reopens: f64 = text
        .lines()
        .filter(|l| l.starts_with("hlfs_view_reopens_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(reopens >= 1.0, "the export never reopened:\n{text}");
    reader_srv.stop_ok();
    let reader_srv = Server::unix(&other, &[&format!("{vol}@s1")], &[]);
    qemu_io_ok(reader_srv.uri(), true, &s1_reads);
    reader_srv.stop_ok();
    qemu_io_ok(
        srv.uri(),
        true,
        &["read -P 0x22 0 16M", "read -P 0x32 16M 16M"],
    );
    srv.stop_ok();
    check_volume(&vol);
}

/// A served volume cleans by itself once its garbage passes the space
/// target, and its client reads the same.
#[test]
fn a_served_volume_cleans_by_itself() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = cleanable_volume(d);
    let srv = Server::unix(
        d,
        &[&vol],
        &[
            "--gc-target",
            "1.2",
            "--gc-every",
            "1",
            "--gc-grace",
            "0",
            "--metrics",
            "0",
        ],
    );
    // Stored ÷ live about 1.5.
    half_overwrite(srv.uri());
    let deadline = Instant::now() + Duration::from_secs(60);
    let live = loop {
        let info = info_of(&vol);
        let live = info["live"]["figures"].clone();
        if live["gc_deleted_segments"].as_u64().unwrap_or(0) > 0 {
            break live;
        }
        assert!(Instant::now() < deadline, "no cleaning after 60 s: {info}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(live["gc_runs"].as_u64().unwrap() >= 1, "{live}");
    // The same figures, as metrics.
    let (status, text) = http_get(&metrics_address(&srv.log()), "/metrics");
    assert!(status.contains("200"), "{status}");
    let series = |name: &str| sample(&text, &format!("{name}{{export=\"vm.hlfs\"}}"));
    assert!(series("hlfs_gc_runs_total") >= 1.0, "{text}");
    assert!(series("hlfs_gc_deleted_segments_total") >= 1.0, "{text}");
    assert!(
        series("hlfs_gc_freed_bytes_total") >= (8 << 20) as f64,
        "{text}"
    );
    assert!(
        live["gc_freed_bytes"].as_u64().unwrap() >= 8 << 20,
        "{live}"
    );
    assert_half_overwritten(srv.uri());
    srv.stop_ok();
    let stats = gc_stats_of(&vol);
    assert!(stats["space_ratio"].as_f64().unwrap() <= 1.2, "{stats}");
    check_volume(&vol);
}

/// `hlfs diff` of a served volume, to its head: its server checkpoints,
/// and the diff lists exactly what the client changed since the snapshot.
#[test]
fn diff_of_a_served_head_lists_what_the_client_changed() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    qemu_io_ok(srv.uri(), false, &["write -P 0x11 0 4M", "flush"]);
    hlfs(&["snapshot", "create", &vol, "s1"]).ok();
    qemu_io_ok(
        srv.uri(),
        false,
        &[
            "write -P 0x22 1M 64k",
            // -u lets the zeroes unmap; without it they stay allocated, as
            // data that reads as zeros.
            "write -z -u 2M 64k",
            "write -P 0x33 8M 4k",
        ],
    );
    let out = hlfs(&["diff", &vol, "--from", "s1", "--json"]).ok();
    let diff: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    assert_eq!(
        diff["extents"],
        serde_json::json!([
            {"offset": 1 << 20, "length": 64 << 10, "zero": false},
            {"offset": 2 << 20, "length": 64 << 10, "zero": true},
            {"offset": 8 << 20, "length": 4096, "zero": false},
        ]),
        "{diff}"
    );
    assert_eq!(diff["to"], serde_json::Value::Null);
    srv.stop_ok();
}

/// `qemu:dirty-bitmap:SNAP` answers block status with what changed since
/// snapshot SNAP: on the head, up to the moment of the query; on a
/// snapshot's export, up to that snapshot.
#[test]
fn dirty_bitmaps_show_what_changed_since_a_snapshot() {
    require!("qemu-io" => "qemu-utils", "nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    qemu_io_ok(srv.uri(), false, &["write -P 0x11 0 4M", "flush"]);
    hlfs(&["snapshot", "create", &vol, "s1"]).ok();
    // Changed since s1: nothing yet.
    let dirty = |uri: &str| -> Vec<(u64, u64)> {
        nbd_map_of(uri, "qemu:dirty-bitmap:s1")
            .into_iter()
            .filter(|x| x.2 != 0)
            .map(|x| (x.0, x.1))
            .collect()
    };
    assert_eq!(dirty(srv.uri()), []);
    qemu_io_ok(
        srv.uri(),
        false,
        &[
            "write -P 0x22 1M 64k",
            "write -z -u 2M 64k",
            "write -P 0x33 8M 4k",
        ],
    );
    // No flush: what was acknowledged is what changed.
    let written = [(1 << 20, 64 << 10), (2 << 20, 64 << 10), (8 << 20, 4096)];
    assert_eq!(dirty(srv.uri()), written);
    let map = nbd_map_of(srv.uri(), "qemu:dirty-bitmap:s1");
    assert_eq!(map.last().map(|x| x.0 + x.1), Some(16 * MIB), "{map:?}");
    // A name no snapshot has is not offered.
    let out = run("nbdinfo", &["--map=qemu:dirty-bitmap:nope", srv.uri()]);
    assert!(!out.status.success(), "{out}");
    hlfs(&["snapshot", "create", &vol, "s2"]).ok();
    qemu_io_ok(srv.uri(), false, &["write -P 0x44 12M 4k"]);
    assert_eq!(dirty(srv.uri()).len(), 4);
    srv.stop_ok();

    let s2 = format!("{vol}@s2");
    let srv = Server::unix(d, &[&vol, &s2], &[]);
    assert_eq!(dirty(srv.uri_of("vm.hlfs@s2")), written);
    srv.stop_ok();
}

/// `hlfs import-diff` into a served volume goes through its server: refused
/// while a client is connected, then applied, and what clients read next
/// is the stream's snapshot, exported at once as `vm.hlfs@s2`.
#[test]
fn import_diff_into_a_served_volume_goes_through_its_server() {
    require!("qemu-img" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let (src, dst) = (volume_at(d, "src.hlfs"), volume_at(d, "vm.hlfs"));
    let file = |name: &str| path_str(&d.join(name));
    random_file(&d.join("a.img"), 2 * MIB, 1);
    random_file(&d.join("b.img"), MIB, 2);
    hlfs(&["create", &src, "--size", "4M"]).ok();
    hlfs(&["import", &file("a.img"), &src]).ok();
    hlfs(&["snapshot", "create", &src, "s1"]).ok();
    hlfs(&["import", &file("b.img"), &src]).ok();
    hlfs(&["snapshot", "create", &src, "s2"]).ok();
    let (full, inc) = (file("full.diff"), file("inc.diff"));
    hlfs(&["export-diff", &format!("{src}@s1"), &full]).ok();
    hlfs(&["export-diff", &format!("{src}@s2"), &inc, "--from", "s1"]).ok();
    hlfs(&["export", &format!("{src}@s2"), &file("s2.img")]).ok();
    hlfs(&["create", &dst, "--size", "4M"]).ok();
    hlfs(&["import-diff", &full, &dst]).ok();

    let srv = Server::unix(d, &[&dst], &[]);
    let client = RawNbd::connect(&file("nbd.sock"), "vm.hlfs");
    let out = hlfs(&["import-diff", &inc, &dst]);
    assert!(
        !out.status.success() && out.text().contains("1 client is connected"),
        "{out}"
    );
    // From stdin, refused before the stream is read.
    let stream = std::fs::File::open(&inc).unwrap();
    let out = run_cmd_fed(
        Command::new(HLFS).args(["import-diff", "-", &dst]),
        stream.into(),
        CLIENT_TIMEOUT,
    );
    assert!(
        !out.status.success() && out.text().contains("nothing was read from stdin"),
        "{out}"
    );
    client.disconnect();
    // The server notices the client has gone a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = hlfs(&["import-diff", &inc, &dst, "--json"]);
        if out.status.success() || !out.text().contains("connected") || Instant::now() > deadline {
            break out.ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["to"], "s2", "{report}");
    // The next increment from stdin: the command copies it to a file the
    // server reads.
    hlfs(&["import", &file("a.img"), &src]).ok();
    hlfs(&["snapshot", "create", &src, "s3"]).ok();
    hlfs(&[
        "export-diff",
        &format!("{src}@s3"),
        &file("inc3.diff"),
        "--from",
        "s2",
    ])
    .ok();
    hlfs(&["export", &format!("{src}@s3"), &file("s3.img")]).ok();
    let stream = std::fs::File::open(file("inc3.diff")).unwrap();
    let out = run_cmd_fed(
        Command::new(HLFS).args(["import-diff", "-", &dst, "--json"]),
        stream.into(),
        CLIENT_TIMEOUT,
    )
    .ok();
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["to"], "s3", "{report}");
    let read = file("read.img");
    for (uri, image) in [
        (srv.uri().to_string(), "s3.img"),
        (srv.uri().replace("vm.hlfs?", "vm.hlfs@s2?"), "s2.img"),
        (srv.uri().replace("vm.hlfs?", "vm.hlfs@s3?"), "s3.img"),
    ] {
        run(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &uri, &read],
        )
        .ok();
        assert_eq!(
            sha256(Path::new(&read)),
            sha256(Path::new(&file(image))),
            "{uri}"
        );
    }
    srv.stop_ok();
    check_volume(&dst);
}

/// Hostile byte streams sent to the live server over its socket: each such
/// connection is closed, and the server, its volume and other clients carry
/// on.
#[test]
fn hostile_streams_against_the_live_server() {
    require!("qemu-io" => "qemu-utils", "nbdinfo" => "libnbd-bin");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    let srv = Server::unix(d, &[&vol], &["--create", "--size", "64M"]);
    qemu_io_ok(srv.uri(), false, &["write -P 0x5c 0 64k"]);
    let socket = d.join("nbd.sock");
    let mut opt_go_huge = 3u32.to_be_bytes().to_vec();
    opt_go_huge.extend_from_slice(b"IHAVEOPT");
    opt_go_huge.extend_from_slice(&7u32.to_be_bytes());
    opt_go_huge.extend_from_slice(&u32::MAX.to_be_bytes());
    let streams: Vec<Vec<u8>> = vec![
        Vec::new(),                                    // connects and leaves
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // wrong protocol
        vec![0xff; 64],                                // bad client flags
        opt_go_huge,                                   // absurd option length
        (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ];
    for bytes in &streams {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // The server must hang up rather than wait forever.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let info = export_info(srv.uri());
    assert_eq!(info["export-size"], 64u64 << 20, "{info}");
    qemu_io_ok(
        srv.uri(),
        false,
        &["read -P 0x5c 0 64k", "write -P 0x5d 64k 4k"],
    );
    srv.stop_ok();
    check_volume(&vol);
}

/// CAN_MULTI_CONN: a FLUSH on one connection covers the writes completed on
/// another. The server is killed right after the flush, with no chance to
/// seal or close, and the data must be there after a restart. (A killed
/// process keeps its page cache; loss of unsynced data at a power cut is
/// what the engine's crash tests check.)
#[test]
fn flush_on_one_connection_covers_writes_of_another() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    let srv = Server::unix(d, &[&vol], &["--create", "--size", "16M"]);
    let socket = path_str(&d.join("nbd.sock"));
    let mut writer = RawNbd::connect(&socket, "vm.hlfs");
    let mut flusher = RawNbd::connect(&socket, "vm.hlfs");
    let data: Vec<u8> = (0..65_536u32).map(|i| (i * 31 % 251) as u8 | 1).collect();
    assert_eq!(writer.write(12_345, &data), 0);
    flusher.request(3, 0xf1, 0, 0, &[]);
    assert_eq!(flusher.reply(0xf1), 0, "FLUSH failed");
    srv.crash();
    drop((writer, flusher));

    let srv = Server::unix(d, &[&vol], &[]);
    let mut reader = RawNbd::connect(&socket, "vm.hlfs");
    assert!(
        reader.read(12_345, data.len() as u32) == data,
        "a flushed write was lost"
    );
    reader.disconnect();
    srv.stop_ok();
    check_volume(&vol);
}

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// A client that pipelines requests (1 MiB READs, or 1 MiB WRITEs) as fast
/// as the server takes them and never reads a reply: it returns once the
/// server has stopped taking more (or it has sent `most`).
fn stop_reading_after_sending(socket: &str, write: bool, most: u64) -> (RawNbd, u64) {
    let mut c = RawNbd::connect(socket, "vm.hlfs");
    c.sock
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let data = vec![0x6b; MIB as usize];
    let mut sent = 0;
    while sent < most {
        let (kind, payload): (u16, &[u8]) = if write { (1, &data) } else { (0, &[]) };
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&sent.to_be_bytes());
        req.extend_from_slice(&((sent % 60) * MIB).to_be_bytes());
        req.extend_from_slice(&(MIB as u32).to_be_bytes());
        req.extend_from_slice(payload);
        if c.sock.write_all(&req).is_err() {
            break;
        }
        sent += 1;
    }
    (c, sent)
}

/// Clients that send requests and never read the replies cannot make the
/// server grow without bound: each connection holds at most its budget of
/// bytes in flight (then the server stops reading it), all of them at most
/// the shared budget beyond a small reserve each; other clients are served
/// meanwhile; the memory comes back when they go.
#[test]
fn clients_that_stop_reading_hold_bounded_memory() {
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    // Small segments: what the engine holds while uploading one to a remote
    // store (a whole segment) is not what is measured here.
    hlfs(&["create", &vol, "--size", "64M", "--segment-size", "4M"]).ok();
    let srv = Server::unix(d, &[&vol], &["--in-flight-total", "64M"]);
    let socket = path_str(&d.join("nbd.sock"));
    let pid = srv.proc.child.id() as i32;
    // Warm up: every 1 MiB block written, then read, once. What a server
    // settles at after writing is the baseline: its uploads to a remote
    // store included (librados copies what it sends, in memory the
    // allocator keeps for the next upload).
    let mut warm = RawNbd::connect(&socket, "vm.hlfs");
    let block = vec![0x3Cu8; MIB as usize];
    for i in 0..60 {
        assert_eq!(warm.write(i * MIB, &block), 0, "warm-up write");
    }
    for i in 0..60 {
        warm.read(i * MIB, MIB as u32);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let idle = rss(pid);
    let above_idle = || rss(pid).saturating_sub(idle) >> 20;

    // One client pipelining thousands of 1 MiB reads (a few MB on the
    // wire): the server reads a connection's budget (64 MiB) worth and
    // stops.
    let (reader, sent) = stop_reading_after_sending(&socket, false, 20_000);
    assert!(sent < 20_000, "the server stopped reading requests");
    std::thread::sleep(Duration::from_millis(500));
    let one = above_idle();
    // At most 64 MiB in flight, and buffers.
    assert!(one < 80, "{one} MiB above idle for one stalled client");
    // Another client is served meanwhile.
    let started = Instant::now();
    assert_eq!(warm.read(0, 512).len(), 512);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Writes whose replies are not read: the same bound.
    let (writer, _) = stop_reading_after_sending(&socket, true, 2_000);
    std::thread::sleep(Duration::from_millis(500));
    let two = above_idle();
    // The shared budget holds: 64 MiB, and 1 MiB and buffers each.
    assert!(two < 84, "{two} MiB above idle for two stalled clients");

    // Six more at once: all together stay within the shared 64 MiB beyond
    // 1 MiB each, and their socket buffers.
    let more: Vec<_> = (0..6)
        .map(|_| stop_reading_after_sending(&socket, false, 20_000).0)
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let eight = above_idle();
    assert!(
        eight < 96,
        "{eight} MiB above idle for eight stalled clients"
    );
    let started = Instant::now();
    assert_eq!(warm.read(4096, 512).len(), 512);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a small read of another client waited {:?}",
        started.elapsed()
    );

    // They leave: the server lets go of what they held.
    drop((reader, writer, more));
    let deadline = Instant::now() + Duration::from_secs(10);
    while above_idle() > 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "above idle: one stalled client {one} MiB, two {two} MiB, eight {eight} MiB, after they left {} MiB",
        above_idle()
    );
    assert!(above_idle() <= 16, "{} MiB still held", above_idle());
    warm.disconnect();
    srv.stop_ok();
    check_volume(&vol);
}

// ---------------------------------------------------------------------------
// Running as a service

/// `hlfs serve ARGS` started the way systemd starts a socket-activated
/// `Type=notify` service: the listening socket as fd 3, `LISTEN_FDS=1`,
/// `LISTEN_PID` its own pid, and `NOTIFY_SOCKET` for its READY.
struct Activated {
    proc: Proc,
    log: PathBuf,
}

impl Activated {
    /// Starts the server and returns once it has said READY=1.
    #[track_caller]
    fn start(
        dir: &Path,
        listener: &std::os::unix::net::UnixListener,
        notify: &std::os::unix::net::UnixDatagram,
        args: &[&str],
    ) -> Activated {
        use std::os::fd::AsRawFd;
        let fd = listener.as_raw_fd();
        let notify_path = notify.local_addr().unwrap();
        let log = dir.join(format!("serve-{}.log", next_id()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve "$@""#)
            .arg(HLFS)
            .args(args)
            .env("NOTIFY_SOCKET", notify_path.as_pathname().unwrap())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // SAFETY: dup2 and fcntl are async-signal-safe; the listener's fd
        // stays open in this process while the child starts.
        unsafe {
            cmd.pre_exec(move || {
                let done = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if done < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut proc = Proc::spawn(&mut cmd);
        notify.set_read_timeout(Some(START_TIMEOUT)).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match notify.recv(&mut buf) {
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => break,
                Ok(_) => continue,
                Err(e) => {
                    proc.kill();
                    panic!(
                        "no READY=1 from the server ({e})\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        Activated { proc, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the server must exit 0 within STOP_TIMEOUT.
    #[track_caller]
    fn stop_ok(mut self) {
        self.proc.signal(libc::SIGTERM);
        let status = self.proc.wait_timeout(STOP_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "server stopped with {status:?} after SIGTERM\n{}",
            self.log()
        );
    }
}

/// Lines of `log` that start with `prefix`.
fn lines_starting(log: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

/// A restart of a socket-activated server in the middle of a client's
/// writes costs the client a pause, never an error: the listening socket
/// outlives each server, QEMU's NBD client (reconnect-delay) reconnects
/// and resends, and every write reads back after two restarts.
#[test]
fn a_restart_under_socket_activation_costs_a_client_a_pause_not_an_error() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M"]).ok();
    let sock = d.join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let notify = std::os::unix::net::UnixDatagram::bind(d.join("notify.sock")).unwrap();
    let mut server = Activated::start(d, &listener, &notify, &[&vol]);
    let uri = format!("nbd+unix:///vm.hlfs?socket={}", path_str(&sock));
    assert!(server.log().contains(&uri), "{}", server.log());

    const WRITES: usize = 60;
    let pattern = |i: usize| i % 250 + 1;
    let mut args = vec!["--image-opts".to_string()];
    for i in 0..WRITES {
        args.extend([
            "-c".into(),
            format!("write -P {} {} 64k", pattern(i), i << 16),
        ]);
        args.extend(["-c".into(), "sleep 150".into()]);
    }
    args.extend(["-c".into(), "flush".into()]);
    for i in 0..WRITES {
        args.extend([
            "-c".into(),
            format!("read -P {} {} 64k", pattern(i), i << 16),
        ]);
    }
    args.push(format!(
        "driver=nbd,server.type=unix,server.path={},export=vm.hlfs,reconnect-delay=60",
        path_str(&sock)
    ));
    let (mut qemu, log) = spawn_logged(d, "qemu-io", &args);
    for restart_after in [10, 30] {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        while lines_starting(&log, "wrote ") < restart_after {
            assert!(
                qemu.poll().is_none() && Instant::now() < deadline,
                "qemu-io stopped or stalled before write {restart_after}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server.stop_ok();
        server = Activated::start(d, &listener, &notify, &[&vol]);
    }
    let status = qemu.wait_timeout(CLIENT_TIMEOUT);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        lines_starting(&log, "wrote ") == WRITES && lines_starting(&log, "read ") == WRITES,
        "not every write and read was done ({status:?}): {text}"
    );
    assert!(
        status.is_some_and(|s| s.success())
            && !text.contains("error")
            && !text.contains("failed")
            && !text.contains("Pattern verification"),
        "qemu-io saw an error across the restarts ({status:?}): {text}"
    );
    server.stop_ok();
    check_volume(&vol);
}

/// The server under systemd's own socket activation tool, with its
/// options (two exports) from a config file: it serves on the socket it is
/// given, and
/// leaves that socket in place when it stops (it belongs to systemd). The
/// packaged units pass `systemd-analyze verify`.
#[test]
fn systemd_socket_activation_and_the_packaged_units() {
    require!(
        "systemd-socket-activate" => "systemd",
        "systemd-analyze" => "systemd",
        "nbdinfo" => "libnbd-bin",
    );
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "24M"]).ok();
    hlfs(&["snapshot", "create", &vol, "golden"]).ok();
    hlfs(&["resize", &vol, "--size", "32M"]).ok();
    // Two exports from the file: the volume, and its snapshot read-only.
    let config = d.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "volumes = [{vol:?}, {:?}]\n[limits]\nmax-connections-per-export = 2\n",
            format!("{vol}@golden")
        ),
    )
    .unwrap();
    let sock = path_str(&d.join("activated.sock"));
    // systemd-socket-activate gives the service only the environment it is
    // told to (-E NAME), as systemd does: pass ours on (a remote volume's
    // credentials, the cache directory).
    let mut args = vec!["-l".to_string(), sock.clone()];
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str().filter(|n| !n.starts_with("LISTEN_")) {
            args.extend(["-E".to_string(), name.to_string()]);
        }
    }
    args.extend([HLFS, "serve", "--config", &path_str(&config)].map(String::from));
    let (mut server, log) = spawn_logged(d, "systemd-socket-activate", &args);
    let uri = format!("nbd+unix:///vm.hlfs?socket={sock}");
    let deadline = Instant::now() + START_TIMEOUT;
    while !Path::new(&sock).exists() {
        assert!(
            Instant::now() < deadline,
            "no socket: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first client starts the server, as systemd would.
    let first = run("nbdinfo", &["--size", &uri]);
    assert!(
        first.status.success() && first.stdout.trim() == (32 * MIB).to_string(),
        "{first}\nserver: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let golden = export_info(&format!("nbd+unix:///vm.hlfs@golden?socket={sock}"));
    assert_eq!(golden["export-size"], 24 * MIB);
    assert_eq!(golden["is_read_only"], true, "{golden}");
    server.signal(libc::SIGTERM);
    let status = server.wait_timeout(STOP_TIMEOUT);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {text}");
    assert!(text.contains(&uri), "{text}");
    assert!(
        Path::new(&sock).exists(),
        "the server removed systemd's socket"
    );
    assert!(info_of(&vol)["writer"].is_null(), "{text}");

    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging");
    for unit in ["hlfs.service", "hlfs.socket"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        std::fs::write(d.join(unit), text.replace("/usr/local/bin/hlfs", HLFS)).unwrap();
    }
    let out = run(
        "systemd-analyze",
        &[
            "verify",
            "--man=no",
            &path_str(&d.join("hlfs.socket")),
            &path_str(&d.join("hlfs.service")),
        ],
    )
    .ok();
    assert!(out.text().trim().is_empty(), "{out}");
}

/// `hlfs serve VOL VOL@TIME`: a moment of the retention window served
/// next to its volume reads as the volume was then, read-only, while the
/// volume's head goes on being written.
#[test]
fn a_moment_served_next_to_its_volume_reads_as_it_was() {
    require!("qemu-io" => "qemu-utils");
    let dir = tempdir();
    let d = dir.path();
    let vol = volume_at(d, "vm.hlfs");
    hlfs(&["create", &vol, "--size", "16M", "--retain", "1h"]).ok();
    let srv = Server::unix(d, &[&vol], &[]);
    qemu_io_ok(srv.uri(), false, &["write -P 0x11 0 64K", "flush"]);
    std::thread::sleep(Duration::from_millis(50));
    let then = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(50));
    qemu_io_ok(srv.uri(), false, &["write -P 0x22 0 64K", "flush"]);
    srv.stop_ok();

    let moment = format!("{vol}@{then}");
    let srv = Server::unix(d, &[&vol, &moment], &[]);
    let head = srv.uri_of("vm.hlfs").to_string();
    let at = srv
        .uris
        .iter()
        .find(|u| export_of(u) != "vm.hlfs")
        .expect("the moment's export")
        .clone();
    qemu_io_ok(&at, true, &["read -P 0x11 0 64K"]);
    qemu_io_ok(
        &head,
        false,
        &["read -P 0x22 0 64K", "write -P 0x33 0 4K", "flush"],
    );
    qemu_io_ok(&at, true, &["read -P 0x11 0 64K"]);
    let w = qemu_io(&at, false, &["write -P 0x99 0 4096"]);
    assert!(!w.text().contains("wrote 4096/4096"), "{w}");
    srv.stop_ok();
    check_volume(&vol);
}
