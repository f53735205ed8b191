//! Adaptive busy polling of `/dev/fuse` during bursts of requests.
//!
//! On a VM whose idle vCPUs halt (no guest halt polling), every request that finds the daemon
//! asleep in `read(/dev/fuse)` pays for waking a halted vCPU (tens of microseconds, more than the
//! work of most requests). While requests keep coming, the event loop's descriptor is switched to
//! `O_NONBLOCK`, so fuser's loop retries `read` on `EAGAIN` and the daemon's vCPU stays awake and
//! picks the next request up at once. A governor thread switches back to blocking reads once no
//! request has arrived for a whole window, so an idle mount costs no CPU.
//!
//! Invariants: `O_NONBLOCK` is set only while `spinning` is true; a request seen while blocking
//! (the first of a burst) turns spinning on and wakes the governor; the flag lives on the open
//! file description, so the duplicate held here steers the session's descriptor too. Only for a
//! single-threaded loop: with several readers every one of them would spin.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

struct BusyPoll {
    dev: OwnedFd,
    window: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the latest request.
    last_request: AtomicU64,
    spinning: AtomicBool,
    wake: (Mutex<()>, Condvar),
}

static POLLER: OnceLock<BusyPoll> = OnceLock::new();

/// Start polling `dev` (a duplicate of the session's `/dev/fuse` descriptor) for `window` after
/// each request. Once per process; later calls are ignored.
pub fn start(dev: OwnedFd, window: Duration) -> std::io::Result<()> {
    let poller = BusyPoll {
        dev,
        window,
        epoch: Instant::now(),
        last_request: AtomicU64::new(0),
        spinning: AtomicBool::new(false),
        wake: (Mutex::new(()), Condvar::new()),
    };
    if POLLER.set(poller).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("busy-poll".into())
        .spawn(govern)?;
    Ok(())
}

/// Called at the start of every request.
pub fn note_request() {
    let Some(p) = POLLER.get() else { return };
    p.last_request.store(p.now(), Ordering::Relaxed);
    if !p.spinning.load(Ordering::Relaxed) && !p.spinning.swap(true, Ordering::AcqRel) {
        p.set_nonblocking(true);
        let _guard = p.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.1.notify_one();
    }
}

impl BusyPoll {
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
    let window_ns = u64::try_from(p.window.as_nanos()).unwrap_or(u64::MAX);
    loop {
        {
            let mut guard = p.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            while !p.spinning.load(Ordering::Acquire) {
                guard = p.wake.1.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
        loop {
            std::thread::sleep(p.window);
            let idle = p
                .now()
                .saturating_sub(p.last_request.load(Ordering::Relaxed));
            if idle >= window_ns {
                break;
            }
        }
        // Blocking first, then the flag: a request noted in between sees `spinning` still true
        // and leaves the descriptor blocking; it still gets served, only without spinning, and
        // the next request after that one turns spinning back on.
        p.set_nonblocking(false);
        p.spinning.store(false, Ordering::Release);
    }
}
