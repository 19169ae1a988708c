//! Blobs in an S3-compatible object store (AWS S3, Ceph RGW, MinIO).
//!
//! Atomic create is a conditional PUT (`If-None-Match: *`). Endpoint,
//! region and credentials come from the environment as the AWS tools read
//! them (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, ...); they are never printed. Requests use
//! path-style addressing, which every S3-compatible engine understands.
//!
//! Each call makes one attempt: failed requests are retried by the
//! [`crate::layers::Retrying`] layer around the store, so that retries
//! happen in one place only.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::{validate_blob_name, BlobMeta, BlobStore, Result, StoreError};

/// A bucket and a key prefix, e.g. `s3://bucket/volumes/vm1`.
pub struct S3Store {
    client: AmazonS3,
    bucket: String,
    /// Key prefix without leading or trailing slashes; may be empty.
    prefix: String,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The store's error for a failed request about `what`: refusals that
/// trying again cannot fix (access denied, an unsupported request, a client
/// error status), configuration mistakes, and everything else (lost
/// connections, timeouts, throttling, server errors) as `Unavailable`, to
/// be retried.
fn classify(what: &str, e: object_store::Error) -> StoreError {
    use object_store::Error as E;
    let message = format!("{what}: {e}");
    match e {
        E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. } => StoreError::Refused(message),
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => StoreError::Invalid(message),
        E::Generic { .. } if status_of(&message).is_some_and(is_final_status) => {
            StoreError::Refused(message)
        }
        _ => StoreError::Unavailable(message),
    }
}

/// The HTTP status an error message reports, if any.
fn status_of(message: &str) -> Option<u16> {
    let (_, after) = message.split_once("status code: ")?;
    after.get(..3)?.parse().ok()
}

/// A client error that the same request will meet again: any 4xx but a
/// timeout (408), a conflict with a request in flight (409) and throttling
/// (429).
fn is_final_status(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 409 | 429)
}

/// Settings of one profile (`AWS_PROFILE`, else `default`) from the AWS
/// shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
/// `~/.aws/credentials`) and config file (`AWS_CONFIG_FILE`, else
/// `~/.aws/config`); the credentials file wins.
#[derive(Debug, Default)]
struct SharedConfig {
    values: Vec<(String, String)>,
}

impl SharedConfig {
    fn load() -> SharedConfig {
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
        let file = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(std::path::PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(default)))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default()
        };
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        let credentials = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
        let config = file("AWS_CONFIG_FILE", ".aws/config");
        let mut values = ini_section(&credentials, &profile);
        // The config file names profiles `[profile NAME]`, except `[default]`.
        let section = match profile.as_str() {
            "default" => "default".to_string(),
            name => format!("profile {name}"),
        };
        values.extend(ini_section(&config, &section));
        SharedConfig { values }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The `key = value` lines of `[section]` in an INI text, in order.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            // `[name]`, perhaps followed by a comment.
            inside = header
                .split_once(']')
                .is_some_and(|(name, _)| name.trim() == section);
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

impl S3Store {
    /// Parses `s3://BUCKET[/PREFIX]` and builds a client from the
    /// environment. Each request is made once: wrap the store in
    /// [`crate::layers::Retrying`] to retry.
    pub fn from_uri(uri: &str) -> Result<S3Store> {
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| StoreError::Invalid(format!("{uri:?} is not an s3:// address")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Invalid(format!("{uri:?} names no bucket")));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // Hashing every payload for the signature cost more CPU than
            // anything else in an upload, on both ends. What HLFS stores
            // carries its own CRC32Cs, checked on every read.
            .with_unsigned_payload(true)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            });
        // What the environment leaves unset comes from the AWS shared
        // files, as the AWS tools read them.
        let shared = SharedConfig::load();
        let unset = |var: &str| std::env::var_os(var).is_none();
        if unset("AWS_ACCESS_KEY_ID") {
            if let (Some(id), Some(secret)) = (
                shared.get("aws_access_key_id"),
                shared.get("aws_secret_access_key"),
            ) {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = shared.get("aws_session_token") {
                    builder = builder.with_token(token);
                }
            }
        }
        if unset("AWS_REGION") && unset("AWS_DEFAULT_REGION") {
            if let Some(region) = shared.get("region") {
                builder = builder.with_region(region);
            }
        }
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok()
            .or_else(|| shared.get("endpoint_url").map(str::to_string));
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        let client = builder
            .build()
            .map_err(|e| StoreError::Invalid(format!("configuring S3: {e}")))?;
        Ok(S3Store {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The store-relative name of a listed key.
    fn name_of(&self, key: &ObjectPath) -> Option<String> {
        let key = key.as_ref();
        if self.prefix.is_empty() {
            return Some(key.to_string());
        }
        key.strip_prefix(&self.prefix)?
            .strip_prefix('/')
            .map(str::to_string)
    }

    fn map_err(&self, name: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(name.to_string()),
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => {
                StoreError::AlreadyExists(name.to_string())
            }
            e => classify(&format!("s3://{}/{}", self.bucket, self.key(name)), e),
        }
    }
}

#[async_trait]
impl BlobStore for S3Store {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        validate_blob_name(name)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.client
            .put_opts(&self.key(name), PutPayload::from_bytes(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.map_err(name, e))
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_blob_name(name)?;
        let out_of_range = |size| StoreError::out_of_range(name, offset, len, size);
        let end = offset.checked_add(len).ok_or_else(|| out_of_range(0))?;
        if len == 0 {
            // Still an error for a missing blob or an offset past its end.
            let size = self
                .head(name)
                .await?
                .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
            return if offset <= size {
                Ok(Bytes::new())
            } else {
                Err(out_of_range(size))
            };
        }
        // One request: the answer says how big the object is, and a range
        // running past its end comes back short.
        let opts = GetOptions {
            range: Some(GetRange::Bounded(offset..end)),
            ..GetOptions::default()
        };
        let got = match self.client.get_opts(&self.key(name), opts).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(name.to_string()))
            }
            // A range starting past the end is refused: say so if that is it.
            Err(e) => {
                return match self.head(name).await? {
                    Some(size) if end > size => Err(out_of_range(size)),
                    None => Err(StoreError::NotFound(name.to_string())),
                    Some(_) => Err(self.map_err(name, e)),
                }
            }
        };
        let size = got.meta.size;
        let data = got.bytes().await.map_err(|e| self.map_err(name, e))?;
        if data.len() as u64 != len {
            return Err(out_of_range(size));
        }
        Ok(data)
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        validate_blob_name(name)?;
        match self.client.head(&self.key(name)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.map_err(name, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        // Keys are listed by directory; a prefix ending mid-name lists its
        // directory and filters.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let dir_key = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ObjectPath::from(dir)),
            (false, true) => Some(ObjectPath::from(self.prefix.as_str())),
            (false, false) => Some(ObjectPath::from(format!("{}/{dir}", self.prefix))),
        };
        let listed: Vec<_> = self
            .client
            .list(dir_key.as_ref())
            .try_collect()
            .await
            .map_err(|e| match e {
                // No bucket: nothing is there.
                object_store::Error::NotFound { .. } => StoreError::NotFound(prefix.to_string()),
                e => classify(&format!("listing {}/{prefix}", self.describe()), e),
            })?;
        let mut out: Vec<BlobMeta> = listed
            .into_iter()
            .filter_map(|meta| {
                let name = self.name_of(&meta.location)?;
                name.starts_with(prefix).then_some(BlobMeta {
                    name,
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_blob_name(name)?;
        match self.client.delete(&self.key(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(name, e)),
        }
    }

    /// Each put is one request, whole or absent: nothing is left over.
    async fn sweep_leftovers(&self) -> Result<u64> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, ini_section};
    use crate::StoreError;

    #[test]
    fn client_errors_are_final_and_the_rest_retried() {
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        };
        let kind = |text: &str| classify("s3://b/k", generic(text));
        let status = |code: &str| {
            kind(&format!(
                "Error performing PUT http://127.0.0.1:7480/b/k in 3ms - Server returned non-2xx status code: {code}: <Error/>"
            ))
        };
        assert!(matches!(status("400 Bad Request"), StoreError::Refused(_)));
        assert!(matches!(status("404 Not Found"), StoreError::Refused(_)));
        for transient in [
            "408 Request Timeout",
            "409 Conflict",
            "429 Too Many Requests",
            "500 Internal Server Error",
            "503 Slow Down",
        ] {
            assert!(
                matches!(status(transient), StoreError::Unavailable(_)),
                "{transient}"
            );
        }
        assert!(matches!(
            kind("Error performing GET http://127.0.0.1:7480/b/k in 3ms - error sending request: connection refused"),
            StoreError::Unavailable(_)
        ));
        let denied = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: "403".to_string().into(),
        };
        assert!(matches!(
            classify("s3://b/k", denied),
            StoreError::Refused(_)
        ));
    }

    #[test]
    fn shared_files_are_read_by_profile() {
        let text = "# comment\n[default]\naws_access_key_id = AKID\nAWS_Secret_Access_Key=s3cr=t\n\n[profile ceph] # the lab\nregion = eu\nendpoint_url = http://127.0.0.1:7480\n[other]\nregion = us\n";
        let default = ini_section(text, "default");
        assert_eq!(
            default,
            [
                ("aws_access_key_id".to_string(), "AKID".to_string()),
                ("aws_secret_access_key".to_string(), "s3cr=t".to_string())
            ]
        );
        let ceph = ini_section(text, "profile ceph");
        assert_eq!(ceph.len(), 2);
        assert_eq!(ceph[1].1, "http://127.0.0.1:7480");
        assert!(ini_section(text, "missing").is_empty());
        assert!(ini_section("garbage [ without = end", "default").is_empty());
    }
}
