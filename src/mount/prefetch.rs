//! Directory prefetch: get subdirectories ready on a second thread while the event loop
//! answers the requests that come before them.
//!
//! A tree walk (`find`, `ls -lR`, `grep -r`, `cp -a`) reads a directory, then goes into its
//! subdirectories one by one. On a cold tree most of the daemon's time is the first read of
//! each directory: every layer's copy listed, then every entry stat'ed for readdirplus. After a
//! directory's listing is sent, its subdirectories are pushed here and a prefetch thread does
//! that first read ahead of the walk, on the core the walk leaves idle.
//!
//! Invariants: prefetching only fills caches (the node's index, the kernel's inode cache), it
//! never answers a request and never changes a layer, so doing it or not gives the same results.
//! The queue is a stack (the walk is depth-first: the latest directory read is the one whose
//! children come next) of bounded size; the oldest entries fall off. The thread holds the union
//! weakly and ends when the owning [`Prefetcher`] is dropped.

use std::sync::{Arc, Condvar, Mutex, Weak};

use crate::union::Union;

/// At most this many directories wait; older ones fall off (the walk has moved on).
const MAX_QUEUED: usize = 1024;
/// Stat at most this many entries of one directory ahead of its readdirplus.
const MAX_WARM_ENTRIES: usize = 4096;

#[derive(Default)]
struct Queue {
    stack: Vec<u64>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// Handle on the prefetch thread; dropping it ends the thread.
pub struct Prefetcher {
    shared: Arc<Shared>,
}

impl Prefetcher {
    pub fn start(union: &Arc<Union>) -> std::io::Result<Prefetcher> {
        let shared = Arc::new(Shared::default());
        let worker = (shared.clone(), Arc::downgrade(union));
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || run(worker.0, worker.1))?;
        Ok(Prefetcher { shared })
    }

    /// Queue directories just listed, in listing order: the first one is taken first.
    pub fn push(&self, dirs: &[u64]) {
        if dirs.is_empty() {
            return;
        }
        let mut q = lock(&self.shared.queue);
        q.stack.extend(dirs.iter().rev());
        if q.stack.len() > MAX_QUEUED {
            let excess = q.stack.len() - MAX_QUEUED;
            q.stack.drain(..excess);
        }
        drop(q);
        self.shared.ready.notify_one();
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.ready.notify_one();
    }
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(shared: Arc<Shared>, union: Weak<Union>) {
    // Speculative work: it must never take CPU time from requests or from the callers.
    if let Err(e) = crate::sys::lower_thread_priority() {
        log::debug!("prefetch thread keeps its priority: {e}");
    }
    loop {
        let ino = {
            let mut q = lock(&shared.queue);
            loop {
                if q.stop {
                    return;
                }
                if let Some(ino) = q.stack.pop() {
                    break ino;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let Some(union) = union.upgrade() else { return };
        let _running = crate::mount::workers::HelperJob::start();
        // A panic here must not take the mount down: the work is only a cache fill.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            union.warm_dir(ino, MAX_WARM_ENTRIES)
        }));
    }
}
