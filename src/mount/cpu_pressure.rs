//! Whether other work is competing for the CPUs, from the kernel's CPU pressure stall
//! information (`/proc/pressure/cpu`).
//!
//! The io_uring ring threads wait in the SCHED_IDLE class so that the caller they wake stays
//! on its CPU (see `uring`). That only pays while the CPUs are otherwise idle: a SCHED_IDLE
//! thread gets a CPU only when no normal thread wants it, so with any other work running (a
//! compiler at nice 10 was enough) each request waited for a scheduler tick. 3,000 cold 4 KiB
//! reads took 9-12 s instead of 0.4 s over `/dev/fuse`. So the ring threads stay in the normal
//! class while this says the host is contended. The `/dev/fuse` loop's busy polling asks the
//! same question for the same reason (`busypoll`): spinning takes a CPU from other work.
//!
//! The pressure alone cannot tell: a caller and the ring thread serving it wait for each other's
//! CPU too (5 warm `grep -r` over 10,000 files: 20% stall with nothing else running), and
//! leaving the idle class for that made those greps 40-50% slower. So the sampling ring thread
//! also reads how many tasks are runnable (`/proc/loadavg`): while it serves, its caller waits
//! for the reply, so any runnable task beyond itself is other work.
//!
//! Invariants: the files are read at most once per [`SAMPLE`] by whichever thread asks first
//! after it elapsed (the others keep the last answer), always by a thread that is serving a
//! request (a ring thread, or the `/dev/fuse` loop);
//! the answer is "contended" when, over the last sample, some runnable task waited for a CPU
//! more than [`THRESHOLD_PERMILLE`] of the time and, when sampled, another task than the
//! sampler was runnable. Without the pressure file (a kernel without PSI, or `psi=0`) the
//! answer is always "contended": a request that starves costs far more than a wake-up on
//! another CPU.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::sys;

/// How often the pressure is read.
pub const SAMPLE: std::time::Duration = std::time::Duration::from_millis(50);

/// Share of a sample (in thousandths) during which some task waited for a CPU, above which
/// the host counts as contended.
pub const THRESHOLD_PERMILLE: u64 = 100;

/// The host's CPU pressure, sampled.
pub struct CpuPressure {
    file: Option<OwnedFd>,
    loadavg: Option<OwnedFd>,
    epoch: Instant,
    /// Microseconds since `epoch` of the next sample; a thread that moves it samples.
    next_sample_us: AtomicU64,
    /// `some total=` (microseconds of stall) and when it was read.
    last_total_us: AtomicU64,
    last_read_us: AtomicU64,
    contended: AtomicBool,
}

impl CpuPressure {
    pub fn open() -> CpuPressure {
        let file = std::fs::File::open("/proc/pressure/cpu")
            .ok()
            .map(OwnedFd::from);
        let loadavg = std::fs::File::open("/proc/loadavg").ok().map(OwnedFd::from);
        let pressure = CpuPressure {
            file,
            loadavg,
            epoch: Instant::now(),
            next_sample_us: AtomicU64::new(0),
            last_total_us: AtomicU64::new(0),
            last_read_us: AtomicU64::new(0),
            contended: AtomicBool::new(true),
        };
        // A file that exists but cannot be read (PSI compiled in, switched off) counts as absent.
        match pressure.read_total() {
            Some(total) => {
                pressure.last_total_us.store(total, Ordering::Relaxed);
                pressure.contended.store(false, Ordering::Relaxed);
                pressure
            }
            None => CpuPressure {
                file: None,
                ..pressure
            },
        }
    }

    /// Whether other work competes for the CPUs now (as of the last sample).
    pub fn contended(&self) -> bool {
        if self.file.is_none() {
            return true;
        }
        let now = self.epoch.elapsed().as_micros() as u64;
        let next = self.next_sample_us.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_sample_us
                .compare_exchange(
                    next,
                    now + SAMPLE.as_micros() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            if let Some(total) = self.read_total() {
                let before = self.last_total_us.swap(total, Ordering::Relaxed);
                let since = self.last_read_us.swap(now, Ordering::Relaxed);
                let stalled = is_contended(total.saturating_sub(before), now.saturating_sub(since));
                let others = self.read_running().is_none_or(|running| running > 1);
                self.contended.store(stalled && others, Ordering::Relaxed);
            }
        }
        self.contended.load(Ordering::Relaxed)
    }

    fn read_running(&self) -> Option<u64> {
        let fd = self.loadavg.as_ref()?;
        let mut buf = [0u8; 128];
        let n = sys::pread(fd.as_fd(), &mut buf, 0).ok()?;
        runnable(&buf[..n])
    }

    fn read_total(&self) -> Option<u64> {
        let fd = self.file.as_ref()?;
        let mut buf = [0u8; 256];
        let n = sys::pread(fd.as_fd(), &mut buf, 0).ok()?;
        some_total(&buf[..n])
    }
}

/// The `total=` of the `some` line of a pressure file: microseconds during which at least one
/// task waited.
pub fn some_total(text: &[u8]) -> Option<u64> {
    let line = text
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"some "))?;
    let field = line
        .split(|&b| b == b' ')
        .find_map(|f| f.strip_prefix(b"total="))?;
    std::str::from_utf8(field).ok()?.trim().parse().ok()
}

/// The runnable tasks of `/proc/loadavg` (its fourth field, `running/total`).
pub fn runnable(text: &[u8]) -> Option<u64> {
    let field = text.split(|&b| b == b' ').nth(3)?;
    let running = field.split(|&b| b == b'/').next()?;
    std::str::from_utf8(running).ok()?.parse().ok()
}

/// Whether `stalled_us` of stall over `elapsed_us` of wall time is contention.
pub fn is_contended(stalled_us: u64, elapsed_us: u64) -> bool {
    elapsed_us > 0
        && stalled_us.saturating_mul(1000) > elapsed_us.saturating_mul(THRESHOLD_PERMILLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_some_line() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (
                b"some avg10=32.99 avg60=39.24 avg300=38.39 total=2014429502\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
                Some(2014429502),
            ),
            (b"full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n", None),
            (b"some avg10=0.00 avg60=0.00 avg300=0.00 total=\n", None),
            (b"some avg10=0.00 total=12", Some(12)),
            (b"", None),
            (b"some total=x1\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(some_total(text), *want, "{}", text.escape_ascii());
        }
    }

    #[test]
    fn parses_loadavg() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"0.00 0.01 0.05 1/123 4567\n", Some(1)),
            (b"4.62 3.48 3.12 7/301 99999\n", Some(7)),
            (b"0.00 0.01 0.05\n", None),
            (b"0.00 0.01 0.05 x/1 2\n", None),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(runnable(text), *want, "{}", text.escape_ascii());
        }
    }

    #[test]
    fn contention_threshold() {
        let cases = [
            (0, 50_000, false),
            (5_000, 50_000, false), // 10%: not above
            (5_001, 50_000, true),
            (50_000, 50_000, true),
            (100, 0, false),     // no time passed
            (u64::MAX, 1, true), // saturates, no overflow
        ];
        for (stalled, elapsed, want) in cases {
            assert_eq!(is_contended(stalled, elapsed), want, "{stalled}/{elapsed}");
        }
    }

    #[test]
    fn this_host_answers_without_panicking() {
        let p = CpuPressure::open();
        let _ = p.contended();
        let _ = p.contended();
    }
}
