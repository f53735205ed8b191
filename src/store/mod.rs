//! The layer store: an OCI image layout plus extracted layers, containers and staging.
//!
//! ```text
//! $ROOT/oci-layout               {"imageLayoutVersion":"1.0.0"}
//! $ROOT/index.json               one manifest per named image (org.opencontainers.image.ref.name)
//! $ROOT/blobs/sha256/<hex>       layer blobs, image configs, manifests (content-addressed)
//! $ROOT/layers/<diffID hex>/     one layer extracted in the upper-dir format; never written
//!                                after it is published; shared by every image that uses it
//! $ROOT/layermeta/<hex>.json     size and import time of each layer (for `layerfs layers`)
//! $ROOT/containers/<name>/       upper/, work/ and `image` (what the container was made from)
//! $ROOT/mounts/<id>.json         leases of live mounts (layers in use), flock-held by the daemon
//! $ROOT/tmp/<id>/                staging of one running command, flock-held while it runs
//! $ROOT/cache/entries/<key>.json build cache entries: step key -> layer, config, history
//! $ROOT/cache/builds/<id>.json   the last build of each Containerfile and target (explains misses)
//! $ROOT/cache/manifests/<hex>    COPY source listings those records name
//! $ROOT/cache/stat/<hex>         stat caches of build contexts (stat -> content digest)
//! $ROOT/registry/sources.json    where each blob was pulled from or pushed to (registry::state)
//! $ROOT/registry/partial/<hex>   interrupted downloads, resumed by the next pull
//! $ROOT/lock                     the store lock
//! ```
//!
//! Invariants:
//! * Everything is written in `tmp/<id>/`, fsynced (`syncfs` for extracted trees), then renamed
//!   into place; a layer directory is always what its tar extracts to (a build step's upper
//!   becomes one only once [`adopt`] made it so and a second diff agreed); `index.json` is replaced atomically and is the last write of a command, so a
//!   killed command leaves the store's images as they were before or after it. What a killed
//!   command had staged (or published but not yet referenced) is unreachable and `gc` removes it.
//! * Concurrency: the store lock is held shared by readers and exclusively by the short publish
//!   step of writers (renames, index update) and by `gc`. Slow work (extraction, compression)
//!   runs under the staging directory's own lock only, which `gc` respects.
//! * `gc` keeps every blob and layer an image references, every layer a container dir was
//!   created from, every layer of a live mount lease, and every layer a build cache entry
//!   refers to (`layerfs cache prune` drops entries). It removes partial downloads no pull
//!   holds.
//! * All access below `$ROOT` goes through directory fds with `openat2`/`*_at` calls that never
//!   follow symlinks; blob and layer names come from parsed sha256 digests only.

pub mod adopt;
pub mod gc;
pub mod images;
pub mod layers;
pub mod model;
pub mod ops;
pub mod time;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, ShowPath};
use crate::fsutil;
use crate::sys::{self, LockKind};

/// Subdirectories of the store and their modes. `layers/` and `containers/` are private: they
/// hold image files with their setuid bits and owners as the image has them.
const DIRS: &[(&[u8], u32)] = &[
    (b"blobs", 0o755),
    (b"blobs/sha256", 0o755),
    (b"layers", 0o700),
    (b"layermeta", 0o700),
    (b"containers", 0o700),
    (b"mounts", 0o700),
    (b"tmp", 0o700),
    (b"cache", 0o700),
    (b"cache/entries", 0o700),
    (b"cache/builds", 0o700),
    (b"cache/manifests", 0o700),
    (b"cache/stat", 0o700),
    (b"registry", 0o700),
    (b"registry/partial", 0o700),
];

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The default store: `/var/lib/layerfs` for root, `$XDG_DATA_HOME/layerfs` (or
/// `~/.local/share/layerfs`) otherwise.
pub fn default_root() -> PathBuf {
    if sys::geteuid() == 0 {
        return PathBuf::from("/var/lib/layerfs");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("layerfs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".local/share/layerfs")
}

/// An open store.
pub struct Store {
    root: PathBuf,
    fd: OwnedFd,
}

/// A held store lock (released on drop).
pub struct StoreLock {
    _fd: OwnedFd,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl Store {
    /// Open the store at `root`, creating its layout when missing.
    pub fn open(root: &Path) -> Result<Store> {
        if !root.exists() {
            std::fs::create_dir_all(root)
                .map_err(|e| Error::io(format!("creating store {}", root.display()), e))?;
            std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| Error::io(format!("creating store {}", root.display()), e))?;
        }
        let root = std::fs::canonicalize(root)
            .map_err(|e| Error::io(format!("store {}", root.display()), e))?;
        let fd = sys::open_dir_path(&root)
            .map_err(|e| Error::io(format!("store {}", root.display()), e))?;
        let store = Store { root, fd };
        let complete = DIRS
            .iter()
            .map(|(d, _)| *d)
            .chain([&b"index.json"[..]])
            .all(|name| {
                sys::openat2_in(
                    store.fd.as_fd(),
                    name,
                    libc::O_PATH | libc::O_NOFOLLOW,
                    0,
                    sys::Resolve::NoSymlinks,
                )
                .is_ok()
            });
        if !complete {
            let _lock = store.lock(LockKind::Exclusive)?;
            store.init()?;
        }
        Ok(store)
    }

    fn init(&self) -> Result<()> {
        for (dir, mode) in DIRS {
            let (parent, name) = crate::union::split_path(dir);
            let pfd = sys::open_dir_beneath(self.fd.as_fd(), parent)
                .map_err(|e| self.err(&format!("opening {}", ShowPath(parent)), e))?;
            match sys::mkdir_at(pfd.as_fd(), name, *mode) {
                Ok(()) => {}
                Err(e) if errno(&e) == libc::EEXIST => {}
                Err(e) => return Err(self.err(&format!("creating {}", ShowPath(dir)), e)),
            }
        }
        if sys::stat_at_opt(self.fd.as_fd(), b"oci-layout")
            .map_err(|e| self.err("stat oci-layout", e))?
            .is_none()
        {
            fsutil::write_atomic(self.fd.as_fd(), b"oci-layout", OCI_LAYOUT, 0o644)
                .map_err(|e| self.err("writing oci-layout", e))?;
        }
        if sys::stat_at_opt(self.fd.as_fd(), b"index.json")
            .map_err(|e| self.err("stat index.json", e))?
            .is_none()
        {
            let index = model::Index::default();
            images::write_index(self, &index)?;
        }
        Ok(())
    }

    /// The store's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store's directory fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// An error about something inside the store, naming the store.
    pub fn err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("store {}: {what}", self.root.display()), e)
    }

    /// Open a directory of the store (`blobs/sha256`, `layers`, ...).
    pub fn dir(&self, path: &[u8]) -> Result<OwnedFd> {
        sys::open_dir_beneath(self.fd.as_fd(), path)
            .map_err(|e| self.err(&format!("opening {}", ShowPath(path)), e))
    }

    /// Take the store lock (shared for readers, exclusive for writers).
    pub fn lock(&self, kind: LockKind) -> Result<StoreLock> {
        let fd = sys::open_at(
            self.fd.as_fd(),
            b"lock",
            libc::O_CREAT | libc::O_RDWR,
            0o600,
        )
        .map_err(|e| self.err("opening the lock file", e))?;
        sys::flock(fd.as_fd(), kind, false).map_err(|e| self.err("locking", e))?;
        Ok(StoreLock { _fd: fd })
    }

    /// A fresh staging directory under `tmp/`, locked for this process.
    pub fn staging(&self) -> Result<Staging<'_>> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir(b"tmp")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}-{}-{}",
            sys::getpid(),
            now,
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes();
        sys::mkdir_at(tmp.as_fd(), &name, 0o700).map_err(|e| self.err("creating tmp dir", e))?;
        let fd = sys::open_at(tmp.as_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| self.err("opening tmp dir", e))?;
        sys::flock(fd.as_fd(), LockKind::Exclusive, false)
            .map_err(|e| self.err("locking tmp dir", e))?;
        Ok(Staging {
            store: self,
            tmp,
            name,
            fd,
        })
    }

    /// Make `staging/from` visible as `dir/to` (a blob, a layer, a container); false when
    /// `dir/to` already exists (content-addressed: the existing one is the same).
    pub fn publish(
        &self,
        staging: &Staging<'_>,
        from: &[u8],
        dir: &[u8],
        to: &[u8],
    ) -> Result<bool> {
        let dfd = self.dir(dir)?;
        match sys::rename_at(staging.fd(), from, dfd.as_fd(), to, sys::RENAME_NOREPLACE) {
            Ok(()) => {
                sys::fsync(dfd.as_fd(), false).map_err(|e| self.err("fsync", e))?;
                Ok(true)
            }
            Err(e) if matches!(errno(&e), libc::EEXIST | libc::ENOTEMPTY) => Ok(false),
            Err(e) => Err(self.err(&format!("publishing {}/{}", ShowPath(dir), ShowPath(to)), e)),
        }
    }
}

/// One command's staging directory `tmp/<id>/`, removed with everything left in it on drop.
pub struct Staging<'s> {
    store: &'s Store,
    tmp: OwnedFd,
    name: Vec<u8>,
    fd: OwnedFd,
}

impl Staging<'_> {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The staging directory's path, for what takes paths (a mount's upper and work).
    pub fn path(&self) -> PathBuf {
        self.store
            .root
            .join("tmp")
            .join(std::ffi::OsStr::from_bytes(&self.name))
    }

    /// Flush everything staged so far to disk (before publishing).
    pub fn sync(&self) -> Result<()> {
        sys::syncfs(self.fd.as_fd()).map_err(|e| self.store.err("syncfs", e))
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if let Err(e) = fsutil::remove_tree(self.tmp.as_fd(), &self.name) {
            log::warn!(
                "store {}: removing tmp/{}: {e}",
                self.store.root.display(),
                ShowPath(&self.name)
            );
        }
    }
}

/// Validate an image name: 1-255 characters of `[A-Za-z0-9._-]` in components separated by
/// `/` or `:`, starting with a letter or digit (what skopeo and umoci accept as `oci:` refs).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.split(['/', ':']).all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "bad image name {name:?}: use letters, digits, '.', '_', '-', separated by '/' or ':'"
        )))
    }
}

/// Validate a container name: 1-128 characters of `[A-Za-z0-9._-]`, starting with a letter or
/// digit (it becomes a directory name).
pub fn validate_container(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "bad container name {name:?}: use letters, digits, '.', '_', '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "busybox:latest", "x/y:1.0", "A-b_c.d"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ":x", "a::b", "a b", "../x", "a/", "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_container("c1").unwrap();
        for bad in ["", "..", ".x", "a/b", "a:b"] {
            assert!(validate_container(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_and_staging() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("store")).unwrap();
        for f in ["oci-layout", "index.json", "blobs/sha256", "layers", "tmp"] {
            assert!(d.path().join("store").join(f).exists(), "{f}");
        }
        {
            let st = s.staging().unwrap();
            sys::mkdir_at(st.fd(), b"x", 0o755).unwrap();
            assert_eq!(
                std::fs::read_dir(d.path().join("store/tmp"))
                    .unwrap()
                    .count(),
                1
            );
        }
        assert_eq!(
            std::fs::read_dir(d.path().join("store/tmp"))
                .unwrap()
                .count(),
            0
        );
        // Reopening keeps what is there.
        drop(s);
        Store::open(&d.path().join("store")).unwrap();
    }
}
