//! Adaptive busy polling of `/dev/fuse` during bursts of requests.
//!
//! On a VM whose idle vCPUs halt (no guest halt polling), every request that finds the daemon
//! asleep in `read(/dev/fuse)` pays for waking a halted vCPU (tens of microseconds, more than the
//! work of most requests). While requests keep coming, the event loop's descriptor is switched to
//! `O_NONBLOCK`, so fuser's loop retries `read` on `EAGAIN` and the daemon's vCPU stays awake and
//! picks the next request up at once. A governor thread switches back to blocking reads once no
//! request has arrived for a whole window, so an idle mount costs no CPU. The window counts from
//! the end of the last request, and never while one is being served: a request that waits for
//! the disk longer than the window used to switch polling off and its successor on again, two
//! `fcntl`s and a wake-up per request; and while one is served the governor looks less often
//! (5,000 cold 4 KiB reads, passthrough off, 5 interleaved runs: 0.53-0.61 s before, 0.43-0.50 s
//! after, 0.39-0.43 s with polling off, fuse-overlayfs 0.39-0.45 s).
//!
//! A request handed to a worker thread (a copy-up) pauses the spinning: its caller waits for the
//! worker, and on a two-vCPU host the spinning loop would take the CPU the worker and the disk
//! completions need (1,000 renames of lower files with warm lookups: 0.64-0.66 s before the
//! pause, 0.46-0.49 s with it). The next request turns it back on.
//!
//! The governor runs at nice 19: waking it when a burst starts must not preempt the caller or a
//! worker (1,000 copy-ups of small lower files: median 0.456 -> 0.40 s, 4 of 4 pairs; creates
//! unchanged). The price: when every CPU is busy, it may get its turn late, and the loop keeps
//! spinning after a burst until it does.
//!
//! Spinning only pays while the CPUs are otherwise idle: the loop takes one CPU for itself, and
//! with other work on the host the caller whose request it waits for gets a CPU later (3,000
//! cold 4 KiB reads in a user namespace, no passthrough, one CPU-bound process beside them:
//! 0.57-0.70 s spinning, 0.26-0.33 s blocking, fuse-overlayfs 0.29-0.46 s; a rootless
//! `bench.sh` randread cell under a compiler took 8.8-12.3 s against fuse-overlayfs' 2-4.8 s).
//! So a request finds spinning off, and turns it off, while `cpu_pressure` says other work
//! competes for the CPUs.
//!
//! Nor does it pay while the requests themselves wait for the disk: a run of cold reads spent
//! about a fifth more time with spinning on than off (in a user namespace, no passthrough,
//! 5,000 cold random 4 KiB reads, 4 interleaved runs: 0.49-0.51 s spinning, 0.38-0.41 s not,
//! fuse-overlayfs 0.43-0.49 s). So after `SLOW_STREAK` requests in a row that each took
//! `SLOW_REQUEST` or longer, requests leave spinning off; the first quicker one turns it
//! back on, so one slow request among quick ones changes nothing. (Same reads, 5 interleaved
//! runs: median 0.40 s with this rule, 0.48 s without, 0.36 s never spinning, fuse-overlayfs
//! 0.37 s; a cold read served here takes about 60 us, so the bar is below that; 3 warm
//! `grep -r` of 10,000 files and a cold one unchanged: 0.53-0.64 vs 0.56-0.60 s, 1.10-1.28 vs
//! 1.09-1.29 s.)
//!
//! Invariants: `O_NONBLOCK` is set only while `spinning` is true; both change together, under
//! the `wake` mutex; a request seen while blocking (the first of a burst) turns spinning on and
//! wakes the governor; the flag lives on the open file description, so the duplicate held here
//! steers the session's descriptor too. Only for a single-threaded loop: with several readers
//! every one of them would spin.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::mount::cpu_pressure::CpuPressure;

struct BusyPoll {
    dev: OwnedFd,
    window: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the latest request's start or end.
    last_request: AtomicU64,
    /// Requests being served now: the loop is not waiting for the next one, so their time
    /// (a cold read waiting for the disk) is not idle time.
    serving: AtomicU32,
    spinning: AtomicBool,
    /// Requests in a row that took [`SLOW_REQUEST`] or longer, the latest included.
    slow_streak: AtomicU32,
    wake: (Mutex<()>, Condvar),
    /// Whether other work competes for the CPUs (`cpu_pressure`; a test's switch in tests).
    contended: Box<dyn Fn() -> bool + Send + Sync>,
}

static POLLER: OnceLock<BusyPoll> = OnceLock::new();

/// While a request is being served, the governor looks again after this many windows.
const SERVING_NAPS: u64 = 10;

/// A request served this long or longer waited for something (the disk, most often).
const SLOW_REQUEST: Duration = Duration::from_micros(25);

/// After this many slow requests in a row, requests stop turning spinning on.
const SLOW_STREAK: u32 = 4;

/// Set when requests stopped coming through `/dev/fuse` (FUSE-over-io_uring serves them).
static OFF: AtomicBool = AtomicBool::new(false);

/// Start polling `dev` (a duplicate of the session's `/dev/fuse` descriptor) for `window` after
/// each request. Once per process; later calls are ignored.
pub fn start(dev: OwnedFd, window: Duration) -> std::io::Result<()> {
    let pressure = CpuPressure::open();
    start_with(dev, window, Box::new(move || pressure.contended()))
}

fn start_with(
    dev: OwnedFd,
    window: Duration,
    contended: Box<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<()> {
    let poller = BusyPoll {
        dev,
        window,
        epoch: Instant::now(),
        last_request: AtomicU64::new(0),
        serving: AtomicU32::new(0),
        spinning: AtomicBool::new(false),
        slow_streak: AtomicU32::new(0),
        wake: (Mutex::new(()), Condvar::new()),
        contended,
    };
    if POLLER.set(poller).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("busy-poll".into())
        .spawn(govern)?;
    Ok(())
}

/// Called at the start of every request; the request counts as being served until the
/// returned guard is dropped.
#[must_use]
pub fn note_request() -> Option<Serving> {
    let p = POLLER.get()?;
    if OFF.load(Ordering::Relaxed) {
        return None;
    }
    p.serving.fetch_add(1, Ordering::Relaxed);
    let start = p.now();
    p.last_request.store(start, Ordering::Relaxed);
    if p.slow_streak.load(Ordering::Relaxed) >= SLOW_STREAK || (p.contended)() {
        if p.spinning.load(Ordering::Relaxed) {
            let _guard = p.lock();
            p.stop_spinning();
        }
    } else if !p.spinning.load(Ordering::Relaxed) {
        let _guard = p.lock();
        if !p.spinning.load(Ordering::Relaxed) {
            p.set_nonblocking(true);
            p.spinning.store(true, Ordering::Release);
            p.wake.1.notify_one();
        }
    }
    Some(Serving { start })
}

/// A request being served (see [`note_request`]); its end restarts the idle window.
pub struct Serving {
    /// Nanoseconds since the poller's epoch.
    start: u64,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(p) = POLLER.get() {
            let end = p.now();
            p.last_request.store(end, Ordering::Relaxed);
            p.serving.fetch_sub(1, Ordering::Relaxed);
            let slow_ns = u64::try_from(SLOW_REQUEST.as_nanos()).unwrap_or(u64::MAX);
            if end.saturating_sub(self.start) >= slow_ns {
                p.slow_streak.fetch_add(1, Ordering::Relaxed);
            } else {
                p.slow_streak.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Stop polling for good: the requests now come through io_uring, served on their callers'
/// CPUs, and a spinning `/dev/fuse` reader would only take a CPU from them.
pub fn turn_off() {
    OFF.store(true, Ordering::Relaxed);
    let Some(p) = POLLER.get() else { return };
    let _guard = p.lock();
    p.stop_spinning();
}

/// Called when a request goes to a worker thread: stop spinning until the next request.
pub fn pause() {
    let Some(p) = POLLER.get() else { return };
    let _guard = p.lock();
    p.stop_spinning();
}

impl BusyPoll {
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.wake.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// With the `wake` mutex held.
    fn stop_spinning(&self) {
        if self.spinning.load(Ordering::Relaxed) {
            self.set_nonblocking(false);
            self.spinning.store(false, Ordering::Release);
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn set_nonblocking(&self, on: bool) {
        let flags = match fcntl(&self.dev, FcntlArg::F_GETFL) {
            Ok(f) => OFlag::from_bits_truncate(f),
            Err(e) => {
                log::warn!("busy poll: F_GETFL: {e}");
                return;
            }
        };
        let flags = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        if let Err(e) = fcntl(&self.dev, FcntlArg::F_SETFL(flags)) {
            log::warn!("busy poll: F_SETFL: {e}");
        }
    }
}

fn govern() {
    let Some(p) = POLLER.get() else { return };
    if let Err(e) = crate::sys::lower_thread_priority() {
        log::debug!("busy poll: governor keeps normal priority: {e}");
    }
    let window_ns = u64::try_from(p.window.as_nanos()).unwrap_or(u64::MAX);
    loop {
        {
            let mut guard = p.lock();
            while !p.spinning.load(Ordering::Acquire) {
                guard = p.wake.1.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
        loop {
            let idle = p
                .now()
                .saturating_sub(p.last_request.load(Ordering::Relaxed));
            let serving = p.serving.load(Ordering::Relaxed) > 0;
            if (idle >= window_ns && !serving) || !p.spinning.load(Ordering::Acquire) {
                break;
            }
            // While a request is served the loop is not polling, so there is nothing to check
            // soon: waking every window through a run of slow requests (cold reads) cost more
            // than the polling saved.
            let nap = if serving {
                window_ns.saturating_mul(SERVING_NAPS)
            } else {
                window_ns - idle
            };
            std::thread::sleep(Duration::from_nanos(nap));
        }
        // A request noted after the idle check but before the lock finds spinning still on and
        // is served without spinning; the next one after it turns spinning back on.
        let _guard = p.lock();
        p.stop_spinning();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonblocking(fd: &OwnedFd) -> bool {
        let flags = fcntl(fd, FcntlArg::F_GETFL).expect("F_GETFL");
        OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK)
    }

    static CONTENDED: AtomicBool = AtomicBool::new(false);

    /// The only test in this binary that starts the poller (it is once per process).
    #[test]
    fn requests_spin_workers_pause_and_idle_stops() {
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let dup = read_end.try_clone().expect("dup");
        start_with(
            dup,
            Duration::from_millis(20),
            Box::new(|| CONTENDED.load(Ordering::Relaxed)),
        )
        .expect("start");
        assert!(!nonblocking(&read_end));

        CONTENDED.store(true, Ordering::Relaxed);
        drop(note_request());
        assert!(!nonblocking(&read_end), "a contended host: no spinning");
        CONTENDED.store(false, Ordering::Relaxed);
        drop(note_request());
        assert!(nonblocking(&read_end), "an idle one: spinning");
        CONTENDED.store(true, Ordering::Relaxed);
        drop(note_request());
        assert!(
            !nonblocking(&read_end),
            "contention stops it at the next request"
        );
        CONTENDED.store(false, Ordering::Relaxed);

        drop(note_request());
        assert!(nonblocking(&read_end), "a request turns spinning on");
        pause();
        assert!(!nonblocking(&read_end), "a worker request pauses it");
        pause();
        assert!(!nonblocking(&read_end));
        drop(note_request());
        assert!(nonblocking(&read_end), "the next request turns it back on");

        drop(note_request());
        let serving = note_request();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            nonblocking(&read_end),
            "a request served for longer than the window keeps it on"
        );
        drop(serving);
        drop(note_request());
        assert!(nonblocking(&read_end), "one slow request changes nothing");

        let slow = || {
            let serving = note_request();
            std::thread::sleep(SLOW_REQUEST * 2);
            drop(serving);
        };
        for _ in 0..SLOW_STREAK {
            slow();
        }
        let after_slow_run = note_request();
        assert!(
            !nonblocking(&read_end),
            "after a run of slow requests (disk-bound): no spinning"
        );
        std::thread::sleep(SLOW_REQUEST * 2);
        drop(after_slow_run);
        slow();
        assert!(!nonblocking(&read_end), "still slow: still off");
        drop(note_request());
        assert!(!nonblocking(&read_end), "a quick request ends the run...");
        drop(note_request());
        assert!(nonblocking(&read_end), "...and the next one spins again");

        let deadline = Instant::now() + Duration::from_secs(10);
        while nonblocking(&read_end) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!nonblocking(&read_end), "idle for a window: blocking again");
        drop(note_request());
        assert!(nonblocking(&read_end), "and a new burst spins again");
    }
}
