//! Group commit: when the gateway may tell anyone about a write.
//!
//! Under [`SyncPolicy::EachCommit`] SQLite runs with `synchronous=FULL` and every
//! transaction is durable when it returns (one fsync each). Under [`SyncPolicy::Group`]
//! (the default) SQLite runs with `synchronous=NORMAL`, so a commit only writes the WAL,
//! and one syncer thread makes the WAL durable for many commits with one `fdatasync`:
//!
//! - every store transaction counts itself (SQLite's commit hook) in `transactions`;
//! - every frame a connection queues carries a *barrier*: the count when it was queued,
//!   after the store work that produced it;
//! - the connection's writer holds a frame until `durable` reaches its barrier;
//! - the syncer reads the count while holding the store lock (so no transaction is half
//!   written), syncs the WAL file, then publishes that count as durable.
//!
//! So no frame (an `Accepted`, a delivered entry, a `Ready` with a fresh resume token)
//! leaves the gateway before everything the store had committed when it was made is on
//! disk: an acknowledged write survives a power loss as under `EachCommit`, and the
//! fsyncs are shared by every connection writing at the same time.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

use crate::telemetry;

/// When writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicy {
    /// One fsync shared by every transaction committed since the last one; frames wait for
    /// it (the default).
    #[default]
    Group,
    /// One fsync inside every transaction (`synchronous=FULL`).
    EachCommit,
}

/// The shared state of group commit (one per gateway).
pub struct GroupCommit {
    transactions: Arc<AtomicU64>,
    /// The highest barrier a writer is waiting for.
    requested: Mutex<u64>,
    wake: Condvar,
    durable: watch::Sender<u64>,
}

impl GroupCommit {
    /// Group commit over `transactions`, the store's transaction count.
    pub fn new(transactions: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            transactions,
            requested: Mutex::new(0),
            wake: Condvar::new(),
            durable: watch::channel(0).0,
        })
    }

    /// The barrier for a frame queued now.
    pub fn barrier(&self) -> u64 {
        self.transactions.load(Ordering::SeqCst)
    }

    /// Watches the durable count.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Asks the syncer to make everything up to `barrier` durable.
    pub fn request(&self, barrier: u64) {
        if let Ok(mut requested) = self.requested.lock() {
            if barrier > *requested {
                *requested = barrier;
                self.wake.notify_one();
            }
        }
    }

    /// Waits until everything up to `barrier` is durable; `false` if the syncer is gone.
    pub async fn wait(&self, durable: &mut watch::Receiver<u64>, barrier: u64) -> bool {
        if *durable.borrow() >= barrier {
            return true;
        }
        self.request(barrier);
        durable.wait_for(|d| *d >= barrier).await.is_ok()
    }

    /// Runs the syncer on its own thread until `settled` answers `None` (the gateway is
    /// gone). `settled` must take the store lock and return [`Self::barrier`] read under
    /// it, so that every transaction it counts is completely written.
    pub fn spawn_syncer(
        self: &Arc<Self>,
        wal: File,
        settled: impl Fn() -> Option<u64> + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("confab-syncer".into())
            .spawn(move || this.syncer(&wal, settled))
    }

    fn syncer(&self, wal: &File, settled: impl Fn() -> Option<u64>) {
        let mut durable = 0u64;
        loop {
            // Wait for a writer that needs more than is durable (re-checking once a second
            // whether the gateway is still there).
            let wanted = {
                let Ok(requested) = self.requested.lock() else {
                    return;
                };
                let Ok((requested, _)) =
                    self.wake
                        .wait_timeout_while(requested, Duration::from_secs(1), |r| *r <= durable)
                else {
                    return;
                };
                *requested
            };
            let Some(target) = settled() else {
                return;
            };
            if wanted <= durable {
                continue;
            }
            let started = Instant::now();
            match wal.sync_data() {
                Ok(()) => {
                    durable = target;
                    self.durable.send_replace(durable);
                    telemetry::store_synced(target, started.elapsed());
                }
                Err(e) => {
                    // Nothing is published as durable; writers keep waiting, and retry.
                    tracing::error!(error = %e, "syncing the store's WAL failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame whose barrier is above the durable count is held until a sync that started
    /// after it covers it, and a sync publishes only what was counted when it started.
    #[tokio::test]
    #[allow(clippy::await_holding_lock)] // the held lock is the point: it stalls the syncer
    async fn frames_wait_for_a_sync_that_covers_them() {
        let dir = tempfile::tempdir().expect("dir");
        let wal = File::create(dir.path().join("wal")).expect("file");
        let transactions = Arc::new(AtomicU64::new(0));
        let group = GroupCommit::new(transactions.clone());
        // The syncer may read the count only when the test lets it ("the store lock"), and
        // runs while `alive` does ("the gateway").
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().expect("gate");
        let alive = Arc::new(());
        let syncer = {
            let gate = gate.clone();
            let transactions = transactions.clone();
            let alive = Arc::downgrade(&alive);
            group
                .spawn_syncer(wal, move || {
                    alive.upgrade()?;
                    let _lock = gate.lock().ok()?;
                    Some(transactions.load(Ordering::SeqCst))
                })
                .expect("thread")
        };
        let mut durable = group.durable();
        transactions.store(3, Ordering::SeqCst);
        let barrier = group.barrier();
        assert_eq!(barrier, 3);
        let waiting = {
            let group = group.clone();
            let mut durable = durable.clone();
            tokio::spawn(async move { group.wait(&mut durable, barrier).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "released before any sync");
        assert_eq!(*durable.borrow(), 0);
        // A transaction committed before the syncer reads the count is covered too.
        transactions.store(5, Ordering::SeqCst);
        drop(held);
        assert!(waiting.await.expect("task"));
        assert_eq!(*durable.borrow_and_update(), 5);
        // A barrier already covered passes at once.
        assert!(group.wait(&mut durable, 4).await);
        drop(alive);
        syncer
            .join()
            .expect("syncer exits once the gateway is gone");
    }
}
