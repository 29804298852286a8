//! Worker threads for the synchronous part of device work, so a simulation uses more than
//! the one core turmoil steps its hosts on.
//!
//! turmoil runs every host on one thread. Most of a large room's cost is each member
//! decrypting, recording and acknowledging what it receives ([`confab_client::app::Client::work`]),
//! which is synchronous and touches only that device's own state. A device host hands that
//! work to a worker ([`Workers::run`]), sleeps a fixed simulated time
//! ([`Workers::sleep`], set by the scenario), then takes its client back
//! ([`Pending::wait`], blocking until the worker is done). Meanwhile turmoil steps the
//! other hosts: a step runs each host until its clock reaches the step's end, so a shorter
//! sleep would end in the same step and the host would block on the worker at once.
//!
//! Determinism does not depend on the number of workers (zero runs the work inline): the
//! work reads the simulated clock frozen at the moment it was handed over
//! ([`frozen_since_epoch`]), touches no state of another host, and the host always sleeps
//! the same simulated time before taking the result. What the devices share (the
//! [`SignatureMemo`](confab_client::mls::signature_memo::SignatureMemo)) changes what is
//! cached, never an answer.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;
type Panic = Box<dyn std::any::Any + Send>;

thread_local! {
    /// The simulated clock a job on this thread reads: (since the epoch, since the start).
    static FROZEN: Cell<Option<(Duration, Duration)>> = const { Cell::new(None) };
}

/// The simulated time since the Unix epoch a job running on this thread was handed over
/// at; `None` outside a job.
pub fn frozen_since_epoch() -> Option<Duration> {
    FROZEN.with(|f| f.get().map(|(epoch, _)| epoch))
}

/// The simulated time since the start a job running on this thread was handed over at;
/// `None` outside a job.
pub fn frozen_elapsed() -> Option<Duration> {
    FROZEN.with(|f| f.get().map(|(_, elapsed)| elapsed))
}

/// A pool of worker threads taking jobs in the order they are handed over.
pub struct Workers {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    sleep: Duration,
    send_sleep: Duration,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Workers {
    /// `threads` workers for a simulation stepping `step` at a time, whose hosts sleep
    /// `hand_over` of simulated time before taking a received batch's result
    /// ([`Workers::sleep`]; at least one and a half steps) and one and a half steps before taking a
    /// send's ([`Workers::send_sleep`]); with zero threads, [`Workers::run`] runs each job
    /// inline.
    pub fn new(threads: usize, step: Duration, hand_over: Duration) -> std::io::Result<Self> {
        let (jobs, queue) = channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut spawned = Vec::with_capacity(threads);
        for n in 0..threads {
            let queue = queue.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sim-worker-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take a job, not while it runs.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
            spawned.push(thread);
        }
        Ok(Self {
            jobs: (threads > 0).then_some(jobs),
            threads: spawned,
            // Never shorter than a send's: it must end in a later step.
            sleep: hand_over.max(step * 3 / 2),
            send_sleep: step * 3 / 2,
        })
    }

    /// The simulated time a host sleeps after handing work over and before it takes the
    /// result, always the same, so the host never observes a worker's speed. It must end
    /// in a later step than the hand-over; a longer one lets more events gather for the
    /// next job and lets the workers finish before the host blocks on them.
    pub fn sleep(&self) -> Duration {
        self.sleep
    }

    /// The simulated time a host sleeps after handing a send's encryption over: one and a
    /// half steps, the least that ends in a later step, because a member sending is busy
    /// until its message is accepted.
    pub fn send_sleep(&self) -> Duration {
        self.send_sleep
    }

    /// Worker threads (zero: jobs run inline).
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Hands `job` to a worker, which runs it with the simulated clock frozen at this
    /// moment. Must be called on a simulated host (it reads turmoil's clock).
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let now = (
            turmoil::since_epoch().unwrap_or_default(),
            turmoil::sim_elapsed().unwrap_or_default(),
        );
        let job = move || {
            FROZEN.with(|f| f.set(Some(now)));
            let result = catch_unwind(AssertUnwindSafe(job));
            FROZEN.with(|f| f.set(None));
            result
        };
        let Some(jobs) = &self.jobs else {
            return Pending {
                state: PendingState::Done(Some(job())),
            };
        };
        let slot = Arc::new(Slot::default());
        let filled = slot.clone();
        let queued = jobs.send(Box::new(move || filled.fill(job())));
        match queued {
            Ok(()) => Pending {
                state: PendingState::Queued(slot),
            },
            // Every worker is gone (one panicked outside a job, which cannot happen).
            Err(_) => Pending {
                state: PendingState::Done(Some(Err(Box::new("the workers are gone")))),
            },
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A job handed to [`Workers::run`]. Dropping it (a crashed host) waits for the job to end
/// and drops its result here, so a job never outlives its host's incarnation.
#[must_use = "dropping a pending job waits for it"]
pub struct Pending<T> {
    state: PendingState<T>,
}

enum PendingState<T> {
    Queued(Arc<Slot<Result<T, Panic>>>),
    Done(Option<Result<T, Panic>>),
}

/// Where a worker leaves one job's result. (A channel per job was 18% of a worker's time:
/// std's channel zeroes a block of slots for every new channel.)
struct Slot<T> {
    value: Mutex<Option<T>>,
    filled: Condvar,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            value: Mutex::new(None),
            filled: Condvar::new(),
        }
    }
}

impl<T> Slot<T> {
    fn fill(&self, value: T) {
        let mut slot = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(value);
        self.filled.notify_one();
    }

    /// Blocks until the value is there and takes it.
    fn take(&self) -> T {
        let mut slot = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(value) = slot.take() {
                return value;
            }
            slot = self
                .filled
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<T> Pending<T> {
    /// The job's result, blocking until it is done. A panic in the job resumes here.
    pub fn wait(mut self) -> T {
        let result = match &mut self.state {
            PendingState::Queued(slot) => slot.take(),
            PendingState::Done(result) => result
                .take()
                .unwrap_or_else(|| Err(Box::new("a job's result was taken twice"))),
        };
        self.state = PendingState::Done(None);
        match result {
            Ok(value) => value,
            Err(panic) => resume_unwind(panic),
        }
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if let PendingState::Queued(slot) = &self.state {
            drop(slot.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_workers_and_inline_with_the_same_results() {
        for threads in [0, 1, 3] {
            let workers = Workers::new(
                threads,
                Duration::from_millis(10),
                Duration::from_millis(30),
            )
            .expect("threads");
            assert_eq!(workers.threads(), threads);
            let pending: Vec<_> = (0..50u64).map(|n| workers.run(move || n * n)).collect();
            let results: Vec<u64> = pending.into_iter().map(Pending::wait).collect();
            assert_eq!(results, (0..50u64).map(|n| n * n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_dropped_pending_job_has_finished_when_the_drop_returns() {
        let workers =
            Workers::new(1, Duration::from_millis(10), Duration::from_millis(30)).expect("threads");
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let set = flag.clone();
        let pending = workers.run(move || {
            std::thread::sleep(Duration::from_millis(50));
            set.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        drop(pending);
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_panicking_job_panics_where_its_result_is_taken_and_the_worker_lives_on() {
        let workers =
            Workers::new(1, Duration::from_millis(10), Duration::from_millis(30)).expect("threads");
        let pending = workers.run(|| -> u32 { panic!("job failed") });
        let caught = catch_unwind(AssertUnwindSafe(|| pending.wait()));
        assert!(caught.is_err());
        assert_eq!(workers.run(|| 7u32).wait(), 7);
    }

    #[test]
    fn the_frozen_clock_is_set_only_inside_a_job() {
        for threads in [0, 1] {
            let workers = Workers::new(
                threads,
                Duration::from_millis(10),
                Duration::from_millis(30),
            )
            .expect("threads");
            // Outside a simulation turmoil's clock reads as zero: the job sees that value.
            let seen = workers
                .run(|| (frozen_since_epoch(), frozen_elapsed()))
                .wait();
            assert_eq!(seen, (Some(Duration::ZERO), Some(Duration::ZERO)));
            // An inline job (no threads) ran on this thread and left no frozen clock.
            assert_eq!(frozen_since_epoch(), None);
            assert_eq!(frozen_elapsed(), None);
        }
    }
}
