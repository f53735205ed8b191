//! The fuse module's `enable_uring` parameter: FUSE-over-io_uring is offered to a daemon only
//! while it is on, and it is off by default upstream. A root mount that asks for io_uring (the
//! default) turns it on, as dockerd turns on IP forwarding for its containers: the parameter
//! only lets FUSE daemons ask for the rings, and daemons that do not ask are served as before,
//! so nothing else on the host changes.
//!
//! Invariants: the parameter is never turned off here; a kernel without it is left alone; a
//! mount that cannot write it (rootless, or root in a user namespace) says once how to turn it
//! on for the host and mounts over `/dev/fuse`.

use std::io::Write;
use std::path::Path;

/// Where the kernel exposes the parameter (Linux 6.14+, with the fuse module loaded).
pub const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// What a mount does about the parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The mount does not ask for io_uring (`-o io_uring=off`): leave the parameter as it is.
    NotAsked,
    /// The kernel has no such parameter (no FUSE-over-io_uring): mount as always.
    Absent,
    AlreadyOn,
    /// Off, and this process may write it.
    TurnOn,
    /// Off, and this process cannot change it: tell the user how.
    Hint,
}

/// Pure decision: `value` is the parameter's content (`None`: no parameter), `privileged`
/// whether this process may try to write it (root in the host's user namespace).
pub fn decide(asked: bool, value: Option<&str>, privileged: bool) -> Decision {
    if !asked {
        return Decision::NotAsked;
    }
    match value.map(str::trim) {
        None => Decision::Absent,
        Some("Y" | "y" | "1") => Decision::AlreadyOn,
        Some(_) if privileged => Decision::TurnOn,
        Some(_) => Decision::Hint,
    }
}

/// The one-time host set-up that gives every mount the rings.
pub const HOST_SETUP: &str = "echo 'options fuse enable_uring=1' >/etc/modprobe.d/fuse-uring.conf \
                              and, until the next boot, echo Y >/sys/module/fuse/parameters/enable_uring";

/// Measured on this project's bench (README, Speed): time over `/dev/fuse` / time over the rings.
const SPEED_UP: &str = "1.3-1.9x faster on metadata-heavy work";

/// Before mounting: make sure the kernel will offer FUSE-over-io_uring if the mount asks for
/// it and the parameter can be turned on. Never fails the mount.
pub fn prepare(asked: bool) {
    let param = Path::new(PARAM);
    if asked && !param.exists() && !Path::new("/sys/module/fuse").exists() {
        // The parameter appears once the module is loaded; opening /dev/fuse loads it.
        let _ = std::fs::File::open("/dev/fuse");
    }
    let value = std::fs::read_to_string(param).ok();
    let privileged = crate::sys::geteuid() == 0;
    match decide(asked, value.as_deref(), privileged) {
        Decision::NotAsked | Decision::Absent | Decision::AlreadyOn => {}
        Decision::TurnOn => match std::fs::OpenOptions::new()
            .write(true)
            .open(param)
            .and_then(|mut f| f.write_all(b"Y\n"))
        {
            Ok(()) => log::warn!(
                "turned on FUSE-over-io_uring for FUSE daemons that ask for it \
                 (fuse.enable_uring=Y, {SPEED_UP}); -o io_uring=off mounts without it"
            ),
            // Root in a user namespace, or a read-only /sys: as for a rootless mount.
            Err(e) => log::warn!(
                "FUSE-over-io_uring is off on this host and cannot be turned on here ({e}); \
                 it would make this mount {SPEED_UP}. One-time host set-up, as root: {HOST_SETUP}"
            ),
        },
        Decision::Hint => log::warn!(
            "FUSE-over-io_uring is off on this host (fuse.enable_uring=N); it would make this \
             mount {SPEED_UP}. One-time host set-up, as root: {HOST_SETUP}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        use Decision::*;
        let cases: &[(bool, Option<&str>, bool, Decision)] = &[
            (false, Some("N\n"), true, NotAsked),
            (false, None, true, NotAsked),
            (true, None, true, Absent),
            (true, None, false, Absent),
            (true, Some("Y\n"), true, AlreadyOn),
            (true, Some("Y\n"), false, AlreadyOn),
            (true, Some("N\n"), true, TurnOn),
            (true, Some("N\n"), false, Hint),
            (true, Some("0"), true, TurnOn),
        ];
        for &(asked, value, privileged, want) in cases {
            assert_eq!(
                decide(asked, value, privileged),
                want,
                "{asked} {value:?} {privileged}"
            );
        }
    }
}
