//! FUSE over io_uring: requests served on the CPU that issued them.
//!
//! With the classic transport a request wakes a daemon thread that sleeps in `read()` on
//! `/dev/fuse`, wherever the scheduler last left it, and the reply wakes the caller again. On
//! a VM whose idle vCPUs halt, each of those cross-CPU wakeups is a halt and an IPI. With
//! FUSE-over-io_uring (Linux 6.14+, `fuse.enable_uring=1`) the kernel puts a request on the
//! queue of the CPU its caller runs on; each queue here is served by a thread pinned to that
//! CPU, so the caller blocks, the ring thread runs on the same CPU, and its reply wakes the
//! caller there.
//!
//! Left alone, the scheduler would move the woken caller to another CPU, because the ring
//! thread is still running on its own. So a ring thread enters the SCHED_IDLE class before it
//! commits its replies and waits: its CPU then counts as idle, and the caller stays. While a
//! normal-class helper (prefetch, copy-up worker) runs a job, it serves requests in the normal
//! class: they share locks, and an idle-class thread on either side of a lock starves. So it
//! does while other work on the host competes for the CPUs (`cpu_pressure`): an idle-class
//! thread then gets a CPU only when that work leaves one free.
//!
//! Invariants:
//! * One queue per possible CPU, `qid` = CPU number; the kernel uses the ring only once every
//!   queue has registered its entries, and then still sends some requests (interrupts, and
//!   everything before the ring is ready) through `/dev/fuse`, which fuser's threads keep
//!   serving.
//! * Every request taken from an entry is answered exactly once: fuser's reply objects send an
//!   error if a handler drops them, requests without a reply (FORGET, BATCH_FORGET) and
//!   malformed ones are answered here, so no entry is ever lost to the kernel.
//! * The requests run through fuser's own dispatcher (`Session::raw_dispatcher`), so access
//!   checks and parsing are the same as for `/dev/fuse`; the one exception is READ, which
//!   needs no check (the kernel checked at open, and the handle is ours) and whose data goes
//!   straight from the file into the entry's payload buffer ([`ReadInto`]), not through a
//!   reply buffer that would then be copied there.

#![deny(unsafe_code)]

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, ThreadId};

use crate::mount::cpu_pressure::CpuPressure;
use crate::mount::workers;
use crate::sys::{self, FuseRing};

/// Entries per queue: requests one CPU can have in flight at once. Requests beyond that wait
/// in the kernel.
pub const DEFAULT_DEPTH: usize = 8;

/// Payload buffer of an entry: the kernel wants room for its largest request or reply, the
/// larger of max_write and max_pages pages (both 1 MiB here, see `fuse::LayerFs::init`).
/// Untouched pages of it cost no memory.
pub const PAYLOAD_LEN: usize = 1 << 20;

const FUSE_FORGET: u32 = 2;
const FUSE_READ: u32 = 15;
const FUSE_BATCH_FORGET: u32 = 42;

/// Reads an open file's bytes into a buffer the caller owns: how ring threads answer READ
/// without a copy.
pub trait ReadInto: Send + Sync {
    /// Fill `buf` from the file behind handle `fh` at `offset`, short only at its end; the
    /// byte count, or the errno to answer.
    fn read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize, i32>;
}

/// The arguments of a READ request as `take_request` laid it out (fuse_in_header, then
/// fuse_read_in: fh, offset, size, ...): `(fh, offset, size)`.
fn read_args(request: &[u8]) -> Option<(u64, u64, u32)> {
    let word64 = |o: usize| Some(u64::from_ne_bytes(request.get(o..o + 8)?.try_into().ok()?));
    let size = u32::from_ne_bytes(request.get(56..60)?.try_into().ok()?);
    Some((word64(40)?, word64(48)?, size))
}

/// Size of the per-operation header the kernel puts in an entry's `op_in` area, for requests
/// whose header size is fixed by the protocol (7.31+ layouts). The kernel does not transmit it.
fn fixed_op_header_len(opcode: u32) -> Option<usize> {
    Some(match opcode {
        // name only, or no arguments
        1 | 5 | 6 | 10 | 11 | 17 | 24 | 38 => 0,
        2 | 9 | 12 | 13 | 14 | 22 | 23 | 27 | 34 | 36 | 42 | 50 => 8, // forget, mkdir, ... syncfs
        3 | 8 | 20 | 30 | 35 | 37 | 45 | 51 => 16, // getattr, mknod, fsync, create, rename2, tmpfile
        18 | 25 | 29 | 40 | 46 | 52 => 24,         // release, flush, releasedir, poll, lseek, statx
        39 | 43 => 32,                             // ioctl, fallocate
        15 | 16 | 28 | 44 => 40,                   // read, write, readdir, readdirplus
        31..=33 => 48,                             // getlk, setlk, setlkw
        47 => 56,                                  // copy_file_range
        4 => 88,                                   // setattr
        _ => return None,
    })
}

/// Size of the per-operation header of a request: `in.len` counts the fuse_in_header, the
/// per-operation header and the payload, so the header is what remains. The protocol table is
/// the cross-check (and the answer for SETXATTR, whose header has two sizes).
pub fn op_header_len(opcode: u32, in_len: usize, payload_len: usize) -> Option<usize> {
    const IN_HEADER: usize = 40;
    let from_len = in_len.checked_sub(IN_HEADER + payload_len);
    match (fixed_op_header_len(opcode), from_len) {
        (Some(fixed), Some(n)) if n == fixed => Some(n),
        (Some(fixed), _) => Some(fixed),
        (None, Some(n)) if opcode == 21 && (n == 8 || n == 16) => Some(n), // setxattr
        (None, n) => n,
    }
}

/// The CPUs the kernel makes queues for (`num_possible_cpus()`), if they are 0..n.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let text = text.trim();
    let last = match text.split_once('-') {
        Some(("0", last)) => last,
        None if text == "0" => "0",
        _ => {
            return Err(io::Error::other(format!(
                "unexpected possible CPUs {text:?}"
            )));
        }
    };
    last.parse::<usize>()
        .map(|n| n + 1)
        .map_err(|_| io::Error::other(format!("unexpected possible CPUs {text:?}")))
}

/// Whether this process can serve FUSE-over-io_uring: it must not accept the capability at
/// FUSE_INIT otherwise, because once accepted the kernel holds every new request until all
/// queues are registered.
pub fn usable() -> io::Result<()> {
    possible_cpus()?;
    FuseRing::probe()
}

/// Make the kernel give up on the ring after `Rings::start` failed: a registration that the
/// kernel rejects turns FUSE-over-io_uring off for the connection, and requests go through
/// `/dev/fuse` again.
pub fn give_up<FS: fuser::Filesystem>(session: &fuser::Session<FS>) -> io::Result<()> {
    use std::os::fd::AsFd;
    let ring = FuseRing::new(session.as_fd(), u16::MAX, 1, PAYLOAD_LEN)?;
    ring.register_all()?;
    let mut done = Vec::new();
    ring.wait(&mut done)?;
    match done.first() {
        Some(&(_, res)) if res < 0 => Ok(()),
        _ => Err(io::Error::other(
            "the kernel accepted a queue it should have refused",
        )),
    }
}

/// Where the reply to one ring request goes: back into its entry.
struct EntryReply {
    ring: Arc<FuseRing>,
    slot: usize,
    commit_id: u64,
    ring_thread: ThreadId,
    replied: AtomicBool,
}

impl EntryReply {
    fn commit(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        if self.replied.swap(true, Ordering::AcqRel) {
            return Err(io::Error::other("second reply to one ring request"));
        }
        // On the ring thread the next wait submits the commit together with the wait.
        let submit = std::thread::current().id() != self.ring_thread;
        self.ring.commit(self.slot, self.commit_id, data, submit)
    }

    fn commit_status(&self, unique: u64, errno: i32) -> io::Result<()> {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&16u32.to_ne_bytes());
        header[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        header[8..16].copy_from_slice(&unique.to_ne_bytes());
        self.commit(&[IoSlice::new(&header)])
    }
}

impl fuser::ReplyTarget for EntryReply {
    fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        self.commit(data)
    }
}

/// The ring threads of one mount. They end when the connection ends.
pub struct Rings {
    threads: Vec<JoinHandle<()>>,
}

impl Rings {
    /// Register one queue per CPU on the session's FUSE connection and serve it with
    /// `session`'s filesystem. Call after the session exists (FUSE_INIT done, with
    /// FUSE_OVER_IO_URING granted). `payload_len` must be at least what the kernel requires
    /// (its max_write and max_pages).
    pub fn start<FS: fuser::Filesystem + 'static>(
        session: &fuser::Session<FS>,
        depth: usize,
        payload_len: usize,
        reader: Arc<dyn ReadInto>,
    ) -> io::Result<Rings> {
        use std::os::fd::AsFd;
        let cpus = possible_cpus()?;
        let cpus_u16 = u16::try_from(cpus).map_err(|_| io::Error::other("too many CPUs"))?;
        let mut rings = Vec::with_capacity(cpus);
        for qid in 0..cpus_u16 {
            rings.push(Arc::new(FuseRing::new(
                session.as_fd(),
                qid,
                depth,
                payload_len,
            )?));
        }
        let pressure = Arc::new(CpuPressure::open());
        let mut threads = Vec::with_capacity(cpus);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        for (qid, ring) in rings.into_iter().enumerate() {
            let dispatcher = session.raw_dispatcher(&format!("ring-{qid}"));
            let ready = ready_tx.clone();
            let reader = reader.clone();
            let pressure = pressure.clone();
            let thread = std::thread::Builder::new()
                .name(format!("layerfs-ring-{qid}"))
                .spawn(move || {
                    if let Err(e) = sys::pin_to_cpu(qid) {
                        log::warn!("ring {qid}: not pinned to its CPU: {e}");
                    }
                    if let Err(e) = sys::set_idle_class(true) {
                        log::warn!("ring {qid}: not in the idle class: {e}");
                    }
                    let registered = ring.register_all();
                    let failed = registered.is_err();
                    let _ = ready.send(registered);
                    drop(ready);
                    if !failed {
                        serve(qid, &ring, &dispatcher, &*reader, &pressure);
                    }
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..cpus {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a ring thread ended during setup")),
            }
        }
        Ok(Rings { threads })
    }

    /// Wait for the ring threads to end after the connection ended, at most `limit`: an entry
    /// whose reply is still being worked on keeps its thread until the reply is committed.
    pub fn join(self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        for t in self.threads {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// The loop of one ring thread: wait for requests, dispatch them, until the connection ends.
fn serve<FS: fuser::Filesystem>(
    qid: usize,
    ring: &Arc<FuseRing>,
    dispatcher: &fuser::RawDispatcher<FS>,
    reader: &dyn ReadInto,
    pressure: &CpuPressure,
) {
    let ring_thread = std::thread::current().id();
    let mut completions = Vec::with_capacity(ring.depth());
    let mut request = Vec::with_capacity(64 * 1024);
    let mut live = ring.depth();
    let mut idle_class = true;
    while live > 0 {
        completions.clear();
        // SCHED_IDLE while waiting, when nothing else wants the CPUs: the replies this thread
        // queued are committed inside this wait, and the wakeup of their callers is what must
        // see an idle CPU.
        if !idle_class
            && !workers::helpers_busy()
            && !pressure.contended()
            && sys::set_idle_class(true).is_ok()
        {
            idle_class = true;
        }
        let waited = ring.wait(&mut completions);
        // Normal class while serving, and until the CPUs are free again, when anything else
        // runs: a normal-class helper (prefetch, copy-up worker) shares locks with requests,
        // and an idle-class holder or waiter of a lock starves behind it (cold `find`: 23 s
        // instead of 0.9 s); any other work on the host starves an idle-class thread outright
        // (see `cpu_pressure`). Otherwise staying idle-class saves two system calls (6 us)
        // per wakeup.
        if idle_class
            && (workers::helpers_busy() || pressure.contended())
            && sys::set_idle_class(false).is_ok()
        {
            idle_class = false;
        }
        if let Err(e) = waited {
            log::error!("ring {qid}: {e}");
            return;
        }
        for &(slot, result) in &completions {
            if slot >= ring.depth() {
                continue;
            }
            if result == -libc::EINTR || result == -libc::EAGAIN {
                if let Err(e) = ring.reregister(slot) {
                    log::error!("ring {qid}: {e}");
                    live -= 1;
                }
                continue;
            }
            if result < 0 {
                // ENOTCONN/ENODEV: the connection ended; anything else: the entry is gone.
                if result != -libc::ENOTCONN && result != -libc::ENODEV {
                    log::warn!("ring {qid}: entry {slot}: error {}", -result);
                }
                live -= 1;
                continue;
            }
            let (req, taken) = ring.take_request(slot, &mut request, op_header_len);
            if req.opcode == FUSE_READ && taken.is_ok() {
                if let Some((fh, offset, size)) = read_args(&request) {
                    let want = size as usize;
                    if want <= ring.payload_len() {
                        // Logged as fuser logs the requests it dispatches, so one debug log
                        // still lists every request.
                        log::debug!(
                            target: "fuser::request",
                            "FUSE({:4}) READ fh {fh}, offset {offset}, size {size} ring-{qid}, direct",
                            req.unique
                        );
                        let filled = ring.commit_filled(
                            slot,
                            req.commit_id,
                            req.unique,
                            want,
                            |buf| reader.read_into(fh, offset, buf),
                            false,
                        );
                        if let Err(e) = filled {
                            log::error!("ring {qid}: {e}");
                        }
                        continue;
                    }
                }
            }
            let reply = Arc::new(EntryReply {
                ring: ring.clone(),
                slot,
                commit_id: req.commit_id,
                ring_thread,
                replied: AtomicBool::new(false),
            });
            if let Err(e) = taken {
                // The entry still has to go back to the kernel; the request gets EIO.
                log::warn!("ring {qid}: {e}");
                if let Err(e) = reply.commit_status(req.unique, libc::EIO) {
                    log::error!("ring {qid}: {e}");
                }
                continue;
            }
            if let Err(e) = dispatcher.dispatch(&request, reply.clone()) {
                log::warn!("ring {qid}: request {}: {e}", req.unique);
                let _ = reply.commit_status(req.unique, libc::EIO);
                continue;
            }
            if (req.opcode == FUSE_FORGET || req.opcode == FUSE_BATCH_FORGET)
                && !reply.replied.load(Ordering::Acquire)
            {
                // No reply in the protocol, but the entry must go back to the kernel.
                let _ = reply.commit_status(req.unique, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_header_sizes_come_from_len_and_the_table_agrees() {
        // LOOKUP: name in the payload, no header.
        assert_eq!(op_header_len(1, 40 + 6, 6), Some(0));
        // GETATTR: 16-byte header, no payload.
        assert_eq!(op_header_len(3, 56, 0), Some(16));
        // WRITE: 40-byte header and the data.
        assert_eq!(op_header_len(16, 40 + 40 + 4096, 4096), Some(40));
        // SETXATTR: 8 or 16 bytes depending on FUSE_SETXATTR_EXT; only len tells.
        assert_eq!(op_header_len(21, 40 + 16 + 10, 10), Some(16));
        assert_eq!(op_header_len(21, 40 + 8 + 10, 10), Some(8));
        // A len that disagrees with the protocol loses to the protocol.
        assert_eq!(op_header_len(3, 40 + 99, 0), Some(16));
        // Unknown opcode: whatever len says.
        assert_eq!(op_header_len(4000, 40 + 12, 4), Some(8));
        assert_eq!(op_header_len(4000, 10, 4), None);
    }
}
