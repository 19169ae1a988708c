//! Layers: stores that wrap any other store (and journal area) to add one
//! concern, so that the engine and every backend stay free of it.
//!
//! - [`Retrying`]: retries failed requests with backoff and jitter, for a
//!   time budget or until the store takes the request. The only place
//!   where store requests are retried.
//! - [`Metered`]: counts requests and bytes ([`StoreMetrics`]).
//! - [`Faults`]: for tests, around any store and journal: injected errors,
//!   latency, a crash point at the n-th durable operation, and the image a
//!   power cut would leave.
//!
//! A volume's stack, from the engine down: `Retrying` (remote stores only)
//! over `Faults` (tests only) over `Metered` over the backend itself, so
//! the counts are of requests that reached the store.

mod faults;
mod metered;
mod retry;

pub use faults::{is_power_cut, CrashMode, Fault, FaultOp, Faults};
pub use metered::{Metered, StoreCounts, StoreMetrics};
pub use retry::{Outage, Retry, RetryPolicy, Retrying};
