//! What each export's NBD requests cost: counts, bytes, errors and latency
//! by operation, recorded by [`VolumeDevice`](crate::VolumeDevice) and
//! exposed by `hlfs serve --metrics` in Prometheus's text format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The operations a device serves, as they are labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

const OPS: [Op; 6] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::BlockStatus,
];

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    export: String,
    op: String,
}

/// 50 µs to about 13 s, by fours.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 4.0, 10))
}

/// The request metrics of every export of a server.
pub struct RequestMetrics {
    requests: Family<OpLabels, Counter>,
    bytes: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
}

impl RequestMetrics {
    /// New metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> RequestMetrics {
        let m = RequestMetrics {
            requests: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "hlfs_nbd_requests",
            "NBD requests answered, by export and operation",
            m.requests.clone(),
        );
        registry.register(
            "hlfs_nbd_request_bytes",
            "Bytes read or written by NBD requests, by export and operation",
            m.bytes.clone(),
        );
        registry.register(
            "hlfs_nbd_request_errors",
            "NBD requests answered with an error, by export and operation",
            m.errors.clone(),
        );
        registry.register(
            "hlfs_nbd_request_duration_seconds",
            "Time from a request's start in the engine to its answer, by export and operation",
            m.seconds.clone(),
        );
        m
    }

    /// The handles one export records into.
    pub fn for_export(&self, export: &str) -> ExportMetrics {
        let ops = OPS.map(|op| {
            let labels = OpLabels {
                export: export.to_string(),
                op: op.label().to_string(),
            };
            OpMetrics {
                requests: self.requests.get_or_create(&labels).clone(),
                bytes: self.bytes.get_or_create(&labels).clone(),
                errors: self.errors.get_or_create(&labels).clone(),
                seconds: self.seconds.get_or_create(&labels).clone(),
            }
        });
        ExportMetrics { ops }
    }
}

struct OpMetrics {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    seconds: Histogram,
}

/// One export's request metrics.
pub struct ExportMetrics {
    ops: [OpMetrics; OPS.len()],
}

impl ExportMetrics {
    pub(crate) fn record(&self, op: Op, bytes: u64, ok: bool, took: Duration) {
        let m = &self.ops[OPS
            .iter()
            .position(|&o| o == op)
            .expect("every op is listed")];
        m.requests.inc();
        if ok {
            m.bytes.inc_by(bytes);
        } else {
            m.errors.inc();
        }
        m.seconds.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_op_records_into_its_own_series() {
        assert!(OPS.iter().enumerate().all(|(i, &op)| op as usize == i));
        let mut registry = Registry::default();
        let metrics = RequestMetrics::register(&mut registry);
        let export = metrics.for_export("vm");
        export.record(Op::Trim, 4096, true, Duration::from_micros(80));
        export.record(Op::Write, 512, false, Duration::from_micros(80));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            r#"hlfs_nbd_requests_total{export="vm",op="trim"} 1"#,
            r#"hlfs_nbd_request_bytes_total{export="vm",op="trim"} 4096"#,
            r#"hlfs_nbd_request_errors_total{export="vm",op="write"} 1"#,
            r#"hlfs_nbd_request_bytes_total{export="vm",op="write"} 0"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
    }
}
