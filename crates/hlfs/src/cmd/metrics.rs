//! `hlfs serve --metrics ADDR`: Prometheus's text format at `/metrics`.
//!
//! Request metrics are recorded as requests are answered
//! (`hlfs_device::metrics`); everything else is read when Prometheus
//! scrapes, so nothing samples on a timer.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hlfs_nbd::Server;
use hlfs_volume::{Figures, StoreError, Volume};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `PORT` alone means loopback: metrics are not for the network unless
/// asked.
pub fn listen_address(arg: &str) -> String {
    match arg.parse::<u16>() {
        Ok(port) => format!("127.0.0.1:{port}"),
        Err(_) => arg.to_string(),
    }
}

/// What the served volumes and the server say when scraped.
pub struct Served {
    pub server: Arc<Server>,
    /// (export name, volume) of each export opened at start.
    pub volumes: Vec<(String, Volume)>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field(
                "exports",
                &self.volumes.iter().map(|(e, _)| e).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One metric with one sample per export.
fn per_export<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl Iterator<Item = (Vec<(&'static str, String)>, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Served {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let figures: Vec<(&String, Figures)> =
            self.volumes.iter().map(|(e, v)| (e, v.figures())).collect();
        let label = |export: &String| vec![("export", export.clone())];
        // One sample per export of a figure, as a gauge or a counter.
        let figure = |encoder: &mut DescriptorEncoder,
                      kind: MetricType,
                      name: &str,
                      help: &str,
                      value: fn(&Figures) -> u64|
         -> std::fmt::Result {
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for (export, f) in &figures {
                let labels = label(export);
                let sample = metric.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(f)).encode(sample)?,
                    _ => ConstGauge::new(value(f) as i64).encode(sample)?,
                }
            }
            Ok(())
        };
        per_export(
            &mut encoder,
            "hlfs_nbd_connections",
            "Clients connected to the export now",
            MetricType::Gauge,
            figures.iter().map(|(e, _)| {
                let n = self.server.connections_to(e) as i64;
                (label(e), ConstGauge::new(n))
            }),
        )?;
        figure(
            &mut encoder,
            MetricType::Gauge,
            "hlfs_volume_size_bytes",
            "The volume's size",
            |f| f.size_bytes,
        )?;
        figure(
            &mut encoder,
            MetricType::Gauge,
            "hlfs_volume_allocated_bytes",
            "Bytes of the volume that hold data (not holes)",
            |f| f.allocated_bytes,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_volume_written_bytes",
            "Data bytes clients wrote since the server opened the volume",
            |f| f.written_bytes,
        )?;
        figure(&mut encoder, MetricType::Counter,
            "hlfs_log_appended_bytes",
            "Bytes appended to the volume's log (records, map pages, checkpoints) since it was opened; divided by hlfs_volume_written_bytes_total, the write amplification",
            |f| f.log_appended_bytes,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_flushes",
            "Flushes that had writes to make durable",
            |f| f.flushes,
        )?;
        figure(&mut encoder, MetricType::Counter,
            "hlfs_journal_syncs",
            "Journal syncs that flushes waited for; hlfs_flushes_total divided by it is the group-commit batch size",
            |f| f.journal_syncs,
        )?;
        per_export(
            &mut encoder,
            "hlfs_journal_sync_seconds",
            "Time spent in the journal syncs that flushes waited for",
            MetricType::Counter,
            figures
                .iter()
                .map(|(e, f)| (label(e), ConstCounter::new(f.journal_sync_seconds))),
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_journal_prewritten_bytes",
            "Zeros written ahead of the journal's log under synced load, so that flushes' syncs commit no file size",
            |f| f.journal_prewritten_bytes,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_view_reopens",
            "Times a read-only export reopened at the newest manifest because the volume's writer cleaned away segments it read",
            |f| f.view_reopens,
        )?;
        figure(
            &mut encoder,
            MetricType::Gauge,
            "hlfs_upload_backlog_segments",
            "Sealed segments waiting to be stored",
            |f| f.upload_backlog_segments,
        )?;
        figure(
            &mut encoder,
            MetricType::Gauge,
            "hlfs_upload_backlog_limit_segments",
            "Sealed segments that may wait before writes wait for the store",
            |f| f.upload_backlog_limit,
        )?;
        figure(
            &mut encoder,
            MetricType::Gauge,
            "hlfs_map_pages",
            "Block-map pages in memory now (in the page cache the volume uses)",
            |f| f.map_pages,
        )?;
        figure(
            &mut encoder,
            MetricType::Gauge,
            "hlfs_map_page_limit",
            "Block-map pages the memory budget allows",
            |f| f.map_page_limit,
        )?;
        figure(&mut encoder, MetricType::Counter,
            "hlfs_map_page_hits",
            "Block-map page lookups that found the page in memory; an operation that had to read a page looks the pages above it up again (the page cache may be shared by several exports)",
            |f| f.map_page_hits,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_map_page_misses",
            "Block-map pages read from the log because they were not in memory",
            |f| f.map_page_misses,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_gc_runs",
            "Cleaning runs finished since the server opened the volume (asked for with hlfs gc, or by the automatic cleaner)",
            |f| f.gc_runs,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_gc_passes",
            "Cleaning passes: each copies what is live out of its victims and commits with a checkpoint",
            |f| f.gc_passes,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_gc_deleted_segments",
            "Segments cleaning deleted",
            |f| f.gc_deleted_segments,
        )?;
        figure(
            &mut encoder,
            MetricType::Counter,
            "hlfs_gc_freed_bytes",
            "Bytes of the segments cleaning deleted",
            |f| f.gc_freed_bytes,
        )?;
        figure(&mut encoder, MetricType::Counter,
            "hlfs_gc_copied_bytes",
            "Live bytes cleaning copied to empty its victims; divided by hlfs_gc_freed_bytes_total, what each byte given back cost",
            |f| f.gc_copied_bytes,
        )?;
        let cached = || {
            figures
                .iter()
                .filter_map(|(e, f)| f.read_cache.as_ref().map(|c| (label(e), c)))
        };
        per_export(
            &mut encoder,
            "hlfs_read_cache_hits",
            "Reads of a remote volume served wholly from the local read cache (shared by the volumes on one cache directory)",
            MetricType::Counter,
            cached().map(|(l, c)| (l, ConstCounter::new(c.hits))),
        )?;
        per_export(
            &mut encoder,
            "hlfs_read_cache_misses",
            "Reads of a remote volume that found a chunk missing from the read cache (and fetched it, or waited for a fetch under way)",
            MetricType::Counter,
            cached().map(|(l, c)| (l, ConstCounter::new(c.misses))),
        )?;
        per_export(
            &mut encoder,
            "hlfs_read_cache_bytes",
            "Bytes of segments in the local read cache",
            MetricType::Gauge,
            cached().map(|(l, c)| (l, ConstGauge::new(c.bytes as i64))),
        )?;
        let store = || self.volumes.iter().map(|(e, v)| (e, v.store_counts()));
        let mut requests = encoder.encode_descriptor(
            "hlfs_store_requests",
            "Requests made to the volume's store, by kind",
            None,
            MetricType::Counter,
        )?;
        for (export, c) in store() {
            for (kind, n) in [
                ("put", c.puts),
                ("get", c.gets),
                ("head", c.heads),
                ("list", c.lists),
                ("delete", c.deletes),
            ] {
                let labels = vec![("export", export.clone()), ("kind", kind.to_string())];
                ConstCounter::new(n).encode(requests.encode_family(&labels)?)?;
            }
        }
        let mut bytes = encoder.encode_descriptor(
            "hlfs_store_bytes",
            "Bytes put to and got from the volume's store",
            None,
            MetricType::Counter,
        )?;
        for (export, c) in store() {
            for (direction, n) in [("put", c.put_bytes), ("get", c.get_bytes)] {
                let labels = vec![
                    ("export", export.clone()),
                    ("direction", direction.to_string()),
                ];
                ConstCounter::new(n).encode(bytes.encode_family(&labels)?)?;
            }
        }
        let mut errors = encoder.encode_descriptor(
            "hlfs_store_errors",
            "Requests to the volume's store that failed, by kind of error (each attempt counts; already_exists and not_found are often answers the engine expects)",
            None,
            MetricType::Counter,
        )?;
        for (export, c) in store() {
            for (kind, n) in StoreError::KIND_NAMES.iter().zip(c.failures_by_kind) {
                let labels = vec![("export", export.clone()), ("kind", kind.to_string())];
                ConstCounter::new(n).encode(errors.encode_family(&labels)?)?;
            }
        }
        per_export(
            &mut encoder,
            "hlfs_store_retries",
            "Requests to the volume's store tried again after a failure",
            MetricType::Counter,
            store().map(|(e, c)| (label(e), ConstCounter::new(c.retries))),
        )?;
        Ok(())
    }
}

/// Largest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 << 10;

/// Serves `registry` at `GET /metrics` on `listener` until dropped. One
/// request per connection, read within 10 s; anything else gets a 404 or
/// a 400.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let answered =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &registry)).await;
            if let Ok(Err(e)) = answered {
                tracing::debug!(error = %e, "metrics request");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "bad request\n",
            )
            .await;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    if method != Some(b"GET") || !matches!(path, Some(b"/metrics" | b"/metrics/")) {
        return respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await;
    }
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        .context("encoding the metrics")?;
    respond(
        &mut stream,
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        &text,
    )
    .await
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await?;
    Ok(())
}

/// Binds the metrics listener.
pub async fn bind(arg: &str) -> Result<TcpListener> {
    let addr = listen_address(arg);
    TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::listen_address;

    #[test]
    fn a_port_alone_means_loopback() {
        assert_eq!(listen_address("9100"), "127.0.0.1:9100");
        assert_eq!(listen_address("0.0.0.0:9100"), "0.0.0.0:9100");
        assert_eq!(listen_address("[::1]:9100"), "[::1]:9100");
    }
}
