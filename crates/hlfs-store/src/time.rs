//! Time and chance, passed in.
//!
//! The engine and the store layers read the time, sleep and draw random
//! jitter only through a [`Clock`] and a [`Jitter`] they are given. In
//! production these are the system's; a test passes a [`ManualClock`] and a
//! seeded [`Jitter`], moves time itself and replays a schedule exactly,
//! without sleeping.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

/// A source of time: the system's, or one a test moves by hand. Cheap to
/// clone; clones read the same time.
#[derive(Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Clone)]
enum Source {
    System { origin: std::time::Instant },
    Manual(Arc<Manual>),
}

struct Manual {
    /// Time since the clock started; sleepers watch it.
    now: watch::Sender<Duration>,
    start_unix_ms: u64,
}

/// The clock's `timeout` ran out before the operation finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl Clock {
    /// The system's clock: tokio's timers and the wall clock.
    pub fn system() -> Clock {
        Clock {
            source: Source::System {
                origin: std::time::Instant::now(),
            },
        }
    }

    /// Time since the clock started. It never goes back.
    pub fn now(&self) -> Duration {
        match &self.source {
            Source::System { origin } => origin.elapsed(),
            Source::Manual(m) => *m.now.borrow(),
        }
    }

    /// Wall-clock time in milliseconds since the Unix epoch, for what is
    /// recorded (manifest and snapshot times).
    pub fn unix_ms(&self) -> u64 {
        match &self.source {
            Source::System { .. } => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            Source::Manual(m) => m.start_unix_ms + m.now.borrow().as_millis() as u64,
        }
    }

    /// Waits until `duration` has passed on this clock.
    pub async fn sleep(&self, duration: Duration) {
        match &self.source {
            Source::System { .. } => tokio::time::sleep(duration).await,
            Source::Manual(m) => {
                let deadline = *m.now.borrow() + duration;
                let mut now = m.now.subscribe();
                // The sender lives as long as the clock: this cannot fail.
                let _ = now.wait_for(|t| *t >= deadline).await;
            }
        }
    }

    /// Runs `future`, giving up once `duration` has passed on this clock.
    pub async fn timeout<F: Future>(
        &self,
        duration: Duration,
        future: F,
    ) -> Result<F::Output, Elapsed> {
        tokio::select! {
            biased;
            out = future => Ok(out),
            () = self.sleep(duration) => Err(Elapsed),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::System { .. } => f.write_str("Clock::System"),
            Source::Manual(m) => write!(f, "Clock::Manual({:?})", *m.now.borrow()),
        }
    }
}

/// A clock that only moves when told to, for tests. Its [`Clock`] handles
/// sleep until [`ManualClock::advance`] takes them past their deadline.
#[derive(Clone, Debug)]
pub struct ManualClock {
    clock: Clock,
}

impl ManualClock {
    /// A clock standing at `start_unix_ms` on the wall clock.
    pub fn new(start_unix_ms: u64) -> ManualClock {
        ManualClock {
            clock: Clock {
                source: Source::Manual(Arc::new(Manual {
                    now: watch::Sender::new(Duration::ZERO),
                    start_unix_ms,
                })),
            },
        }
    }

    /// The clock to pass to what is tested.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// Moves time forward, waking every sleeper whose deadline it passes.
    pub fn advance(&self, by: Duration) {
        if let Source::Manual(m) = &self.clock.source {
            m.now.send_modify(|t| *t += by);
        }
    }

    pub fn now(&self) -> Duration {
        self.clock.now()
    }
}

/// Random fractions for spreading retries out, from a seeded generator
/// when a test needs the same schedule twice. Cheap to clone; clones draw
/// from the same sequence.
#[derive(Clone)]
pub struct Jitter {
    rng: Arc<Mutex<StdRng>>,
}

impl Jitter {
    pub fn from_entropy() -> Jitter {
        Jitter {
            rng: Arc::new(Mutex::new(StdRng::from_entropy())),
        }
    }

    pub fn seeded(seed: u64) -> Jitter {
        Jitter {
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// A fraction in `[0, 1)`.
    pub fn fraction(&self) -> f64 {
        self.rng.lock().gen::<f64>()
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::from_entropy()
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Jitter")
    }
}

/// Pauses between attempts at something that keeps failing: each is 75% to
/// 125% of a step that starts at `first` and doubles up to `max`, so that
/// many clients retrying at once spread out. `reset` after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
    jitter: Jitter,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration, jitter: Jitter) -> Backoff {
        Backoff {
            first,
            max,
            step: first,
            jitter,
        }
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.step.mul_f64(0.75 + self.jitter.fraction() / 2.0);
        self.step = (self.step * 2).min(self.max);
        pause
    }

    /// Starts again from the first step.
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_only_when_moved_past_them() {
        let manual = ManualClock::new(1_000_000);
        let clock = manual.clock();
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        manual.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        manual.advance(Duration::from_secs(1));
        sleeper.await.unwrap();
        assert_eq!(clock.now(), Duration::from_secs(10));
        assert_eq!(clock.unix_ms(), 1_010_000);
        let late = tokio::spawn(async move {
            clock
                .timeout(Duration::from_secs(1), std::future::pending::<()>())
                .await
        });
        tokio::task::yield_now().await;
        manual.advance(Duration::from_secs(2));
        assert_eq!(late.await.unwrap(), Err(Elapsed));
    }

    #[test]
    fn backoff_grows_to_its_maximum_with_jitter_and_resets() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(first, max, Jitter::seeded(1));
        let mut step = first;
        for _ in 0..10 {
            let pause = b.next_pause();
            assert!(pause >= step.mul_f64(0.75) && pause <= step.mul_f64(1.25));
            step = (step * 2).min(max);
        }
        b.reset();
        assert!(b.next_pause() <= first.mul_f64(1.25));
        let a: Vec<_> = {
            let mut b = Backoff::new(first, max, Jitter::seeded(9));
            (0..5).map(|_| b.next_pause()).collect()
        };
        let again: Vec<_> = {
            let mut b = Backoff::new(first, max, Jitter::seeded(9));
            (0..5).map(|_| b.next_pause()).collect()
        };
        assert_eq!(a, again, "a seed replays the same schedule");
    }
}
