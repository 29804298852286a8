//! Group commit: when the gateway may tell anyone about a write.
//!
//! Under [`SyncPolicy::EachCommit`] SQLite runs with `synchronous=FULL` and every store
//! call is its own transaction, durable when it returns (one fsync each). Under
//! [`SyncPolicy::Group`] (the default) the store calls of all connections share one
//! SQLite transaction, a *batch* (each call is a savepoint inside it, so it stays atomic),
//! and one syncer thread commits the batch and makes it durable with one `fdatasync` of
//! the WAL (`synchronous=NORMAL`: the commit itself only writes the WAL):
//!
//! - [`WriteCounters`] count commits (SQLite's commit hook) and name the batch any write
//!   made now lands in;
//! - every frame a connection queues carries a *barrier*: that batch's number, read
//!   after the store work that produced the frame;
//! - the connection's writer holds a frame until `durable` reaches its barrier;
//! - the syncer, holding the store lock, commits the open batch and reads the count,
//!   then syncs the WAL file and publishes that count as durable.
//!
//! So no frame (an `Accepted`, a delivered entry, a `Ready` with a fresh resume token)
//! leaves the gateway before everything the store had done when it was made is committed
//! and on disk: an acknowledged write survives a power loss as under `EachCommit`, while
//! the WAL writes and the fsyncs are shared by every connection writing at the same time.
//! A batch that fails to commit ends the process: its writes were promised to frames
//! still waiting, and the connections' state already counts on them; clients recover by
//! resuming against the restarted gateway, which never acknowledged any of it.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// How long a batch stays open when nobody waits for it (background writes: retention,
/// presence).
const BATCH_OPEN_MAX: Duration = Duration::from_millis(5);

/// The store's side of group commit: what is committed, and which batch a write made now
/// lands in.
#[derive(Debug, Default)]
pub struct WriteCounters {
    commits: AtomicU64,
    open_batch: AtomicU64,
    open: AtomicBool,
    /// The store is committing the open batch (its own `COMMIT`).
    committing: AtomicBool,
    /// Something else committed while a batch was open: SQLite had rolled the batch back
    /// (it does on some I/O errors and a full disk) and a later write committed on its
    /// own. The batch's writes are gone; frames wait for them; the gateway must stop.
    lost: AtomicBool,
}

impl WriteCounters {
    /// Counts a commit (SQLite's commit hook, called for every commit of the connection).
    pub fn committed(&self) {
        if self.open.load(Ordering::SeqCst) && !self.committing.load(Ordering::SeqCst) {
            self.lost.store(true, Ordering::SeqCst);
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.open.store(false, Ordering::SeqCst);
    }

    /// The store is about to commit the open batch (`true`), or has (`false`).
    pub fn committing(&self, now: bool) {
        self.committing.store(now, Ordering::SeqCst);
    }

    /// Whether a batch was lost (see the field); nothing may be published durable after.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// A batch was begun; writes land in it until it commits.
    pub fn opened(&self) {
        self.open_batch
            .store(self.commits.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
        self.open.store(true, Ordering::SeqCst);
    }

    /// Whether a batch is open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    /// The commit count that covers every write made so far: the open batch's, or the
    /// last commit (a write outside any batch commits on its own).
    pub fn barrier(&self) -> u64 {
        self.open_batch
            .load(Ordering::SeqCst)
            .max(self.commits.load(Ordering::SeqCst))
    }
}

/// The shared state of group commit (one per gateway).
pub struct GroupCommit {
    counters: Arc<WriteCounters>,
    /// The highest barrier a writer is waiting for.
    requested: Mutex<u64>,
    wake: Condvar,
    durable: watch::Sender<u64>,
}

impl GroupCommit {
    /// Group commit over the store's `counters`.
    pub fn new(counters: Arc<WriteCounters>) -> Arc<Self> {
        Arc::new(Self {
            counters,
            requested: Mutex::new(0),
            wake: Condvar::new(),
            durable: watch::channel(0).0,
        })
    }

    /// The barrier for a frame queued now.
    pub fn barrier(&self) -> u64 {
        self.counters.barrier()
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

    /// Runs the syncer on its own thread until `settle` answers `None` (the gateway is
    /// gone). `settle` must take the store lock, commit the open batch, and return
    /// [`Self::barrier`] read under the lock, so that everything it counts is committed.
    pub fn spawn_syncer(
        self: &Arc<Self>,
        wal: File,
        settle: impl Fn() -> Option<Result<u64, String>> + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("confab-syncer".into())
            .spawn(move || this.syncer(&wal, settle))
    }

    fn syncer(&self, wal: &File, settle: impl Fn() -> Option<Result<u64, String>>) {
        let mut durable = 0u64;
        loop {
            // Wait for a writer that needs more than is durable, or for a batch nobody
            // waits for to have been open long enough (re-checking at least once a second
            // whether the gateway is still there).
            let wanted = {
                let Ok(requested) = self.requested.lock() else {
                    return;
                };
                let wait = if self.counters.is_open() {
                    BATCH_OPEN_MAX
                } else {
                    Duration::from_secs(1)
                };
                let Ok((requested, _)) = self
                    .wake
                    .wait_timeout_while(requested, wait, |r| *r <= durable)
                else {
                    return;
                };
                *requested
            };
            if wanted <= durable && !self.counters.is_open() {
                // Nothing to do; only check that the gateway is still there.
                if settle().is_none() {
                    return;
                }
                continue;
            }
            let target = match settle() {
                None => return,
                Some(Ok(target)) => target,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "committing a batch failed; stopping the gateway");
                    std::process::exit(70);
                }
            };
            if target <= durable {
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

    /// A commit that is not the batch's own while a batch is open means SQLite dropped the
    /// batch; a commit outside any batch, or the batch's own, does not.
    #[test]
    fn a_stray_commit_while_a_batch_is_open_marks_it_lost() {
        let c = WriteCounters::default();
        c.committed(); // a write outside any batch
        c.opened();
        c.committing(true);
        c.committed(); // the batch's own COMMIT
        c.committing(false);
        assert!(!c.is_lost());
        c.opened();
        c.committed(); // something else committed: the batch is gone
        assert!(c.is_lost());
    }

    /// A frame whose barrier is above the durable count is held until the syncer has
    /// committed its batch and synced; the syncer publishes what it committed.
    #[tokio::test]
    #[allow(clippy::await_holding_lock)] // the held lock is the point: it stalls the syncer
    async fn frames_wait_for_a_sync_that_covers_them() {
        let dir = tempfile::tempdir().expect("dir");
        let wal = File::create(dir.path().join("wal")).expect("file");
        let counters = Arc::new(WriteCounters::default());
        let group = GroupCommit::new(counters.clone());
        // The syncer may read the count only when the test lets it ("the store lock"), and
        // runs while `alive` does ("the gateway").
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().expect("gate");
        let alive = Arc::new(());
        let syncer = {
            let gate = gate.clone();
            let counters = counters.clone();
            let alive = Arc::downgrade(&alive);
            group
                .spawn_syncer(wal, move || {
                    alive.upgrade()?;
                    let _lock = gate.lock().ok()?;
                    // "Commit the open batch".
                    if counters.is_open() {
                        counters.committed();
                    }
                    Some(Ok(counters.barrier()))
                })
                .expect("thread")
        };
        let mut durable = group.durable();
        // Two commits outside a batch, then writes in an open batch (the third commit).
        counters.committed();
        counters.committed();
        counters.opened();
        let barrier = group.barrier();
        assert_eq!(barrier, 3, "frames wait for the batch their writes are in");
        let waiting = {
            let group = group.clone();
            let mut durable = durable.clone();
            tokio::spawn(async move { group.wait(&mut durable, barrier).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "released before any sync");
        assert_eq!(*durable.borrow(), 0);
        // A commit made before the syncer takes the lock is covered too.
        counters.committed();
        counters.opened();
        drop(held);
        assert!(waiting.await.expect("task"));
        assert_eq!(
            *durable.borrow_and_update(),
            4,
            "the open batch was committed"
        );
        assert!(!counters.is_open());
        // A barrier already covered passes at once.
        assert!(group.wait(&mut durable, 4).await);
        drop(alive);
        syncer
            .join()
            .expect("syncer exits once the gateway is gone");
    }
}
