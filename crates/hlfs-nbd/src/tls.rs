//! TLS as QEMU and libnbd set it up: a directory holding `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem` (QEMU's `tls-creds-x509` layout).
//!
//! The crypto is aws-lc's, which takes the keys operators have: RSA of
//! 2048 to 8192 bits (whatever the sizes of its primes), ECDSA on P-256,
//! P-384 and P-521, and Ed25519, in PKCS#1, PKCS#8 or SEC1 PEM.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
pub use tokio_rustls::TlsAcceptor;

/// The keys that work, for messages about one that does not.
const KEYS_THAT_WORK: &str = "RSA of 2048 to 8192 bits, ECDSA on P-256, P-384 or P-521, or Ed25519, unencrypted, in PKCS#1, PKCS#8 or SEC1 PEM";

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The private key in `path`, checked to be one the TLS library can sign
/// with. Errors name the file and say why.
fn key(path: &Path, provider: &CryptoProvider) -> Result<PrivateKeyDer<'static>, String> {
    let refused = |why: String| format!("{}: {why}; use {KEYS_THAT_WORK}", path.display());
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if String::from_utf8_lossy(&text).contains("ENCRYPTED") {
        return Err(refused(
            "the key is encrypted (decrypt it first, e.g. with openssl pkey)".into(),
        ));
    }
    let key = match PrivateKeyDer::from_pem_slice(&text) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(refused("no private key found".into())),
        Err(e) => return Err(refused(format!("cannot read the key: {e}"))),
    };
    let format = match &key {
        PrivateKeyDer::Pkcs1(_) => "PKCS#1 RSA",
        PrivateKeyDer::Sec1(_) => "SEC1 EC",
        PrivateKeyDer::Pkcs8(_) => "PKCS#8",
        _ => "unknown",
    };
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            refused(format!(
                "a {format} key of a kind or size TLS cannot use ({e})"
            ))
        })?;
    Ok(key)
}

/// A TLS acceptor from the certificates in `dir`. With `verify_clients`,
/// clients must present a certificate signed by `ca-cert.pem`.
pub fn acceptor_from_dir(dir: &Path, verify_clients: bool) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert_path = dir.join("server-cert.pem");
    let chain = certs(&cert_path)?;
    let key_path = dir.join("server-key.pem");
    let key = key(&key_path, &provider)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if verify_clients {
        let mut roots = RootCertStore::empty();
        for ca in certs(&dir.join("ca-cert.pem"))? {
            roots.add(ca).map_err(|e| format!("ca-cert.pem: {e}"))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{} and {}: {e} (is the certificate for this key?)",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
