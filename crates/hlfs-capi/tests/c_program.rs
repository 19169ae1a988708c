//! The C API as a C program uses it: tests/c/hlfs_test.c, compiled with
//! `gcc -Wall -Werror` against include/hlfs.h and libhlfs.so, run on a new
//! volume (then the hlfs command line reads back what it wrote), and run
//! again under valgrind, which must find no invalid access and no leak of
//! the library's allocations.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Is `tool` installed? Under CI a missing tool fails the test; elsewhere
/// the test says loudly that it is skipped.
fn have(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required under CI (apt-get install {package})");
        }
        eprintln!("******** SKIPPED: {tool} not installed (apt-get install {package}) ********");
    }
    found
}

/// The directory of cargo's build (target/debug or target/release),
/// where the hlfs command is.
fn build_dir() -> PathBuf {
    lib_dir().parent().unwrap().to_path_buf()
}

/// Where the library was built for this test: next to the test itself
/// (target/debug/deps), as `cargo test` leaves it.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// Compiles the test program into `dir`, against the library just built
/// (under its file name and its soname, as an install lays it out).
fn compile(dir: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = lib_dir().join("libhlfs.so");
    assert!(built.exists(), "{} is not built", built.display());
    let lib_dir = dir.join("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    for name in ["libhlfs.so", "libhlfs.so.0"] {
        std::os::unix::fs::symlink(&built, lib_dir.join(name)).unwrap();
    }
    let program = dir.join("hlfs_test");
    let out = Command::new("gcc")
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g", "-pthread",
        ])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/hlfs_test.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lhlfs")
        .arg("-o")
        .arg(&program)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    program
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn a_c_program_writes_reads_snapshots_and_hammers_one_handle_from_8_threads() {
    if !have("gcc", "gcc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let program = compile(dir.path());
    let vol = dir.path().join("c.hlfs");
    let expected = dir.path().join("expected.raw");
    let said = run(Command::new(&program)
        .arg(&vol)
        .arg(&expected)
        .env("HLFS_CACHE_DIR", dir.path().join("cache")));
    assert!(said.contains("ok: 1600 writes by 8 threads"), "{said}");

    // The command line reads back what the C program wrote.
    let cli = build_dir().join("hlfs");
    if !cli.exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{} is not built: run the workspace's tests", cli.display());
        }
        eprintln!(
            "******** SKIPPED the read-back: {} is not built (cargo build -p hlfs) ********",
            cli.display()
        );
        return;
    }
    let exported = dir.path().join("exported.raw");
    run(Command::new(&cli).arg("export").arg(&vol).arg(&exported));
    assert!(
        std::fs::read(&exported).unwrap() == std::fs::read(&expected).unwrap(),
        "the volume the C program wrote differs from its model"
    );
    let checked = run(Command::new(&cli).arg("check").arg(&vol));
    assert!(checked.contains("no damage found"), "{checked}");
}

#[test]
fn the_c_program_under_valgrind_has_no_invalid_access_and_leaks_nothing() {
    if !(have("gcc", "gcc") && have("valgrind", "valgrind")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let program = compile(dir.path());
    let vol = dir.path().join("v.hlfs");
    let expected = dir.path().join("expected.raw");
    let said = run(Command::new("valgrind")
        .args([
            "--quiet",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&program)
        .arg(&vol)
        .arg(&expected)
        // Fewer rounds: valgrind runs it some thirty times slower.
        .arg("8")
        .env("HLFS_CACHE_DIR", dir.path().join("cache")));
    assert!(said.contains("ok: 64 writes by 8 threads"), "{said}");
}

/// The README's example, built against libhlfs installed by
/// scripts/install-capi.sh and found with pkg-config, and linked
/// statically too; each run prints what it wrote and read back.
#[test]
fn the_readme_example_builds_with_pkg_config_after_install() {
    if !(have("gcc", "gcc") && have("pkg-config", "pkgconf")) {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let section = readme
        .split("## Using HLFS from C")
        .nth(1)
        .expect("README has a C section");
    let example = section
        .split("```c\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the C section has an example");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("hello.c"), example).unwrap();
    let prefix = d.join("prefix");
    run(Command::new(repo.join("scripts/install-capi.sh"))
        .arg(&prefix)
        .env("HLFS_LIB_DIR", lib_dir()));
    for file in [
        "lib/libhlfs.so.0",
        "lib/libhlfs.a",
        "include/hlfs.h",
        "lib/pkgconfig/hlfs.pc",
    ] {
        assert!(prefix.join(file).exists(), "{file} not installed");
    }
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "hlfs"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")));
    let mut dynamic = Command::new("gcc");
    dynamic
        .args(["-Wall", "-Werror", "hello.c", "-o", "hello"])
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .current_dir(d);
    run(&mut dynamic);
    let mut fixed = Command::new("gcc");
    fixed
        .args(["-Wall", "-Werror", "hello.c", "-o", "hello-static", "-I"])
        .arg(prefix.join("include"))
        .arg(prefix.join("lib/libhlfs.a"))
        .args(["-lpthread", "-ldl", "-lm"])
        .current_dir(d);
    run(&mut fixed);
    let create = "#include <hlfs.h>\nint main(void) { return hlfs_create(\"./vm1.hlfs\", 1 << 30, 0) != 0; }\n";
    std::fs::write(d.join("create.c"), create).unwrap();
    let mut creator = Command::new("gcc");
    creator
        .args(["create.c", "-o", "create"])
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .current_dir(d);
    run(&mut creator);
    run(Command::new(d.join("create")).current_dir(d));
    for program in ["hello", "hello-static"] {
        let said = run(Command::new(d.join(program)).current_dir(d));
        assert_eq!(said.trim(), "hello, disk", "{program}");
    }
}
