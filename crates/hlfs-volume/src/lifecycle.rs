//! Whether a volume may still be written: one state, one check.
//!
//! A volume is open, closing or closed; independently, it may have failed:
//! an error left the journal's state unknown (a failed append or sync, or
//! being fenced by another writer). After a failure, writes, flushes and
//! manifest writes are refused until the volume is reopened, and recovery
//! sorts out what was durable. Every operation asks [`Lifecycle::check`]
//! with what it needs, and nothing else keeps this state.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::error::{Result, VolumeError};

/// What an operation needs of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// To change it: writable, open and not failed.
    Write,
    /// To make durable what was written (flush, manifests, uploads): not
    /// failed. A closed volume has nothing left to sync.
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Closing,
    Closed,
}

pub(crate) struct Lifecycle {
    location: String,
    read_only: bool,
    /// Open and not failed: the check on every write reads only this.
    healthy: AtomicBool,
    state: Mutex<State>,
    /// Becomes true on failure, waking whoever waits for the store.
    failed: watch::Sender<bool>,
}

struct State {
    phase: Phase,
    failure: Option<String>,
}

impl Lifecycle {
    pub fn new(location: &str, read_only: bool) -> Lifecycle {
        Lifecycle {
            location: location.to_string(),
            read_only,
            healthy: AtomicBool::new(true),
            state: Mutex::new(State {
                phase: Phase::Open,
                failure: None,
            }),
            failed: watch::Sender::new(false),
        }
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Ok if the volume can do what `need` says; otherwise the error to give.
    pub fn check(&self, need: Need) -> Result<()> {
        if need == Need::Write && self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        if self.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        let state = self.state.lock();
        if let Some(why) = &state.failure {
            return Err(VolumeError::Failed(why.clone()));
        }
        match (need, state.phase) {
            (Need::Write, Phase::Closing | Phase::Closed) => Err(VolumeError::Closed),
            _ => Ok(()),
        }
    }

    /// Stops all further writes after `err`, which left the journal's state
    /// unknown; returns it for the caller to report. The first failure is
    /// the one remembered.
    pub fn fail(&self, err: VolumeError) -> VolumeError {
        let mut state = self.state.lock();
        if state.failure.is_none() {
            tracing::error!(volume = %self.location, error = %err, "volume failed; refusing further writes");
            state.failure = Some(err.to_string());
            self.healthy.store(false, Ordering::Release);
            self.failed.send_replace(true);
        }
        err
    }

    /// Resolves once the volume has failed.
    pub async fn failed(&self) {
        let mut failed = self.failed.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = failed.wait_for(|f| *f).await;
    }

    /// Starts closing: writes are refused from now on. False if the volume
    /// is closing or closed already.
    pub fn begin_close(&self) -> bool {
        let mut state = self.state.lock();
        if state.phase != Phase::Open {
            return false;
        }
        state.phase = Phase::Closing;
        self.healthy.store(false, Ordering::Release);
        true
    }

    pub fn closed(&self) {
        let mut state = self.state.lock();
        state.phase = Phase::Closed;
        self.healthy.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_state_answers_every_check() {
        let life = Lifecycle::new("v", false);
        assert!(life.check(Need::Write).is_ok());
        assert!(life.begin_close());
        assert!(!life.begin_close());
        assert!(matches!(life.check(Need::Write), Err(VolumeError::Closed)));
        assert!(life.check(Need::Sync).is_ok());
        life.fail(VolumeError::Failed("disk gone".into()));
        life.fail(VolumeError::Closed);
        assert!(
            matches!(life.check(Need::Sync), Err(VolumeError::Failed(why)) if why.contains("disk gone"))
        );
        life.closed();
        assert!(matches!(
            life.check(Need::Write),
            Err(VolumeError::Failed(_))
        ));
        let ro = Lifecycle::new("s", true);
        assert!(matches!(ro.check(Need::Write), Err(VolumeError::ReadOnly)));
        assert!(ro.check(Need::Sync).is_ok());
    }
}
