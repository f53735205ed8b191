//! Content digests of regular files keyed by their stat, so a rebuild reads only the files
//! whose stat changed (git's index does the same).
//!
//! The key is (dev, ino, size, mtime, ctime, mode); ctime moves on every change to a file's
//! content or metadata and cannot be set by users, so an unchanged key means unchanged
//! content, except for the "racy" case handled by [`RACY_WINDOW_NS`]. The cache only saves
//! work: a missing, unreadable or corrupt file loads as an empty cache.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::is_errno;
use crate::digest::Digest;
use crate::error::{Error, Result, ShowPath};
use crate::fsutil;
use crate::sys::{self, FileStat};

/// Files whose timestamps are this close to the time they were hashed are not remembered: a
/// filesystem's clock may not tick between two writes, so the next change could leave the
/// stat as it was.
pub const RACY_WINDOW_NS: i128 = 2_000_000_000;
/// Entries not used for this long are dropped when the cache is saved.
const MAX_IDLE_SECS: u64 = 30 * 86_400;
/// At most this many entries are saved (the most recently used).
const MAX_ENTRIES: usize = 1 << 20;
const CACHE_HEADER: &[u8] = b"layerfs stat cache v1\n";
const MAX_CACHE_FILE: u64 = 256 << 20;

/// What identifies a regular file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
}

impl StatKey {
    pub(super) fn of(st: &FileStat) -> StatKey {
        StatKey {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime: (st.mtime.sec, st.mtime.nsec),
            ctime: (st.ctime.sec, st.ctime.nsec),
            mode: st.mode,
        }
    }

    /// The later of mtime and ctime, in nanoseconds.
    fn changed_ns(&self) -> i128 {
        let ns = |(sec, nsec): (i64, i64)| i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        ns(self.mtime).max(ns(self.ctime))
    }
}

#[derive(Clone, Copy, Debug)]
struct Cached {
    digest: Digest,
    /// Seconds since the epoch of the last lookup or insert.
    last_used: u64,
}

/// Content digests of regular files keyed by their stat (see the module doc).
#[derive(Debug)]
pub struct StatCache {
    entries: HashMap<StatKey, Cached>,
    racy_window_ns: i128,
    hits: u64,
    files_hashed: u64,
    /// Some entry was last used more than a day before this cache was loaded: saving it
    /// refreshes the times that decide what is dropped after 30 days.
    refresh_due: bool,
    /// Entries added since the load.
    inserted: u64,
}

impl Default for StatCache {
    fn default() -> Self {
        StatCache {
            entries: HashMap::new(),
            racy_window_ns: RACY_WINDOW_NS,
            hits: 0,
            files_hashed: 0,
            refresh_due: false,
            inserted: 0,
        }
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    (now_ns() / 1_000_000_000) as u64
}

impl StatCache {
    pub fn new() -> StatCache {
        StatCache::default()
    }

    /// Load `dir/name`. A missing, unreadable or corrupt file gives an empty cache: the cache
    /// only saves work, it never decides anything.
    pub fn load(dir: BorrowedFd<'_>, name: &[u8]) -> StatCache {
        match fsutil::read_small(dir, name, MAX_CACHE_FILE) {
            Ok(bytes) => StatCache::from_bytes(&bytes).unwrap_or_else(|| {
                log::warn!("stat cache {} is corrupt; starting empty", ShowPath(name));
                StatCache::default()
            }),
            Err(e) if is_errno(&e, libc::ENOENT) => StatCache::default(),
            Err(e) => {
                log::warn!("stat cache {}: {e}; starting empty", ShowPath(name));
                StatCache::default()
            }
        }
    }

    /// [`StatCache::load`] by path.
    pub fn load_file(path: &Path) -> StatCache {
        match open_parent(path) {
            Ok((dir, name)) => StatCache::load(dir.as_fd(), name),
            Err(_) => StatCache::default(),
        }
    }

    /// Write the cache to `dir/name` atomically (temporary file, fsync, rename, fsync of the
    /// directory), dropping entries unused for 30 days.
    pub fn save(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
        fsutil::write_atomic(dir, name, &self.to_bytes(), 0o600)
            .map_err(|e| Error::io(format!("write stat cache {}", ShowPath(name)), e))
    }

    /// [`StatCache::save`] by path.
    pub fn save_file(&self, path: &Path) -> Result<()> {
        let (dir, name) = open_parent(path)?;
        self.save(dir.as_fd(), name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Files whose digest came from the cache since it was loaded.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Files read and hashed since the cache was loaded.
    pub fn files_hashed(&self) -> u64 {
        self.files_hashed
    }

    /// Whether saving would change anything that matters: entries were added, or last-use
    /// times are due for a refresh. A rebuild that changed nothing then writes (and syncs)
    /// nothing. (Files changed within the racy window are hashed every time and never added.)
    pub fn needs_save(&self) -> bool {
        self.inserted > 0 || self.refresh_due
    }

    /// For tests: remember files however recently they changed.
    #[cfg(test)]
    pub(super) fn trusting_fresh_files(mut self) -> StatCache {
        self.racy_window_ns = 0;
        self
    }

    pub(super) fn lookup(&mut self, key: &StatKey) -> Option<Digest> {
        let entry = self.entries.get_mut(key)?;
        entry.last_used = now_secs();
        self.hits += 1;
        Some(entry.digest)
    }

    /// Count a file just read and hashed, and remember its digest when that is safe: its stat
    /// did not move while it was read (`before` at open, `after` at the end; otherwise it has
    /// no single content), and it last changed longer than the racy window ago.
    pub(super) fn record(&mut self, before: StatKey, after: StatKey, digest: Digest) {
        self.files_hashed += 1;
        let now = now_ns();
        if before != after || after.changed_ns() > now - self.racy_window_ns {
            return;
        }
        let last_used = (now / 1_000_000_000) as u64;
        self.entries.insert(after, Cached { digest, last_used });
        self.inserted += 1;
    }

    /// The file format, one entry a line, then a checksum line over everything before it:
    ///
    /// ```text
    /// layerfs stat cache v1
    /// <dev> <ino> <size> <mtime s> <mtime ns> <ctime s> <ctime ns> <mode> <last used> <sha256 hex>
    /// end <sha256 hex of the lines above>
    /// ```
    fn to_bytes(&self) -> Vec<u8> {
        let oldest = now_secs().saturating_sub(MAX_IDLE_SECS);
        let mut keep: Vec<(&StatKey, &Cached)> = self
            .entries
            .iter()
            .filter(|(_, c)| c.last_used >= oldest)
            .collect();
        if keep.len() > MAX_ENTRIES {
            keep.sort_by_key(|(_, cached)| std::cmp::Reverse(cached.last_used));
            keep.truncate(MAX_ENTRIES);
        }
        keep.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = CACHE_HEADER.to_vec();
        for (k, c) in keep {
            out.extend_from_slice(
                format!(
                    "{} {} {} {} {} {} {} {} {} {}\n",
                    k.dev,
                    k.ino,
                    k.size,
                    k.mtime.0,
                    k.mtime.1,
                    k.ctime.0,
                    k.ctime.1,
                    k.mode,
                    c.last_used,
                    c.digest.hex()
                )
                .as_bytes(),
            );
        }
        let sum = Digest::of(&out);
        out.extend_from_slice(format!("end {}\n", sum.hex()).as_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<StatCache> {
        let body_len = bytes
            .strip_suffix(b"\n")?
            .iter()
            .rposition(|&b| b == b'\n')?
            + 1;
        let (body, trailer) = bytes.split_at(body_len);
        let sum = std::str::from_utf8(trailer)
            .ok()?
            .strip_prefix("end ")?
            .trim_end();
        if Digest::from_hex(sum)? != Digest::of(body) {
            return None;
        }
        let text = std::str::from_utf8(body.strip_prefix(CACHE_HEADER)?).ok()?;
        let mut cache = StatCache::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let [dev, ino, size, ms, mns, cs, cns, mode, used, hex] = f[..] else {
                return None;
            };
            let key = StatKey {
                dev: dev.parse().ok()?,
                ino: ino.parse().ok()?,
                size: size.parse().ok()?,
                mtime: (ms.parse().ok()?, mns.parse().ok()?),
                ctime: (cs.parse().ok()?, cns.parse().ok()?),
                mode: mode.parse().ok()?,
            };
            let cached = Cached {
                digest: Digest::from_hex(hex)?,
                last_used: used.parse().ok()?,
            };
            cache.entries.insert(key, cached);
        }
        let a_day_ago = now_secs().saturating_sub(24 * 3600);
        cache.refresh_due = cache.entries.values().any(|c| c.last_used < a_day_ago);
        Some(cache)
    }
}

/// The parent directory of `path`, opened, and the file name in it.
fn open_parent(path: &Path) -> Result<(OwnedFd, &[u8])> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", crate::error::show(path))))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = sys::open_dir_path(parent)
        .map_err(|e| Error::io(format!("open {}", crate::error::show(parent)), e))?;
    Ok((dir, name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache holding `n` entries as if `n` old files had been hashed.
    fn filled(n: u64) -> StatCache {
        let mut cache = StatCache::new();
        for i in 0..n {
            let key = StatKey {
                dev: 7,
                ino: 100 + i,
                size: i,
                mtime: (1_000, 5),
                ctime: (1_000, 6),
                mode: sys::S_IFREG | 0o644,
            };
            cache.record(key, key, Digest::of(&i.to_be_bytes()));
        }
        cache
    }

    #[test]
    fn round_trip_and_lookups() {
        let cache = filled(5);
        assert_eq!((cache.len(), cache.files_hashed()), (5, 5));
        let mut loaded = StatCache::from_bytes(&cache.to_bytes()).unwrap();
        assert_eq!(loaded.len(), 5);
        let key = StatKey {
            dev: 7,
            ino: 102,
            size: 2,
            mtime: (1_000, 5),
            ctime: (1_000, 6),
            mode: sys::S_IFREG | 0o644,
        };
        assert_eq!(loaded.lookup(&key), Some(Digest::of(&2u64.to_be_bytes())));
        let moved = StatKey {
            ctime: (1_000, 7),
            ..key
        };
        assert_eq!(loaded.lookup(&moved), None);
        assert_eq!(loaded.hits(), 1);
    }

    #[test]
    fn racy_and_torn_reads_are_not_remembered() {
        let mut cache = StatCache::new();
        let now = now_ns();
        let fresh = StatKey {
            dev: 1,
            ino: 1,
            size: 1,
            mtime: ((now / 1_000_000_000) as i64, 0),
            ctime: ((now / 1_000_000_000) as i64, 0),
            mode: sys::S_IFREG | 0o644,
        };
        cache.record(fresh, fresh, Digest::of(b"x"));
        let old = StatKey {
            mtime: (1_000, 0),
            ctime: (1_000, 0),
            ..fresh
        };
        let grown = StatKey { size: 2, ..old };
        cache.record(old, grown, Digest::of(b"x"));
        assert_eq!((cache.len(), cache.files_hashed()), (0, 2));
    }

    #[test]
    fn corrupt_files_load_empty() {
        let good = filled(5).to_bytes();
        let mut flipped = good.clone();
        flipped[CACHE_HEADER.len() + 2] ^= 1;
        let mut bad_header = good.clone();
        bad_header[0] = b'X';
        let mut bad_sum = good.clone();
        let last = bad_sum.len() - 2;
        bad_sum[last] ^= 1;
        for bytes in [
            &b""[..],
            b"garbage",
            b"\n\n\n",
            &good[..good.len() - 10],
            &good[..good.len() / 2],
            &flipped,
            &bad_header,
            &bad_sum,
        ] {
            assert!(
                StatCache::from_bytes(bytes).is_none(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        std::fs::write(&path, &flipped).unwrap();
        assert!(StatCache::load_file(&path).is_empty());
        assert!(StatCache::load_file(&dir.path().join("missing")).is_empty());
        std::fs::create_dir(dir.path().join("a-dir")).unwrap();
        assert!(StatCache::load_file(&dir.path().join("a-dir")).is_empty());
        // Saving replaces the corrupt file with a good one.
        filled(5).save_file(&path).unwrap();
        assert_eq!(StatCache::load_file(&path).len(), 5);
    }

    #[test]
    fn idle_entries_are_dropped_on_save() {
        let mut cache = filled(3);
        for cached in cache.entries.values_mut().take(1) {
            cached.last_used = 1;
        }
        assert_eq!(StatCache::from_bytes(&cache.to_bytes()).unwrap().len(), 2);
    }
}
