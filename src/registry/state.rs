//! What the store remembers for registries, all under `$ROOT/registry/` (this module owns it):
//!
//! ```text
//! registry/sources.json    {"blobs": {"sha256:<hex>": ["HOST[:PORT]/REPO", ...]}}
//!                          the repositories each stored blob was pulled from or pushed to,
//!                          newest first, at most 8 per blob; a push offers them to the
//!                          registry as cross-repository mounts. A hint only: when missing or
//!                          unreadable it counts as empty. Rewritten (atomically, under the
//!                          exclusive store lock) at the end of each pull and push, dropping
//!                          blobs the store no longer has.
//! registry/partial/<hex>   a blob being downloaded, flock-held while it is written; a later
//!                          pull of the same blob resumes it with a Range request. Removed
//!                          once its layer is published, or when its bytes do not match the
//!                          digest; `gc` removes those nobody holds.
//! ```
//!
//! Partial downloads live here rather than in `tmp/`: a staging directory belongs to one
//! command and goes with it, where a partial download must outlive the command that failed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::Result;
use crate::fsutil;
use crate::store::{Staging, Store, images, model};
use crate::sys::{self, LockKind};

/// Repositories remembered per blob.
pub const MAX_SOURCES_PER_BLOB: usize = 8;
const SOURCES: &[u8] = b"registry/sources.json";

/// `registry/sources.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Sources {
    #[serde(default)]
    pub blobs: BTreeMap<String, Vec<String>>,
}

impl Sources {
    /// Repositories of `registry` (other than `repository`) that hold `digest`: the `from`
    /// of a cross-repository mount.
    pub fn mount_sources(&self, digest: &Digest, registry: &str, repository: &str) -> Vec<String> {
        let prefix = format!("{registry}/");
        self.blobs
            .get(&digest.to_string())
            .map(|repos| {
                repos
                    .iter()
                    .filter_map(|r| r.strip_prefix(&prefix))
                    // The file is ours, but what goes into a URL is checked anyway.
                    .filter(|r| *r != repository && super::reference::valid_repository(r))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Record that `repo_key` (`HOST/REPO`) holds `digests`.
    pub fn add(&mut self, repo_key: &str, digests: &[Digest]) {
        for d in digests {
            let list = self.blobs.entry(d.to_string()).or_default();
            list.retain(|r| r != repo_key);
            list.insert(0, repo_key.to_string());
            list.truncate(MAX_SOURCES_PER_BLOB);
        }
    }
}

/// Read `registry/sources.json` (empty when missing or unreadable: it is only a hint).
pub fn read_sources(store: &Store) -> Sources {
    match fsutil::read_small(store.fd(), SOURCES, images::MAX_JSON) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            log::warn!("ignoring {}: {e}", String::from_utf8_lossy(SOURCES));
            Sources::default()
        }),
        Err(_) => Sources::default(),
    }
}

/// Record that `repo_key` holds `digests`, dropping blobs the store no longer has. Call under
/// the exclusive store lock.
pub fn record_sources(store: &Store, repo_key: &str, digests: &[Digest]) -> Result<()> {
    let mut s = read_sources(store);
    s.add(repo_key, digests);
    let blobs = store.dir(b"blobs/sha256")?;
    s.blobs.retain(|d, _| {
        Digest::parse(d).is_ok_and(|d| {
            sys::stat_at_opt(blobs.as_fd(), d.hex().as_bytes())
                .ok()
                .flatten()
                .is_some()
        })
    });
    let dir = store.dir(b"registry")?;
    fsutil::write_atomic(dir.as_fd(), b"sources.json", &model::to_bytes(&s), 0o600)
        .map_err(|e| store.err("writing registry/sources.json", e))
}

/// A partial download, locked for this process until dropped.
pub struct Partial {
    pub file: File,
    name: Vec<u8>,
}

/// Open (creating) the partial download of `digest`; waits while another pull holds it. The
/// file locked is the one under the name: one removed while we waited is opened again.
pub fn open_partial(store: &Store, digest: &Digest) -> Result<Partial> {
    let dir = store.dir(b"registry/partial")?;
    let name = digest.hex().into_bytes();
    loop {
        let fd = sys::open_at(
            dir.as_fd(),
            &name,
            libc::O_CREAT | libc::O_RDWR | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| store.err("opening a partial download", e))?;
        if !sys::flock(fd.as_fd(), LockKind::Exclusive, true)
            .map_err(|e| store.err("locking a partial download", e))?
        {
            log::info!("waiting for another pull of {digest}");
            sys::flock(fd.as_fd(), LockKind::Exclusive, false)
                .map_err(|e| store.err("locking a partial download", e))?;
        }
        let held = sys::fstat(fd.as_fd()).map_err(|e| store.err("stat a partial download", e))?;
        let named = sys::stat_at_opt(dir.as_fd(), &name)
            .map_err(|e| store.err("stat a partial download", e))?;
        if named.is_some_and(|n| n.ino == held.ino && n.dev == held.dev) {
            return Ok(Partial {
                file: File::from(fd),
                name,
            });
        }
    }
}

impl Partial {
    /// Delete the partial file's name (its bytes are published, or bad); the lock lasts
    /// until the value is dropped.
    pub fn remove(&self, store: &Store) {
        if let Ok(dir) = store.dir(b"registry/partial") {
            let _ = sys::unlink_at(dir.as_fd(), &self.name, false);
        }
    }

    /// Hard-link the (complete, verified) download into `staging` as `name`. Until its name
    /// here is removed, the file must not be written again: the download code starts over
    /// instead of writing into a partial with more than one link.
    pub fn link_into(&self, store: &Store, staging: &Staging<'_>, name: &[u8]) -> Result<()> {
        let dir = store.dir(b"registry/partial")?;
        sys::link_at(dir.as_fd(), &self.name, staging.fd(), name)
            .map_err(|e| store.err("linking a download into staging", e))
    }

    /// Whether the file has other names (linked into a staging directory or the blobs by a
    /// pull that died before removing this name).
    pub fn linked_elsewhere(&self) -> Result<bool> {
        let st = sys::fstat(self.file.as_fd())
            .map_err(|e| crate::error::Error::io("stat a partial download", e))?;
        Ok(st.nlink > 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_newest_first_and_bounded() {
        let d1 = Digest::of(b"1");
        let d2 = Digest::of(b"2");
        let mut s = Sources::default();
        s.add("reg:5000/a", &[d1, d2]);
        s.add("reg:5000/b", &[d1]);
        s.add("other/c", &[d1]);
        s.add("reg:5000/a", &[d1]);
        assert_eq!(
            s.blobs[&d1.to_string()],
            ["reg:5000/a", "other/c", "reg:5000/b"]
        );
        assert_eq!(s.mount_sources(&d1, "reg:5000", "x"), ["a", "b"]);
        assert_eq!(s.mount_sources(&d1, "reg:5000", "a"), ["b"]);
        assert!(s.mount_sources(&d2, "reg", "x").is_empty());
        s.add("reg:5000/x&mount=y", &[d1]);
        assert_eq!(s.mount_sources(&d1, "reg:5000", "z"), ["a", "b"]);
        for i in 0..20 {
            s.add(&format!("r/{i}"), &[d2]);
        }
        assert_eq!(s.blobs[&d2.to_string()].len(), MAX_SOURCES_PER_BLOB);
        assert_eq!(s.blobs[&d2.to_string()][0], "r/19");
    }

    #[test]
    fn sources_file_round_trip_drops_missing_blobs() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("s")).unwrap();
        assert_eq!(read_sources(&store), Sources::default());
        let staging = store.staging().unwrap();
        let kept = images::put_blob(&store, &staging, b"kept").unwrap();
        let gone = Digest::of(b"gone");
        record_sources(&store, "h/r", &[kept, gone]).unwrap();
        let s = read_sources(&store);
        assert_eq!(s.blobs.len(), 1);
        assert_eq!(s.mount_sources(&kept, "h", "x"), ["r"]);
        std::fs::write(t.path().join("s/registry/sources.json"), "{").unwrap();
        assert_eq!(read_sources(&store), Sources::default());
    }

    #[test]
    fn partial_is_locked_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("s")).unwrap();
        let d = Digest::of(b"x");
        let p = open_partial(&store, &d).unwrap();
        let path = t.path().join("s/registry/partial").join(d.hex());
        assert!(path.exists());
        let other = File::open(&path).unwrap();
        assert!(!sys::flock(other.as_fd(), LockKind::Exclusive, true).unwrap());
        p.remove(&store);
        assert!(!path.exists());
        drop(p);
    }
}
