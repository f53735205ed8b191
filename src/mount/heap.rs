//! Daemon memory: give the memory of forgotten inodes back to the system, and keep it from
//! fragmenting over repeated walks.
//!
//! Nodes are allocated by whichever thread served the lookup (one ring thread per CPU, the
//! prefetch thread), and glibc keeps a heap per thread. Two things made the daemon's RSS creep
//! up by 4 MiB over 10 walks with caches dropped in between, and stay at its peak after the
//! kernel forgot the inodes: large blocks (the inode table's hash tables) came from the heaps
//! once glibc had raised its mmap threshold, and freed small blocks stayed in their heaps.
//! [`fix_large_blocks`] pins the threshold, and a [`Trimmer`] returns free heap pages after a
//! storm of forgets. A single shared heap also stopped the creep but made `create` twice as
//! slow (contention).
//!
//! Invariants: neither touches live data, so doing it or not gives the same results. The
//! trim thread waits until a storm of forgets is over before it trims, trims at most once per
//! storm, and ends when the owning [`Trimmer`] is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Blocks of this size and more get their own mappings ([`fix_large_blocks`]): just above
/// the 1 MiB request buffers, so those keep coming from the heaps, while what grows with the
/// tree (the inode table's hash tables, the indexes of huge directories) is mapped apart.
const MMAP_THRESHOLD: usize = (1 << 20) + (64 << 10);

/// Give large blocks their own mappings for the life of the process. glibc raises its mmap
/// threshold after the first large block is freed, and from then on the inode table's hash
/// tables, reallocated as the kernel's inode cache grows and shrinks, came from the
/// per-thread heaps and fragmented them: over 10 walks with caches dropped in between, the
/// heap of one ring thread grew by 2.3 MiB. With a fixed threshold the daemon's RSS after
/// each walk stays flat (43.0-43.8 MiB on the bench tree, no trend) and is lower than before
/// (50-53 MiB). Call once, when the daemon starts.
pub fn fix_large_blocks() {
    if !crate::sys::set_mmap_threshold(MMAP_THRESHOLD) {
        log::debug!("malloc mmap threshold left as it is");
    }
}

/// Trim once at least this many nodes were freed since the last trim.
const TRIM_AFTER_FREED: usize = 4096;
/// ... and no node was freed for this long (the storm is over).
const QUIET: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Shared {
    freed: AtomicUsize,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    stop: bool,
    due: bool,
}

/// Handle on the trim thread; dropping it ends the thread.
pub struct Trimmer {
    shared: Arc<Shared>,
}

impl Trimmer {
    pub fn start() -> std::io::Result<Trimmer> {
        Self::start_with(crate::sys::release_free_heap)
    }

    /// Start with `trim` as the trim action (tests count calls).
    fn start_with(trim: impl Fn() -> bool + Send + 'static) -> std::io::Result<Trimmer> {
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(move || run(&worker, trim))?;
        Ok(Trimmer { shared })
    }

    /// `n` nodes were freed.
    pub fn freed(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.shared.freed.fetch_add(n, Ordering::Relaxed);
        if before < TRIM_AFTER_FREED && before + n >= TRIM_AFTER_FREED {
            lock(&self.shared.state).due = true;
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(shared: &Shared, trim: impl Fn() -> bool) {
    if let Err(e) = crate::sys::lower_thread_priority() {
        log::debug!("heap trim thread keeps its priority: {e}");
    }
    loop {
        {
            let mut st = lock(&shared.state);
            while !st.due && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
            st.due = false;
        }
        // Wait for the storm to end: a trim in the middle of it would be undone by the next
        // thousand frees' worth of fragmentation, and each trim walks every heap.
        let mut seen = shared.freed.load(Ordering::Relaxed);
        loop {
            let st = lock(&shared.state);
            let (st, _) = shared
                .wake
                .wait_timeout(st, QUIET)
                .unwrap_or_else(|p| p.into_inner());
            if st.stop {
                return;
            }
            drop(st);
            let now = shared.freed.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
        shared.freed.store(0, Ordering::Relaxed);
        // Ring threads serve requests in the normal class while this holds heap locks.
        let _running = crate::mount::workers::HelperJob::start();
        let released = trim();
        log::debug!("heap trimmed after forgets (memory released: {released})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn counting() -> (Trimmer, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let t = Trimmer::start_with(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            true
        })
        .unwrap();
        (t, calls)
    }

    fn wait_for(calls: &AtomicUsize, n: usize) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if calls.load(Ordering::SeqCst) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn one_trim_per_storm_of_forgets() {
        let (t, calls) = counting();
        t.freed(TRIM_AFTER_FREED - 1);
        std::thread::sleep(QUIET * 3);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "below the threshold");
        // A storm in many small batches, crossing the threshold more than once.
        for _ in 0..3 * TRIM_AFTER_FREED {
            t.freed(1);
        }
        assert!(wait_for(&calls, 1), "no trim after the storm");
        std::thread::sleep(QUIET * 3);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one trim for one storm");
        // The count starts again after a trim.
        t.freed(TRIM_AFTER_FREED);
        assert!(wait_for(&calls, 2), "no trim after the second storm");
        t.freed(0);
        drop(t);
    }
}
