//! The `hlfs` command as a user runs it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use hlfs_format::{decode_header, RecordKind, HEADER_LEN};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

fn hlfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hlfs"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run hlfs")
}

fn ok(args: &[&str]) -> String {
    let out = hlfs(args);
    assert!(
        out.status.success(),
        "hlfs {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with a clean error message, never a panic: status 1 for errors,
/// 2 for command-line usage errors (clap's convention).
fn fails(args: &[&str]) -> String {
    let out = hlfs(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "hlfs {args:?} should fail: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    assert!(
        stderr.starts_with("hlfs: error: ") || stderr.starts_with("error: "),
        "{stderr}"
    );
    stderr
}

fn sha256(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in walk(path) {
        total += std::fs::metadata(&entry)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
    }
    total
}

fn walk(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

#[test]
fn a_one_tib_thin_volume_is_created_and_described_fast_and_small() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("big.hlfs");
    let v = vol.to_str().unwrap();
    let start = Instant::now();
    ok(&["create", v, "--size", "1T"]);
    let json = ok(&["info", v, "--json"]);
    let elapsed = start.elapsed();
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(info["size"], 1u64 << 40);
    assert_eq!(info["block_size"], 4096);
    assert_eq!(info["allocated_bytes"], 0);
    assert_eq!(info["format_version"], 3);
    assert_eq!(info["retention"], serde_json::Value::Null);
    assert!(info["stored_bytes"].as_u64().unwrap() < 4096);
    assert_eq!(info["snapshots"], serde_json::json!([]));
    assert!(
        elapsed.as_secs_f64() < 1.0,
        "create + info took {elapsed:?}"
    );
    assert!(du(&vol) < 1 << 20, "{} bytes on disk", du(&vol));
}

#[test]
fn import_and_export_of_a_1_gib_random_image_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    random_file(&img, 1 << 30, 1);
    let vol = dir.path().join("vm.hlfs");
    let out = dir.path().join("out.img");
    ok(&[
        "import",
        img.to_str().unwrap(),
        vol.to_str().unwrap(),
        "--create",
    ]);
    ok(&["export", vol.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(sha256(&img), sha256(&out));
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", vol.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["size"], 1u64 << 30);
    assert_eq!(info["allocated_bytes"], 1u64 << 30);
}

#[test]
fn import_from_stdin_skips_zeros_and_grows_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("s.hlfs");
    let v = vol.to_str().unwrap();
    // 1 MiB data, 8 MiB zeros, 100 bytes of data: odd size, mostly holes.
    let mut image = vec![0u8; (9 << 20) + 100];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut image[..1 << 20]);
    image[(9 << 20)..].fill(0xAB);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hlfs"))
        .args(["import", "-", v, "--create"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&image).unwrap();
    assert!(child.wait().unwrap().success());
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", v, "--json"])).unwrap();
    assert_eq!(info["size"], image.len() as u64);
    assert_eq!(info["allocated_bytes"], (1 << 20) + 4096);
    let out = Command::new(env!("CARGO_BIN_EXE_hlfs"))
        .args(["export", v, "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == image, "stdout export differs");
    let file = dir.path().join("sparse.img");
    ok(&["export", v, file.to_str().unwrap()]);
    assert_eq!(std::fs::read(&file).unwrap(), image);
    assert!(
        du(&file) < 2 << 20,
        "export should keep holes: {} bytes",
        du(&file)
    );
}

/// Writes `bytes` at `offset` of `path`, leaving the rest as it is (holes
/// in a new file).
fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn import_of_a_sparse_file_skips_its_holes_and_zeroes_them_over_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 30;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut island = |len: usize| {
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        v
    };
    // a: data at the start, a few unaligned bytes in the middle, data at
    // the end; everything else a hole.
    let (first, middle, last) = (island(1 << 20), island(5000), island(1 << 20));
    write_at(&a, 0, &first);
    write_at(&a, (2 << 30) + 100, &middle);
    write_at(&a, size - (1 << 20), &last);
    assert!(du(&a) < 8 << 20, "the test image should be sparse");
    let vol = dir.path().join("v.hlfs");
    let v = vol.to_str().unwrap();
    ok(&["import", a.to_str().unwrap(), v, "--create"]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", v, "--json"])).unwrap();
    assert_eq!(info["size"], size);
    // 5000 bytes at 2 GiB + 100 touch two 4 KiB blocks.
    assert_eq!(info["allocated_bytes"], (2 << 20) + 2 * 4096);
    let out = dir.path().join("out.img");
    ok(&["export", v, out.to_str().unwrap()]);
    let read = |path: &Path, offset: u64, len: usize| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    };
    assert_eq!(read(&out, 0, 1 << 20), first);
    assert_eq!(read(&out, (2 << 30) + 100, 5000), middle);
    assert_eq!(read(&out, size - (1 << 20), 1 << 20), last);
    assert!(read(&out, (2 << 30) + 5100, 8192).iter().all(|&x| x == 0));

    // b, imported over a: a hole where a had data, data where a had a hole.
    // The volume must read as b exactly: the hole zeroes a's old bytes.
    let fresh = island(3 << 20);
    write_at(&b, 8 << 20, &fresh);
    write_at(&b, size - 1, &[0x5A]);
    ok(&["import", b.to_str().unwrap(), v]);
    ok(&["export", v, out.to_str().unwrap()]);
    assert!(
        read(&out, 0, 1 << 20).iter().all(|&x| x == 0),
        "a hole left old data"
    );
    assert!(read(&out, (2 << 30) + 100, 5000).iter().all(|&x| x == 0));
    assert_eq!(read(&out, 8 << 20, 3 << 20), fresh);
    assert_eq!(read(&out, size - 1, 1), [0x5A]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", v, "--json"])).unwrap();
    assert_eq!(info["allocated_bytes"], (3 << 20) + 4096);
    ok(&["check", v]);
}

/// A FIFO (or `<(zcat disk.gz)`) has no size to trust: it is read until
/// it ends, as stdin is.
#[test]
fn import_from_a_fifo_reads_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("disk.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let vol = dir.path().join("f.hlfs");
    let v = vol.to_str().unwrap();
    ok(&["create", v, "--size", "16M"]);
    let mut image = vec![0u8; 3 << 20];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut image);
    let child = Command::new(env!("CARGO_BIN_EXE_hlfs"))
        .args(["import", fifo.to_str().unwrap(), v])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(&fifo, &image).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("imported 3.0 MiB"), "{said}");
    let exported = dir.path().join("out.img");
    ok(&["export", v, exported.to_str().unwrap()]);
    assert_eq!(std::fs::read(&exported).unwrap()[..image.len()], image[..]);
}

#[test]
fn snapshots_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    random_file(&a, 3 << 20, 1);
    random_file(&b, 3 << 20, 2);
    let vol = dir.path().join("v.hlfs");
    let v = vol.to_str().unwrap();
    ok(&["import", a.to_str().unwrap(), v, "--create"]);
    ok(&["snapshot", "create", v, "first"]);
    ok(&["import", b.to_str().unwrap(), v]);
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["snapshot", "list", v, "--json"])).unwrap();
    assert_eq!(list[0]["name"], "first");
    let snap_out = dir.path().join("snap.img");
    ok(&["export", &format!("{v}@first"), snap_out.to_str().unwrap()]);
    assert_eq!(sha256(&snap_out), sha256(&a));
    let said = ok(&["snapshot", "rollback", v, "first"]);
    let kept = said
        .split("kept as snapshot ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let head = dir.path().join("head.img");
    ok(&["export", v, head.to_str().unwrap()]);
    assert_eq!(sha256(&head), sha256(&a));
    ok(&["export", &format!("{v}@{kept}"), head.to_str().unwrap()]);
    assert_eq!(
        sha256(&head),
        sha256(&b),
        "rollback must keep the abandoned head"
    );
    ok(&["snapshot", "delete", v, "first"]);
    fails(&["snapshot", "delete", v, "first"]);
    fails(&["export", &format!("{v}@first"), head.to_str().unwrap()]);
    fails(&["snapshot", "create", v, "no/slashes"]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", v, "--json"])).unwrap();
    assert_eq!(info["snapshots"], serde_json::json!([kept]));
    ok(&["check", v]);
}

/// `hlfs gc --stats --json` and its figures.
fn space_of(v: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["gc", v, "--stats", "--json"])).unwrap()
}

fn figure(json: &serde_json::Value, key: &str) -> u64 {
    json[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {json}"))
}

/// Map pages and checkpoints of these small volumes take less than this.
const METADATA: u64 = 64 << 10;

#[track_caller]
fn about(got: u64, data: u64) {
    assert!(
        (data..data + METADATA).contains(&got),
        "{got} bytes, expected {data} of data and less than {METADATA} of metadata"
    );
}

#[test]
fn gc_shows_what_overwrites_free_and_what_snapshots_hold_and_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    random_file(&a, 8 << 20, 3);
    random_file(&b, 4 << 20, 4);
    let vol = dir.path().join("v.hlfs");
    let v = vol.to_str().unwrap();
    ok(&["create", v, "--size", "64M", "--segment-size", "1M"]);
    ok(&["import", a.to_str().unwrap(), v]);
    ok(&["snapshot", "create", v, "before"]);
    // The first half of the head is new; the snapshot keeps the old one.
    ok(&["import", b.to_str().unwrap(), v]);

    let stats = space_of(v);
    about(figure(&stats, "live_bytes"), 12 << 20);
    about(figure(&stats, "head_only_bytes"), 4 << 20);
    about(figure(&stats["snapshots"][0], "only_bytes"), 4 << 20);
    assert_eq!(stats["snapshots"][0]["name"], "before");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["snapshot", "list", v, "--json"])).unwrap();
    assert_eq!(list[0]["only_bytes"], stats["snapshots"][0]["only_bytes"]);
    assert!(ok(&["snapshot", "list", v]).contains("ONLY IT HOLDS"));
    // Only record headers and superseded map pages are dead so far.
    assert!(figure(&stats, "reclaimable_bytes") < METADATA, "{stats}");

    ok(&["snapshot", "delete", v, "before"]);
    let stats = space_of(v);
    about(figure(&stats, "live_bytes"), 8 << 20);
    assert!(figure(&stats, "reclaimable_bytes") >= 4 << 20, "{stats}");
    let segments = stats["segments"].as_array().unwrap();
    // Import writes records of 4 MiB, so each segment holds one.
    assert!(segments.len() >= 3, "{stats}");
    assert!(
        segments.iter().any(|s| figure(s, "live_bytes") == 0),
        "the first half of the first import is dead: {stats}"
    );
    let (mut size, mut live) = (0, 0);
    for s in segments {
        assert!(figure(s, "live_bytes") <= figure(s, "size"), "{s}");
        assert!(figure(s, "age_seconds") < 3600, "{s}");
        assert_eq!(s["recent"], false, "the volume is closed: {s}");
        size += figure(s, "size");
        live += figure(s, "live_bytes");
    }
    assert_eq!(size, figure(&stats, "segment_bytes"));
    assert_eq!(live, figure(&stats, "live_bytes"));
    assert_eq!(
        figure(&stats, "stored_bytes"),
        size + figure(&stats, "manifest_bytes") + figure(&stats, "journal_bytes")
    );
    let ratio = stats["space_ratio"].as_f64().unwrap();
    assert!(
        ratio > 1.4 && ratio < 1.6,
        "12 MiB stored for 8 live: {stats}"
    );
    // The log's counters since creation: 12 MiB from clients, and a
    // little more appended for it (record headers, map pages).
    let log = &stats["log"];
    assert_eq!(figure(log, "written_bytes"), 12 << 20, "{stats}");
    let wa = stats["write_amplification"].as_f64().unwrap();
    assert!(wa > 1.0 && wa < 1.05, "{stats}");

    let text = ok(&["gc", v, "--stats"]);
    assert!(
        text.contains("reclaimable:") && text.contains("LIVE%") && text.contains("write amp.:"),
        "{text}"
    );
    fails(&["gc", dir.path().join("none").to_str().unwrap(), "--stats"]);

    // Cleaning gives the dead half back, and the volume reads the same.
    let exported = |name: &str| {
        let out = dir.path().join(name);
        ok(&["export", v, out.to_str().unwrap()]);
        sha256(&out)
    };
    let before = exported("before.img");
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["gc", v, "--grace", "0", "--json"])).unwrap();
    assert_eq!(report["stopped"], "target-reached", "{report}");
    assert!(figure(&report, "deleted_segments") >= 1, "{report}");
    assert!(figure(&report, "freed_bytes") >= 4 << 20, "{report}");
    // What cleaning copied is appended to the log too: it counts in the
    // write amplification.
    let after = space_of(v);
    assert_eq!(figure(&after["log"], "written_bytes"), 12 << 20, "{after}");
    assert!(
        figure(&after["log"], "appended_bytes")
            >= figure(log, "appended_bytes") + figure(&report, "copied_bytes"),
        "{stats} then {after}"
    );
    assert!(
        report["space_ratio_after"].as_f64().unwrap() <= 1.2,
        "{report}"
    );
    let stats = space_of(v);
    assert!(stats["space_ratio"].as_f64().unwrap() <= 1.2, "{stats}");
    // The same, but for the manifest that closing the volume wrote.
    let (stored, said) = (
        figure(&stats, "stored_bytes"),
        figure(&report, "stored_after"),
    );
    assert!((said..said + 4096).contains(&stored), "{stats} {report}");
    assert_eq!(exported("after.img"), before);
    ok(&["check", v]);
    // Met already: nothing to do but sweep, and said so. A crash in a
    // put left a staging file: a process that is gone, an hour ago.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let staged = dir
        .path()
        .join(format!("v.hlfs/.tmp/{gone_pid}.0.0000000000000001"));
    let file = std::fs::File::create(&staged).unwrap();
    file.set_len(3 << 20).unwrap();
    file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    let text = ok(&["gc", v, "--grace", "0"]);
    assert!(
        text.contains("0 passes")
            && text.contains("target is met")
            && text.contains("3.0 MiB of staging files"),
        "{text}"
    );
    assert!(!staged.exists());
    assert!(fails(&["gc", v, "--target", "0.5"]).contains("space target"));
    fails(&["gc", v, "--stats", "--target", "2"]);
}

#[test]
fn diff_lists_what_changed_between_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    random_file(&a, 4 << 20, 5);
    // b: a with 64 KiB of zeros at 2 MiB.
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[2 << 20..(2 << 20) + (64 << 10)].fill(0);
    std::fs::write(&b, &bytes).unwrap();
    let vol = dir.path().join("v.hlfs");
    let v = vol.to_str().unwrap();
    ok(&["create", v, "--size", "8M"]);
    ok(&["import", a.to_str().unwrap(), v]);
    ok(&["snapshot", "create", v, "s1"]);
    ok(&["import", b.to_str().unwrap(), v]);
    ok(&["snapshot", "create", v, "s2"]);
    let diff = |to: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&["diff", to, "--from", "s1", "--json"])).unwrap()
    };
    let at_s2 = diff(&format!("{v}@s2"));
    // Import writes every block again: all of it is data, but the zeros.
    let expected = serde_json::json!([
        {"offset": 0, "length": 2 << 20, "zero": false},
        {"offset": 2 << 20, "length": 64 << 10, "zero": true},
        {"offset": (2 << 20) + (64 << 10), "length": (2 << 20) - (64 << 10), "zero": false},
    ]);
    assert_eq!(at_s2["extents"], expected, "{at_s2}");
    assert_eq!(
        (at_s2["from"].as_str(), at_s2["to"].as_str()),
        (Some("s1"), Some("s2"))
    );
    assert_eq!(at_s2["size"], 8 << 20);
    // The head of the closed volume is s2, and nothing changed since s2.
    assert_eq!(diff(v)["extents"], expected);
    assert_eq!(diff(v)["to"], serde_json::Value::Null);
    let none: serde_json::Value =
        serde_json::from_str(&ok(&["diff", &format!("{v}@s2"), "--from", "s2", "--json"])).unwrap();
    assert_eq!(none["extents"], serde_json::json!([]));
    let text = ok(&["diff", &format!("{v}@s2"), "--from", "s1"]);
    assert!(text.contains("3 extents changed from s1 to s2"), "{text}");
    assert!(fails(&["diff", v, "--from", "nope"]).contains("nope"));
    fails(&["diff", v]);
}

/// A replica kept by diffs: a full export-diff starts it, incremental
/// ones (through a file, and through a pipe) keep it equal to its source
/// snapshot by snapshot, and a stream cut short or damaged is refused with
/// the replica left exactly as it was.
#[test]
fn export_diff_and_import_diff_keep_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (src, dst) = (p("src.hlfs"), p("dst.hlfs"));
    let (a, b, c) = (p("a.img"), p("b.img"), p("c.img"));
    random_file(Path::new(&a), 3 << 20, 11);
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[1 << 20..(1 << 20) + 8192].fill(0);
    bytes[12345..20000].fill(0x5a);
    std::fs::write(&b, &bytes).unwrap();
    ok(&["create", &src, "--size", "4M"]);
    ok(&["import", &a, &src]);
    ok(&["snapshot", "create", &src, "s1"]);
    ok(&["import", &b, &src]);
    ok(&["snapshot", "create", &src, "s2"]);
    ok(&["create", &dst, "--size", "4M"]);

    let full = p("full.diff");
    let out = ok(&["export-diff", &format!("{src}@s1"), &full, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["to"], "s1", "{report}");
    assert_eq!(report["data_bytes"], 3 << 20, "{report}");
    ok(&["import-diff", &full, &dst]);
    ok(&["export", &format!("{dst}@s1"), &c]);
    let s1 = p("s1.img");
    ok(&["export", &format!("{src}@s1"), &s1]);
    assert_eq!(sha256(Path::new(&c)), sha256(Path::new(&s1)));

    let inc = p("inc.diff");
    ok(&["export-diff", &format!("{src}@s2"), &inc, "--from", "s1"]);
    let stream = std::fs::read(&inc).unwrap();
    assert!(stream.starts_with(b"rbd diff v1\n"));
    // Cut short, damaged: refused, and the replica's head is still s1.
    let before = p("before.img");
    ok(&["export", &dst, &before]);
    let cut = p("cut.diff");
    std::fs::write(&cut, &stream[..stream.len() / 2]).unwrap();
    let e = fails(&["import-diff", &cut, &dst]);
    assert!(e.contains("bad diff stream"), "{e}");
    let mut damaged = stream.clone();
    let last = damaged.len() - 1;
    damaged[last] = b'x';
    std::fs::write(&cut, &damaged).unwrap();
    fails(&["import-diff", &cut, &dst]);
    ok(&["export", &dst, &c]);
    assert_eq!(sha256(Path::new(&c)), sha256(Path::new(&before)));
    let list = ok(&["snapshot", "list", &dst]);
    assert!(!list.contains("s2") && !list.contains("import"), "{list}");

    // Through a pipe, as `hlfs export-diff ... - | hlfs import-diff - ...`.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hlfs"))
        .args(["import-diff", "-", &dst, "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let exported = hlfs(&["export-diff", &format!("{src}@s2"), "-", "--from", "s1"]);
    assert!(exported.status.success());
    assert_eq!(exported.stdout, stream, "the same stream to stdout");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&exported.stdout)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["from"].as_str(), report["to"].as_str()),
        (Some("s1"), Some("s2"))
    );
    let s2 = p("s2.img");
    ok(&["export", &format!("{src}@s2"), &s2]);
    ok(&["export", &format!("{dst}@s2"), &c]);
    assert_eq!(sha256(Path::new(&c)), sha256(Path::new(&s2)));
    ok(&["export", &dst, &c]);
    assert_eq!(sha256(Path::new(&c)), sha256(Path::new(&s2)));

    // Again: s2 is there now. A diff from a snapshot the target lacks.
    assert!(fails(&["import-diff", &inc, &dst]).contains("s2"));
    ok(&["snapshot", "delete", &dst, "s1"]);
    ok(&["snapshot", "delete", &dst, "s2"]);
    assert!(fails(&["import-diff", &inc, &dst]).contains("no snapshot \"s1\""));
    assert!(fails(&["import-diff", &a, &dst]).contains("not an RBD diff stream"));
    fails(&["export-diff", &format!("{src}@s2"), "-", "--json"]);
    // A failed export leaves the file it would have replaced as it was.
    let kept = sha256(Path::new(&c));
    fails(&["export-diff", &src, &c, "--from", "nope"]);
    assert_eq!(sha256(Path::new(&c)), kept);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A replica whose head moved on, and a full stream into a volume with
    // data, are refused.
    let other = p("other.hlfs");
    ok(&["create", &other, "--size", "4M"]);
    ok(&["import-diff", &full, &other]);
    ok(&["import", &b, &other]);
    assert!(fails(&["import-diff", &inc, &other]).contains("has changed since"));
    let full2 = p("full2.diff");
    ok(&["export-diff", &format!("{src}@s2"), &full2]);
    assert!(fails(&["import-diff", &full2, &other]).contains("holds data"));
}

#[test]
fn errors_are_one_line_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("v.hlfs");
    let v = v.to_str().unwrap();
    fails(&["info", "/nonexistent/volume"]);
    fails(&["create", v, "--size", "lots"]);
    fails(&["create", v, "--size", "1G", "--block-size", "3000"]);
    ok(&["create", v, "--size", "1M"]);
    fails(&["create", v, "--size", "1G"]);
    fails(&["resize", v, "--size", "512K"]);
    fails(&["import", "/nonexistent/file", v]);
    let big = dir.path().join("big.img");
    random_file(&big, 2 << 20, 3);
    let e = fails(&["import", big.to_str().unwrap(), v]);
    assert!(e.contains("resize"), "{e}");
    fails(&["info", "hdfs://namenode:8020/vol"]);
    ok(&["resize", v, "--size", "2M"]);
    ok(&["import", big.to_str().unwrap(), v]);
}

/// Offsets of the records of one kind in a segment file.
fn records_of(kind: RecordKind, segment: &Path) -> Vec<usize> {
    let bytes = std::fs::read(segment).unwrap();
    let mut at = 0;
    let mut out = Vec::new();
    while at + HEADER_LEN <= bytes.len() {
        let h = decode_header(&bytes[at..]).unwrap();
        if h.kind == kind {
            out.push(at);
        }
        at += h.record_len() as usize;
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn damaged_volume(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("d.img");
    random_file(&img, 2 << 20, 9);
    let vol = dir.join("d.hlfs");
    ok(&[
        "import",
        img.to_str().unwrap(),
        vol.to_str().unwrap(),
        "--create",
    ]);
    ok(&["check", vol.to_str().unwrap()]);
    let seg = std::fs::read_dir(vol.join("segments"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    (vol, seg)
}

#[test]
fn check_finds_a_flipped_data_byte_and_reads_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, seg) = damaged_volume(dir.path());
    let at = records_of(RecordKind::Data, &seg)[0];
    flip(&seg, at + HEADER_LEN + 5000);
    let out = hlfs(&["check", vol.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("segments/0000000001 offset"), "{said}");
    assert!(said.contains("checksum mismatch"), "{said}");
    let e = fails(&[
        "export",
        vol.to_str().unwrap(),
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(
        e.contains("corrupt") && e.contains("checksum mismatch"),
        "{e}"
    );
}

#[test]
fn check_finds_a_flipped_map_page_byte_and_opens_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, seg) = damaged_volume(dir.path());
    let at = *records_of(RecordKind::MapPage, &seg).last().unwrap();
    flip(&seg, at + HEADER_LEN + 3);
    let out = hlfs(&["check", vol.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("segments/0000000001 offset"), "{said}");
    let e = fails(&[
        "export",
        vol.to_str().unwrap(),
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("corrupt"), "{e}");
}

#[test]
fn check_finds_a_flipped_manifest_byte_and_opens_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, _) = damaged_volume(dir.path());
    let mut manifests: Vec<_> = std::fs::read_dir(vol.join("manifest"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    manifests.sort();
    flip(manifests.last().unwrap(), 30);
    let out = hlfs(&["check", vol.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("manifest/0000"), "{said}");
    let e = fails(&["info", vol.to_str().unwrap()]);
    assert!(e.contains("corrupt") && e.contains("manifest/"), "{e}");
}

/// The exit status says what kind of failure it was: 2 for what the user
/// gave (a malformed command line, or an argument the volume refuses), 1
/// for everything else.
#[test]
fn exit_status_follows_the_kind_of_error() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("v.hlfs");
    let vol = vol.to_str().unwrap();
    let status = |args: &[&str]| hlfs(args).status.code();
    assert_eq!(status(&["create", vol]), Some(2), "missing --size");
    assert_eq!(
        status(&["create", vol, "--size", "1M", "--block-size", "3000"]),
        Some(2)
    );
    ok(&["create", vol, "--size", "1M"]);
    assert_eq!(
        status(&["resize", vol, "--size", "4K"]),
        Some(2),
        "a shrink"
    );
    assert_eq!(status(&["snapshot", "create", vol, "bad/name"]), Some(2));
    assert_eq!(status(&["create", vol, "--size", "1M"]), Some(1), "exists");
    let missing = dir.path().join("nothing-here");
    assert_eq!(status(&["info", missing.to_str().unwrap()]), Some(1));
    assert_eq!(status(&["snapshot", "delete", vol, "none"]), Some(1));
}

/// A config file with a misspelt key, or a serve with no volume at all, is
/// refused before anything is opened: exit 2, the key named with its line,
/// the volume left unclaimed.
#[test]
fn serve_refuses_a_bad_config_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("v.hlfs");
    let vol = vol.to_str().unwrap();
    ok(&["create", vol, "--size", "1M"]);
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!("volumes = [{vol:?}]\n[limits]\nmax-conections = 4\n"),
    )
    .unwrap();
    let out = hlfs(&["serve", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 3") && stderr.contains("unknown field `max-conections`"),
        "{stderr}"
    );
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "--json", vol])).unwrap();
    assert!(info["writer"].is_null(), "{info}");

    let out = hlfs(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume to serve"));

    // A space target the automatic cleaner could never meet, from the
    // command line or the file.
    assert!(fails(&["serve", vol, "--gc-target", "1.0"]).contains("--gc-target"));
    std::fs::write(
        &config,
        format!("volumes = [{vol:?}]\n[gc]\ntarget = 0.5\n"),
    )
    .unwrap();
    let out = hlfs(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gc-target"));
}

/// Output into a pipe whose reader has gone (`hlfs snapshot list vm | head
/// -1`) ends the command as SIGPIPE ends Unix tools, never with a panic.
#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("v.hlfs");
    let vol = vol.to_str().unwrap();
    ok(&["create", vol, "--size", "1M"]);
    for i in 0..20 {
        ok(&["snapshot", "create", vol, &format!("s{i}")]);
    }
    for args in [
        vec!["info", vol],
        vec!["snapshot", "list", vol],
        vec!["snapshot", "list", vol, "--json"],
        vec!["gc", vol, "--stats"],
        vec!["check", vol],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hlfs"))
            .args(&args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Gone before the command can have written anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Each writes more than nothing, after its reader has gone.
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "hlfs {args:?}: {:?}: {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "hlfs {args:?}: {stderr}");
    }
}

/// A volume created with a retention window exports as it was at a UTC
/// moment between two imports (to the millisecond), and at a moment
/// before now; before the window began, "as of" has no snapshot to give.
/// Clones of the moment read it, and keep it when the window is turned
/// off.
#[test]
fn a_moment_of_the_retention_window_exports_and_clones_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (a, b) = (path("a.img"), path("b.img"));
    random_file(Path::new(&a), 2 << 20, 41);
    random_file(Path::new(&b), 2 << 20, 42);
    let v = path("v.hlfs");
    ok(&[
        "create",
        &v,
        "--size",
        "2M",
        "--segment-size",
        "256K",
        "--retain",
        "1h",
    ]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", &v, "--json"])).unwrap();
    assert_eq!(info["retention"]["window_ms"], 3_600_000, "{info}");
    assert_eq!(info["format_version"], 3, "{info}");
    ok(&["import", &a, &v]);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let between = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    std::thread::sleep(std::time::Duration::from_millis(50));
    ok(&["import", &b, &v]);
    std::thread::sleep(std::time::Duration::from_millis(1200));

    let out = path("out.img");
    ok(&["export", &format!("{v}@{between}"), &out]);
    assert_eq!(
        sha256(Path::new(&out)),
        sha256(Path::new(&a)),
        "at {between}"
    );
    // A second ago, the second import had landed.
    ok(&["export", &format!("{v}@-1s"), &out]);
    assert_eq!(sha256(Path::new(&out)), sha256(Path::new(&b)));
    let err = fails(&["export", &format!("{v}@-1h"), &out]);
    assert!(err.contains("none taken at or before"), "{err}");
    let err = fails(&["export", &format!("{v}@-soon"), &out]);
    assert!(err.contains("@-10m"), "{err}");

    // A clone of a moment: the moment is kept as a snapshot, which the
    // clone reads; v becomes v4, which binaries that know no clones refuse.
    let clone_of_between = |clone: &str| -> serde_json::Value {
        let made = ok(&["clone", &format!("{v}@{between}"), clone, "--json"]);
        serde_json::from_str(&made).unwrap()
    };
    let (c1, c2) = (path("c1.hlfs"), path("c2.hlfs"));
    let made = clone_of_between(&c1);
    let kept_as = made["parent"]["snapshot"].as_str().unwrap().to_string();
    assert!(kept_as.starts_with("moment-"), "{made}");
    ok(&["export", &c1, &out]);
    assert_eq!(sha256(Path::new(&out)), sha256(Path::new(&a)));
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", &v, "--json"])).unwrap();
    assert_eq!(info["format_version"], 4, "{info}");
    assert_eq!(
        clone_of_between(&c2)["parent"]["snapshot"],
        kept_as.as_str(),
        "one moment is kept once"
    );
    let refused = fails(&["snapshot", "delete", &v, &kept_as]);
    assert!(refused.contains("has clones"), "{refused}");

    // Back to the moment between the imports; the head it left is kept.
    let said = ok(&["snapshot", "rollback", &v, &between]);
    assert!(said.contains("back to its moment"), "{said}");
    ok(&["export", &v, &out]);
    assert_eq!(sha256(Path::new(&out)), sha256(Path::new(&a)));
    let kept = said.trim().rsplit(' ').next().unwrap();
    ok(&["export", &format!("{v}@{kept}"), &out]);
    assert_eq!(sha256(Path::new(&out)), sha256(Path::new(&b)));
    let err = fails(&["snapshot", "rollback", &v, "-2h"]);
    assert!(err.contains("retention window"), "{err}");

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["retain", &v, "off", "--json"])).unwrap();
    assert_eq!(json["retain_ms"], 0);
    assert!(ok(&["info", &v]).contains("retention:      off"));
    // Outside the window, the moment the clones keep is still there.
    ok(&["export", &format!("{v}@{between}"), &out]);
    assert_eq!(sha256(Path::new(&out)), sha256(Path::new(&a)));
    let err = fails(&["clone", &format!("{v}@-1s"), &path("c3.hlfs")]);
    assert!(err.contains("retention window"), "{err}");
    let err = fails(&["retain", &v, "whenever"]);
    assert!(err.contains("30m, 1h or 7d"), "{err}");
}

/// A clone reads its parent's snapshot until it writes, whatever the
/// parent does next; the snapshot cannot be deleted under it; clones of
/// clones chain.
#[test]
fn clones_read_their_snapshot_and_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let size = 16 << 20;
    let (golden, other) = (p("golden.img"), p("other.img"));
    random_file(Path::new(&golden), size, 1);
    // Data in the middle, holes (to be written as zeros) around it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut middle = vec![0u8; 3 << 20];
    rng.fill_bytes(&mut middle);
    write_at(Path::new(&other), 5 << 20, &middle);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&other)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let (base, c1, c2) = (p("base"), p("c1"), p("c2"));
    ok(&["import", &golden, &base, "--create"]);
    ok(&["snapshot", "create", &base, "gold"]);

    let made: serde_json::Value =
        serde_json::from_str(&ok(&["clone", &format!("{base}@gold"), &c1, "--json"])).unwrap();
    assert_eq!(made["parent"]["address"], base.as_str());
    assert_eq!(made["size"], size);
    let out = p("out.img");
    let reads_as = |vol: &str, image: &str| {
        ok(&["export", vol, &out]);
        assert_eq!(sha256(Path::new(&out)), sha256(Path::new(image)), "{vol}");
    };
    reads_as(&c1, &golden);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", &c1, "--json"])).unwrap();
    assert_eq!(info["parent"]["snapshot"], "gold");
    assert_eq!(info["format_version"], 4);
    assert_eq!(info["allocated_bytes"], 0, "nothing is copied");

    // Writing the clone: its holes are written as zeros, over the parent's
    // data, and the parent does not change.
    ok(&["import", &other, &c1]);
    reads_as(&c1, &other);
    reads_as(&format!("{base}@gold"), &golden);

    // The parent's head moves on and is cleaned; the clone reads the same.
    let newer = p("newer.img");
    random_file(Path::new(&newer), size, 3);
    ok(&["snapshot", "create", &c1, "s1"]);
    ok(&["clone", &format!("{c1}@s1"), &c2]);
    ok(&["import", &newer, &base]);
    ok(&["gc", &base, "--target", "1.0", "--grace", "0"]);
    for clone in [&c1, &c2] {
        reads_as(clone, &other);
    }
    ok(&["check", &c1]);

    let info: serde_json::Value = serde_json::from_str(&ok(&["info", &base, "--json"])).unwrap();
    assert_eq!(info["clones"]["gold"], serde_json::json!([c1]));
    let refused = fails(&["snapshot", "delete", &base, "gold"]);
    assert!(
        refused.contains("has clones") && refused.contains(&c1),
        "{refused}"
    );
    let refused = fails(&["snapshot", "delete", &c1, "s1"]);
    assert!(refused.contains(&c2), "{refused}");

    let exists = fails(&["clone", &format!("{base}@gold"), &c2]);
    assert!(exists.contains("already exists"), "{exists}");
    let missing = fails(&["clone", &format!("{base}@nope"), &p("c3")]);
    assert!(missing.contains("nope"), "{missing}");
    assert!(
        !Path::new(&p("c3")).exists(),
        "a refused clone left a directory"
    );
    let unnamed = fails(&["clone", &base, &p("c3")]);
    assert!(unnamed.contains("VOLUME@SNAPSHOT"), "{unnamed}");

    // Flatten, bottom of the chain first: then the snapshots can go.
    let refused = fails(&["flatten", &c1]);
    assert!(refused.contains("s1"), "{refused}");
    let flat: serde_json::Value = serde_json::from_str(&ok(&["flatten", &c2, "--json"])).unwrap();
    assert_eq!(
        flat["copied_bytes"],
        3 << 20,
        "only the parent's data is copied"
    );
    ok(&["snapshot", "delete", &c1, "s1"]);
    ok(&["flatten", &c1]);
    ok(&["snapshot", "delete", &base, "gold"]);
    ok(&["gc", &base, "--target", "1.0", "--grace", "0"]);
    for clone in [&c1, &c2] {
        reads_as(clone, &other);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["info", clone, "--json"])).unwrap();
        assert!(info["parent"].is_null(), "{info}");
        ok(&["check", clone]);
    }
    let not_clone = fails(&["flatten", &base]);
    assert!(not_clone.contains("not a clone"), "{not_clone}");
}
