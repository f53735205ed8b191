//! Threads for requests that may copy file data up, kept between requests.
//!
//! Starting a thread per copy-up cost about fifteen system calls (clone3, stack mmap and guard,
//! signal stack, madvise and munmap at exit), a tenth of a small copy-up. Workers here park for
//! a while after a job and take the next one.
//!
//! Invariants: a job never waits behind another job. It is queued only when more workers are
//! parked than jobs are queued, so each queued job has a parked worker of its own; otherwise a
//! new worker starts with it. A parked worker leaves after `linger` without work. Jobs must not
//! panic (the caller wraps them); a worker survives anyway, as the panic unwinds only the job.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Workers {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    linger: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    parked: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Workers {
    /// Workers named `name`, each leaving after `linger` without a job.
    pub fn new(name: &str, linger: Duration) -> Self {
        Workers {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                linger,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            }),
        }
    }

    /// Run `job` on a parked worker, or on a new one. On error (no thread could be started)
    /// the job has been dropped without running.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let job: Job = Box::new(job);
        {
            let mut state = self.shared.lock();
            if state.parked > state.queue.len() {
                state.queue.push_back(job);
                self.shared.wake.notify_one();
                return Ok(());
            }
        }
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name(self.shared.name.clone())
            .spawn(move || work(&shared, job))
            .map(drop)
    }

    #[cfg(test)]
    fn parked(&self) -> usize {
        self.shared.lock().parked
    }
}

/// Jobs running on normal-class helper threads of this process (copy-up workers, the
/// directory prefetch). An io_uring ring thread serves requests in the normal class only while
/// one runs (see `uring`).
static HELPERS_BUSY: AtomicUsize = AtomicUsize::new(0);

/// Whether a normal-class helper thread is running a job.
pub fn helpers_busy() -> bool {
    HELPERS_BUSY.load(Ordering::Relaxed) > 0
}

/// Counts a helper job as running while it lives.
pub struct HelperJob(());

impl HelperJob {
    pub fn start() -> HelperJob {
        HELPERS_BUSY.fetch_add(1, Ordering::Relaxed);
        HelperJob(())
    }
}

impl Drop for HelperJob {
    fn drop(&mut self) {
        HELPERS_BUSY.fetch_sub(1, Ordering::Relaxed);
    }
}

fn work(shared: &Shared, first: Job) {
    // A worker started from an io_uring ring thread inherits its SCHED_IDLE class; the copies
    // it runs must not wait behind every other task on a busy host.
    let _ = crate::sys::set_idle_class(false);
    let mut job = first;
    loop {
        let running = HelperJob::start();
        let _ = catch_unwind(AssertUnwindSafe(job));
        drop(running);
        match park(shared) {
            Some(next) => job = next,
            None => return,
        }
    }
}

/// Wait for a queued job; `None` once `linger` passed without one.
fn park(shared: &Shared) -> Option<Job> {
    let deadline = Instant::now() + shared.linger;
    let mut state = shared.lock();
    state.parked += 1;
    loop {
        if let Some(job) = state.queue.pop_front() {
            state.parked -= 1;
            return Some(job);
        }
        let now = Instant::now();
        if now >= deadline {
            state.parked -= 1;
            return None;
        }
        state = shared
            .wake
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn wait_parked(w: &Workers, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.parked() != n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(w.parked(), n);
    }

    #[test]
    fn a_running_job_counts_as_a_busy_helper() {
        let w = Workers::new("test-worker", Duration::from_secs(30));
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        w.submit(move || {
            started_tx.send(helpers_busy()).unwrap();
            let _ = release_rx.recv();
        })
        .unwrap();
        assert!(started_rx.recv().unwrap(), "busy inside the job");
        assert!(helpers_busy(), "busy while the job runs");
        release_tx.send(()).unwrap();
        let job = HelperJob::start();
        assert!(helpers_busy());
        drop(job);
    }

    #[test]
    fn a_parked_worker_takes_the_next_job() {
        let w = Workers::new("test-worker", Duration::from_secs(30));
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        w.submit(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap();
        let first = rx.recv().unwrap();
        wait_parked(&w, 1);
        w.submit(move || tx2.send(std::thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the same thread ran both jobs");
        wait_parked(&w, 1);
    }

    #[test]
    fn a_job_never_waits_behind_a_running_one() {
        let w = Workers::new("test-worker", Duration::from_secs(30));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        // The first job blocks until released; the second must still run.
        w.submit(move || {
            let _ = release_rx.recv();
        })
        .unwrap();
        w.submit(move || done_tx.send(()).unwrap()).unwrap();
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("second job ran while the first was blocked");
        release_tx.send(()).unwrap();
        wait_parked(&w, 2);
    }

    #[test]
    fn a_panicking_job_does_not_kill_its_worker() {
        let w = Workers::new("test-worker", Duration::from_secs(30));
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        w.submit(move || {
            tx.send(std::thread::current().id()).unwrap();
            panic!("job failure");
        })
        .unwrap();
        let first = rx.recv().unwrap();
        wait_parked(&w, 1);
        w.submit(move || tx2.send(std::thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the worker survived the panic");
    }

    /// Sends on its channel when dropped: stored in a thread-local, when its thread exits.
    struct NoticeOnExit(mpsc::Sender<()>);

    impl Drop for NoticeOnExit {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    thread_local! {
        static EXIT_NOTICE: std::cell::RefCell<Option<NoticeOnExit>> =
            const { std::cell::RefCell::new(None) };
    }

    // The worker's exit is observed, not its parked count: a test thread descheduled for longer
    // than the linger on a loaded host never saw the short-lived parked state (a CI flake).
    #[test]
    fn an_idle_worker_leaves_after_its_linger_and_a_new_one_starts() {
        let w = Workers::new("test-worker", Duration::from_millis(50));
        let (exit_tx, exit_rx) = mpsc::channel();
        w.submit(move || EXIT_NOTICE.with(|n| *n.borrow_mut() = Some(NoticeOnExit(exit_tx))))
            .unwrap();
        exit_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the idle worker left");
        assert_eq!(w.parked(), 0);
        let (tx, rx) = mpsc::channel();
        w.submit(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a new worker starts");
    }
}
