//! The volume's background tasks, run by one small runner.
//!
//! A task is an async function given a [`TaskContext`]: its messages, its
//! periodic ticks and the stop signal, on the volume's clock. The runner
//! starts tasks, delivers messages, and stops them all on close (or aborts
//! them when the volume is dropped). A task that returns an error has hit
//! something the volume cannot go on after: the runner hands the error to
//! the volume, which fails. Each task owns what it works on (shared state
//! behind `Arc`s); none holds the volume's handle.
//!
//! The tasks: uploads, the automatic cleaner (`clean.rs`) and flatten
//! (`clone.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hlfs_store::time::Clock;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::{Result, VolumeError};

/// What the runner does with a task's fatal error.
pub(crate) type OnFatal = Arc<dyn Fn(&'static str, VolumeError) + Send + Sync>;

pub(crate) struct Runner {
    clock: Clock,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
    on_fatal: OnFatal,
}

/// Sends messages to one task.
pub(crate) struct Mailbox<M> {
    sender: mpsc::UnboundedSender<M>,
}

impl<M> Mailbox<M> {
    /// Delivers `message`; fails with `Closed` once the task has ended.
    pub fn send(&self, message: M) -> Result<()> {
        self.sender.send(message).map_err(|_| VolumeError::Closed)
    }
}

/// What a running task sees of the runner. Its parts are separate fields
/// so that a task can wait on all of them in one `select!`.
pub(crate) struct TaskContext<M> {
    pub inbox: Inbox<M>,
    pub stop: StopSignal,
    pub ticks: Ticks,
}

/// A task's messages.
pub(crate) struct Inbox<M> {
    messages: mpsc::UnboundedReceiver<M>,
}

impl<M> Inbox<M> {
    /// The next message; None once no one can send any more.
    pub async fn recv(&mut self) -> Option<M> {
        self.messages.recv().await
    }
}

/// Tells a task to stop.
pub(crate) struct StopSignal {
    stop: watch::Receiver<bool>,
}

impl StopSignal {
    /// Resolves when the task should stop. Pending until then, so it can
    /// sit in a `select!` beside the task's work.
    pub async fn stopped(&mut self) {
        // An error means the runner is gone: stop as well.
        let _ = self.stop.wait_for(|stop| *stop).await;
    }

    /// Whether the task has been told to stop (for a task that checks
    /// between steps rather than waiting).
    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// A task's periodic ticks, on the runner's clock.
pub(crate) struct Ticks {
    clock: Clock,
    every: Option<Duration>,
}

impl Ticks {
    /// Resolves at the task's next periodic tick (never, for a task
    /// without ticks).
    pub async fn next(&self) {
        match self.every {
            Some(every) => self.clock.sleep(every).await,
            None => std::future::pending().await,
        }
    }
}

impl Runner {
    pub fn new(clock: Clock, on_fatal: OnFatal) -> Runner {
        Runner {
            clock,
            stop: watch::Sender::new(false),
            tasks: Mutex::new(Vec::new()),
            on_fatal,
        }
    }

    /// Starts task `name`, ticking `every` (if given), and returns its
    /// mailbox.
    pub fn spawn<M, F, Fut>(
        &self,
        name: &'static str,
        every: Option<Duration>,
        task: F,
    ) -> Mailbox<M>
    where
        M: Send + 'static,
        F: FnOnce(TaskContext<M>) -> Fut,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let (sender, messages) = mpsc::unbounded_channel();
        let cx = TaskContext {
            inbox: Inbox { messages },
            stop: StopSignal {
                stop: self.stop.subscribe(),
            },
            ticks: Ticks {
                clock: self.clock.clone(),
                every,
            },
        };
        let run = task(cx);
        let on_fatal = self.on_fatal.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::debug!(task = name, error = %e, "background task failed");
                on_fatal(name, e);
            }
        });
        self.tasks.lock().push((name, handle));
        Mailbox { sender }
    }

    /// Asks every task to stop and waits for them, at most `grace` each on
    /// the runner's clock; those still running then are aborted. Once this
    /// returns, no task runs.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for (name, mut handle) in tasks {
            if self.clock.timeout(grace, &mut handle).await.is_err() {
                tracing::debug!(task = name, "task did not stop in time; aborting it");
                handle.abort();
                let _ = handle.await;
            }
        }
    }
}

impl Drop for Runner {
    /// A volume dropped without close: its tasks must not outlive it.
    fn drop(&mut self) {
        for (_, handle) in self.tasks.get_mut().drain(..) {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlfs_store::time::ManualClock;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn tasks_get_messages_and_ticks_stop_cleanly_and_report_failures() {
        let manual = ManualClock::new(0);
        let failed = Arc::new(Mutex::new(Vec::new()));
        let runner = Runner::new(manual.clock(), {
            let failed = failed.clone();
            Arc::new(move |name, e| failed.lock().push(format!("{name}: {e}")))
        });
        let ticks = Arc::new(AtomicU32::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mailbox = runner.spawn("counter", Some(Duration::from_secs(1)), {
            let (ticks, got) = (ticks.clone(), got.clone());
            |mut cx: TaskContext<u32>| async move {
                loop {
                    tokio::select! {
                        () = cx.stop.stopped() => return Ok(()),
                        Some(m) = cx.inbox.recv() => got.lock().push(m),
                        () = cx.ticks.next() => { ticks.fetch_add(1, Ordering::SeqCst); }
                    }
                }
            }
        });
        let failing = runner.spawn("failing", None, |mut cx: TaskContext<()>| async move {
            cx.inbox.recv().await;
            Err(VolumeError::Failed("boom".into()))
        });
        mailbox.send(7).unwrap();
        mailbox.send(8).unwrap();
        settle().await;
        for _ in 0..3 {
            manual.advance(Duration::from_secs(1));
            settle().await;
        }
        assert_eq!(*got.lock(), [7, 8]);
        assert_eq!(ticks.load(Ordering::SeqCst), 3);
        failing.send(()).unwrap();
        settle().await;
        assert_eq!(failed.lock().len(), 1);
        assert!(failed.lock()[0].starts_with("failing: "));
        assert!(failing.send(()).is_err(), "a task that ended takes no mail");
        runner.shutdown(Duration::from_secs(1)).await;
        assert!(mailbox.send(9).is_err());
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_stop_is_aborted_after_the_grace() {
        let manual = ManualClock::new(0);
        let runner = Runner::new(manual.clock(), Arc::new(|_, _| {}));
        runner.spawn("stubborn", None, |_cx: TaskContext<()>| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let shutdown = tokio::spawn(async move { runner.shutdown(Duration::from_secs(5)).await });
        settle().await;
        assert!(!shutdown.is_finished());
        manual.advance(Duration::from_secs(5));
        shutdown.await.unwrap();
    }
}
