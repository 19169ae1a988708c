//! `hlfs serve --tls-certs`: TLS as QEMU and libnbd use it. Certificates are
//! made with openssl; clients are nbdinfo (libnbd) and qemu-io.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
        eprintln!("SKIPPED: {tool} not installed (apt-get install {package})");
    }
    found
}

fn sh(script: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 in `srv/` (QEMU's
/// server layout) and a client certificate in `cli/` (libnbd's layout).
fn make_certs(dir: &Path) {
    sh(
        r#"set -e
mkdir -p srv cli
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out srv/ca-cert.pem -days 2 -subj "/CN=hlfs test CA"
cp srv/ca-cert.pem cli/ca-cert.pem
openssl req -newkey rsa:2048 -nodes -keyout srv/server-key.pem -out server.csr -subj "/CN=localhost"
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA srv/ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out srv/server-cert.pem -days 2 -extfile server.ext
openssl req -newkey rsa:2048 -nodes -keyout cli/client-key.pem -out client.csr -subj "/CN=hlfs test client"
printf "extendedKeyUsage=clientAuth\n" > client.ext
openssl x509 -req -in client.csr -CA srv/ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out cli/client-cert.pem -days 2 -extfile client.ext
"#,
        dir,
    );
}

/// A running `hlfs serve`, killed when dropped.
struct Served {
    child: Child,
    uri: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(dir: &Path, extra: &[&str]) -> Served {
    let port = free_port().to_string();
    let vol = dir.join("v.hlfs");
    let mut args = vec!["serve", vol.to_str().unwrap(), "--create", "--size", "64M"];
    let listen = format!("127.0.0.1:{port}");
    args.extend(["--listen", &listen]);
    if !extra.contains(&"--tls-certs") {
        args.extend(["--tls-certs", "srv"]);
    }
    args.extend(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hlfs"))
        .args(&args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let uri = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server prints its URI");
    let uri = uri.trim().replace("127.0.0.1", "localhost");
    assert!(uri.starts_with("nbds://"), "{uri}");
    Served { child, uri }
}

/// Runs a client with a time limit; (success, stdout + stderr).
/// The port of an `nbds://HOST:PORT/EXPORT` URI.
fn port_of(uri: &str) -> &str {
    uri.split(':')
        .nth(2)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no port in {uri}"))
}

/// QEMU's `--object` for the client certificates in `dir`.
fn qemu_tls_creds(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    )
}

fn client(cmd: &str, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            return (status.success(), text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("{cmd} {args:?} did not finish in 30 s");
}

#[test]
fn tls_with_libnbd_and_qemu_and_refusal_of_plain_clients() {
    if !(have("openssl", "openssl")
        && have("nbdinfo", "libnbd-bin")
        && have("qemu-io", "qemu-utils"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let served = serve(dir.path(), &[]);
    let cli = dir.path().join("cli");
    let tls_uri = format!("{}?tls-certificates={}", served.uri, cli.display());
    let (ok, out) = client("nbdinfo", &[&tls_uri]);
    assert!(ok && out.contains("with TLS"), "{out}");

    let plain = served.uri.replacen("nbds://", "nbd://", 1);
    let (ok, out) = client("nbdinfo", &[&plain]);
    assert!(!ok, "a client without TLS must be refused: {out}");

    let port = port_of(&served.uri);
    let creds = qemu_tls_creds(&cli);
    let drive = format!("driver=nbd,server.type=inet,server.host=localhost,server.port={port},export=v.hlfs,tls-creds=tls0");
    let (ok, out) = client(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &drive,
            "-c",
            "write -P 0x42 4095 70000",
            "-c",
            "read -P 0x42 4095 70000",
        ],
    );
    assert!(ok && !out.contains("verification failed"), "{out}");
}

#[test]
fn tls_client_certificates_are_verified_when_asked() {
    if !(have("openssl", "openssl") && have("nbdinfo", "libnbd-bin")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let served = serve(dir.path(), &["--tls-verify-clients"]);
    // libnbd presents cli/client-cert.pem when the directory has one.
    let with_cert = format!(
        "{}?tls-certificates={}",
        served.uri,
        dir.path().join("cli").display()
    );
    let (ok, out) = client("nbdinfo", &[&with_cert]);
    assert!(ok, "{out}");
    // Only the CA, no client certificate: refused.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(dir.path().join("cli/ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    let without = format!("{}?tls-certificates={}", served.uri, bare.display());
    let (ok, out) = client("nbdinfo", &[&without]);
    assert!(!ok, "a client without a certificate must be refused: {out}");
}

/// Makes `srv-NAME/` (the CA, a server certificate for localhost made with
/// openssl, and the key `make_key` writes to key.pem) next to the CA that
/// `make_certs` made.
fn server_dir_with_key(dir: &Path, name: &str, make_key: &str) -> std::path::PathBuf {
    let srv = dir.join(format!("srv-{name}"));
    std::fs::create_dir(&srv).unwrap();
    sh(
        &format!(
            r#"set -e
cd srv-{name}
{make_key}
openssl req -new -key key.pem -out server.csr -subj "/CN=localhost"
openssl x509 -req -in server.csr -CA ../srv/ca-cert.pem -CAkey ../ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile ../server.ext
mv key.pem server-key.pem
cp ../srv/ca-cert.pem ca-cert.pem
"#
        ),
        dir,
    );
    srv
}

/// Server keys as operators make them, with openssl and with GnuTLS's
/// certtool (what QEMU's documentation uses): RSA of odd and large sizes,
/// ECDSA on each curve, Ed25519, in PKCS#1, PKCS#8 and SEC1. Each serves
/// libnbd and QEMU.
#[test]
fn server_keys_of_every_common_kind_and_maker_work() {
    if !(have("openssl", "openssl")
        && have("certtool", "gnutls-bin")
        && have("nbdinfo", "libnbd-bin")
        && have("qemu-img", "qemu-utils"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let cases = [
        (
            "openssl-rsa2048-pkcs8",
            "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out key.pem",
        ),
        (
            "openssl-rsa3072-pkcs1",
            "openssl genrsa -traditional -out key.pem 3072",
        ),
        (
            "openssl-rsa8192-pkcs8",
            "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:8192 -out key.pem",
        ),
        (
            "certtool-rsa2432-pkcs1",
            "certtool --generate-privkey --bits 2432 --outfile key.pem",
        ),
        (
            "certtool-rsa4096-pkcs1",
            "certtool --generate-privkey --bits 4096 --outfile key.pem",
        ),
        (
            "openssl-p256-sec1",
            "openssl ecparam -name prime256v1 -genkey -noout -out key.pem",
        ),
        (
            "openssl-p384-pkcs8",
            "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out key.pem",
        ),
        (
            "openssl-p521-sec1",
            "openssl ecparam -name secp521r1 -genkey -noout -out key.pem",
        ),
        (
            "certtool-p521-sec1",
            "certtool --generate-privkey --key-type ecdsa --curve secp521r1 --outfile key.pem",
        ),
        (
            "openssl-ed25519-pkcs8",
            "openssl genpkey -algorithm ed25519 -out key.pem",
        ),
        (
            "certtool-ed25519-pkcs8",
            "certtool --generate-privkey --key-type ed25519 --outfile key.pem",
        ),
    ];
    let cli = dir.path().join("cli");
    for (name, make_key) in cases {
        let srv = server_dir_with_key(dir.path(), name, make_key);
        let served = serve(dir.path(), &["--tls-certs", srv.to_str().unwrap()]);
        let tls_uri = format!("{}?tls-certificates={}", served.uri, cli.display());
        let (ok, out) = client("nbdinfo", &[&tls_uri]);
        assert!(ok && out.contains("with TLS"), "{name}, libnbd: {out}");
        let port = port_of(&served.uri);
        let creds = qemu_tls_creds(&cli);
        let image = format!("json:{{\"driver\":\"nbd\",\"server.type\":\"inet\",\"server.host\":\"localhost\",\"server.port\":\"{port}\",\"export\":\"v.hlfs\",\"tls-creds\":\"tls0\"}}");
        let (ok, out) = client("qemu-img", &["info", "--object", &creds, &image]);
        assert!(
            ok && out.contains("virtual size: 64 MiB"),
            "{name}, QEMU: {out}"
        );
    }
}

/// A key the server cannot use is refused before any volume is opened, and
/// the error names the file and says why.
#[test]
fn an_unusable_key_is_refused_by_name_before_any_volume_is_opened() {
    if !have("openssl", "openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let cases = [
        ("rsa1024", "openssl genrsa -traditional -out key.pem 1024", "kind or size"),
        (
            "encrypted",
            "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -aes256 -pass pass:secret -out key.pem",
            "encrypted",
        ),
        ("empty", ": > key.pem", "no private key"),
    ];
    for (name, make_key, why) in cases {
        let srv = dir.path().join(format!("srv-{name}"));
        std::fs::create_dir(&srv).unwrap();
        std::fs::copy(
            dir.path().join("srv/server-cert.pem"),
            srv.join("server-cert.pem"),
        )
        .unwrap();
        sh(
            &format!("cd srv-{name} && {make_key} && mv key.pem server-key.pem"),
            dir.path(),
        );
        let vol = dir.path().join(format!("{name}.hlfs"));
        let out = Command::new(env!("CARGO_BIN_EXE_hlfs"))
            .args(["serve", vol.to_str().unwrap(), "--create", "--size", "64M"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--tls-certs",
                srv.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("server-key.pem") && err.contains(why),
            "{name}: {err}"
        );
        assert!(
            !vol.exists(),
            "{name}: no volume is created before the key is checked"
        );
    }
}
