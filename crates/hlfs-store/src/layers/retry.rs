//! Retrying transient failures: the one place where store requests are
//! tried again.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::StoreMetrics;
use crate::time::{Backoff, Clock, Jitter};
use crate::{BlobMeta, BlobStore, Result, StoreError};

/// How long and how patiently a request is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first pause; each next one doubles, up to `max` (with jitter).
    pub first: Duration,
    pub max: Duration,
    /// Give up once the next pause would end past this much time since the
    /// first attempt; `None` retries until the store takes the request.
    pub budget: Option<Duration>,
    /// Which errors are tried again.
    pub retry: Retry,
}

/// Which errors a [`Retrying`] store tries again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Only those the store calls transient ([`StoreError::is_transient`]).
    Transient,
    /// Every failure of the store or the disk to do the request
    /// ([`StoreError::is_failure`]): a local disk that is full or failing
    /// may come back too, and what must get there anyway (uploads) waits.
    Failures,
}

impl Retry {
    fn applies_to(self, error: &StoreError) -> bool {
        match self {
            Retry::Transient => error.is_transient(),
            Retry::Failures => error.is_failure(),
        }
    }
}

impl RetryPolicy {
    pub const FIRST_PAUSE: Duration = Duration::from_millis(100);
    pub const MAX_PAUSE: Duration = Duration::from_secs(5);

    /// Retries transient failures for at most `budget`, then the last
    /// error surfaces.
    pub fn within(budget: Duration) -> RetryPolicy {
        RetryPolicy {
            first: Self::FIRST_PAUSE,
            max: Self::MAX_PAUSE,
            budget: Some(budget),
            retry: Retry::Transient,
        }
    }

    /// Retries every failure until the store takes the request.
    pub fn until_done() -> RetryPolicy {
        RetryPolicy {
            budget: None,
            retry: Retry::Failures,
            ..Self::within(Duration::ZERO)
        }
    }
}

/// A run of transient failures seen through one [`Retrying`] store: since
/// when (on its clock), and the latest. It ends at the next success. Those
/// who wait on the store read it to know how long it has been away.
#[derive(Debug, Default)]
pub struct Outage {
    state: Mutex<Option<(Duration, String)>>,
}

impl Outage {
    /// When the current outage began, on the store's clock.
    pub fn since(&self) -> Option<Duration> {
        self.state.lock().as_ref().map(|(since, _)| *since)
    }

    /// The latest failure of the current outage.
    pub fn why(&self) -> Option<String> {
        self.state.lock().as_ref().map(|(_, why)| why.clone())
    }

    /// Records a failure; true if it starts an outage.
    fn failed(&self, now: Duration, why: String) -> bool {
        let mut state = self.state.lock();
        let began = state.is_none();
        let since = state.as_ref().map_or(now, |(since, _)| *since);
        *state = Some((since, why));
        began
    }

    fn ended(&self) {
        self.state.lock().take();
    }
}

/// A store whose failed requests are retried, as its policy says, with
/// growing, jittered pauses on the given clock. Other errors return at
/// once.
pub struct Retrying {
    inner: Arc<dyn BlobStore>,
    policy: RetryPolicy,
    clock: Clock,
    jitter: Jitter,
    outage: Option<Arc<Outage>>,
    metrics: Option<Arc<StoreMetrics>>,
}

impl Retrying {
    pub fn new(
        inner: Arc<dyn BlobStore>,
        policy: RetryPolicy,
        clock: Clock,
        jitter: Jitter,
    ) -> Retrying {
        Retrying {
            inner,
            policy,
            clock,
            jitter,
            outage: None,
            metrics: None,
        }
    }

    /// Counts each retry into `metrics`.
    pub fn counting_in(mut self, metrics: Arc<StoreMetrics>) -> Retrying {
        self.metrics = Some(metrics);
        self
    }

    /// Reports failures and recoveries to `outage`.
    pub fn reporting_to(mut self, outage: Arc<Outage>) -> Retrying {
        self.outage = Some(outage);
        self
    }

    async fn retry<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = self.clock.now();
        let mut backoff = Backoff::new(self.policy.first, self.policy.max, self.jitter.clone());
        loop {
            let error = match attempt().await {
                Ok(value) => {
                    if let Some(outage) = &self.outage {
                        outage.ended();
                    }
                    return Ok(value);
                }
                Err(e) if self.policy.retry.applies_to(&e) => e,
                Err(e) => return Err(e),
            };
            let pause = backoff.next_pause();
            let now = self.clock.now();
            if let Some(budget) = self.policy.budget {
                if now.saturating_sub(started) + pause > budget {
                    return Err(error);
                }
            }
            let began = match &self.outage {
                Some(outage) => outage.failed(now, format!("{what}: {error}")),
                None => false,
            };
            if began {
                tracing::warn!(store = %self.inner.describe(), error = %error, "{what} failed; retrying until the store takes it");
            } else {
                tracing::debug!(store = %self.inner.describe(), error = %error, ?pause, "{what} failed; retrying");
            }
            if let Some(metrics) = &self.metrics {
                metrics.count_retry();
            }
            self.clock.sleep(pause).await;
        }
    }
}

impl fmt::Debug for Retrying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrying")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

#[async_trait]
impl BlobStore for Retrying {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        let what = format!("storing {name}");
        self.retry(&what, || self.inner.put_if_absent(name, data.clone()))
            .await
    }

    async fn put_file_if_absent(&self, name: &str, path: &Path) -> Result<()> {
        let what = format!("storing {name}");
        self.retry(&what, || self.inner.put_file_if_absent(name, path))
            .await
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        let what = format!("reading {name}");
        self.retry(&what, || self.inner.get_range(name, offset, len))
            .await
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        let what = format!("looking up {name}");
        self.retry(&what, || self.inner.head(name)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let what = format!("listing {prefix}");
        self.retry(&what, || self.inner.list(prefix)).await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let what = format!("deleting {name}");
        self.retry(&what, || self.inner.delete(name)).await
    }

    async fn sweep_leftovers(&self) -> Result<u64> {
        self.retry("sweeping leftovers", || self.inner.sweep_leftovers())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{Fault, FaultOp, Faults, Metered};
    use crate::time::ManualClock;
    use crate::{MemEnv, StoreError};

    /// Lets the spawned request run until it sleeps.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_on_the_clock_within_the_budget() {
        let manual = ManualClock::new(0);
        let faults = Faults::new();
        let metrics = Arc::new(StoreMetrics::default());
        let store = Arc::new(
            Retrying::new(
                Arc::new(Metered::new(
                    faults.store(MemEnv::new().store()),
                    metrics.clone(),
                )),
                RetryPolicy::within(Duration::from_secs(2)),
                manual.clock(),
                Jitter::seeded(5),
            )
            .reporting_to(Arc::new(Outage::default()))
            .counting_in(metrics.clone()),
        );
        faults.inject(Fault {
            op: FaultOp::Put,
            name_prefix: String::new(),
            remaining: Some(3),
        });
        let put = tokio::spawn({
            let store = store.clone();
            async move { store.put_if_absent("a", Bytes::new()).await }
        });
        // Three failures, then success: pauses of about 0.1, 0.2 and 0.4 s.
        let mut waited = Duration::ZERO;
        while !put.is_finished() {
            settle().await;
            manual.advance(Duration::from_millis(10));
            waited += Duration::from_millis(10);
            assert!(waited < Duration::from_secs(2), "never succeeded");
        }
        put.await.unwrap().unwrap();
        assert!(
            waited >= Duration::from_millis(520) && waited <= Duration::from_millis(900),
            "{waited:?}"
        );
        // Each failure counted by kind below, each retry above.
        let counts = metrics.counts();
        assert_eq!((counts.puts, counts.retries), (4, 3), "{counts:?}");
        assert_eq!(counts.failures_by_kind[7], 3, "unavailable: {counts:?}");
        // Not retried: an error trying again cannot fix.
        assert!(matches!(
            store.put_if_absent("a", Bytes::new()).await,
            Err(StoreError::AlreadyExists(_))
        ));
        // Forever failing: the budget ends it, with the store's error.
        faults.inject(Fault {
            op: FaultOp::Head,
            name_prefix: String::new(),
            remaining: None,
        });
        let head = tokio::spawn({
            let store = store.clone();
            async move { store.head("a").await }
        });
        while !head.is_finished() {
            settle().await;
            manual.advance(Duration::from_millis(50));
        }
        assert!(matches!(
            head.await.unwrap(),
            Err(StoreError::Unavailable(_))
        ));
        assert!(manual.now() <= Duration::from_millis(900 + 2050));
    }

    #[tokio::test]
    async fn an_outage_is_reported_from_its_first_failure_to_the_next_success() {
        let manual = ManualClock::new(0);
        let faults = Faults::new();
        let outage = Arc::new(Outage::default());
        let store = Arc::new(
            Retrying::new(
                faults.store(MemEnv::new().store()),
                RetryPolicy::until_done(),
                manual.clock(),
                Jitter::seeded(1),
            )
            .reporting_to(outage.clone()),
        );
        faults.inject(Fault {
            op: FaultOp::Put,
            name_prefix: String::new(),
            remaining: None,
        });
        manual.advance(Duration::from_secs(7));
        let put = tokio::spawn({
            let store = store.clone();
            async move { store.put_if_absent("x", Bytes::new()).await }
        });
        settle().await;
        assert_eq!(outage.since(), Some(Duration::from_secs(7)));
        for _ in 0..100 {
            manual.advance(Duration::from_secs(1));
            settle().await;
        }
        assert!(!put.is_finished(), "retries until the store takes it");
        assert_eq!(outage.since(), Some(Duration::from_secs(7)));
        assert!(outage.why().unwrap().contains("injected fault"));
        faults.clear();
        manual.advance(Duration::from_secs(6));
        put.await.unwrap().unwrap();
        assert_eq!(outage.since(), None);
    }
}
