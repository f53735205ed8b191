//! Unmounting in tests, shared by the FUSE and the store helpers.

use std::path::Path;
use std::time::Duration;

use layerfs::sys;

/// Unmount `path`, retrying while it is busy, then detach it. A busy mount here is a test
/// artifact: another test thread forked a child (`Command`) while this one still had files
/// open in the mount, and the child holds copies of them until it execs. The system call is
/// made directly, so this unmount forks no child of its own.
pub fn unmount_retrying(path: &Path) {
    for _ in 0..100 {
        match sys::umount(path, false) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            // Unmounted, or not mounted (EINVAL): nothing left to do.
            _ => return,
        }
    }
    eprintln!("{} still busy after 2 s: detaching it", path.display());
    let _ = sys::umount(path, true);
}
