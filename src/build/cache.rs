//! The build cache in the store: what a step produced, found by the step's key, and what the
//! last build of each Containerfile and target looked like (to say why a step ran).
//!
//! ```text
//! cache/entries/<key hex>.json   one step: its layer (or none), the image config after it,
//!                                its history entry, when it was made and last used
//! cache/builds/<id hex>.json     the last build of a Containerfile + target: every step's key
//!                                inputs, in order (id = digest of the file's path and target)
//! cache/manifests/<hex>          a COPY/ADD source listing (path -> digest) a record names
//! cache/stat/<hex>               a context's stat cache (id = digest of the context's path)
//! ```
//!
//! Invariants: entries are content-addressed by key and written atomically (temp file, fsync,
//! rename), so a killed build leaves complete entries or none; an entry is written only after
//! its layer is published; `gc` keeps every layer an entry names; a hit reads one small file.
//! Entries, records and manifests are parsed as untrusted input (size-limited, typed).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;

use serde::{Deserialize, Serialize};

use super::context::{EntryDigest, EntryKind, Manifest};
use super::image::RunConfig;
use crate::digest::Digest;
use crate::error::{Error, Result, ShowPath};
use crate::fsutil;
use crate::store::Store;
use crate::store::model::Descriptor;
use crate::sys;

/// Largest entry or record read back.
const MAX_RECORD: u64 = 64 << 20;
const FORMAT: u32 = 1;

/// A layer a step produced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerRef {
    pub diff_id: String,
    pub blob: Descriptor,
    /// Uncompressed size.
    pub size: u64,
}

impl LayerRef {
    pub fn diff_id(&self) -> Result<Digest> {
        Digest::parse(&self.diff_id)
    }
}

/// The history entry a step adds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default)]
    pub empty_layer: bool,
}

/// What a step produced, under its key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub format: u32,
    pub key: String,
    pub layer: Option<LayerRef>,
    pub config: RunConfig,
    pub history: HistoryEntry,
    /// Unix seconds.
    pub created: i64,
    /// When it was written (hits do not rewrite entries: a no-op rebuild writes nothing).
    /// Local bookkeeping: 0 (left out) in the copy a registry holds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_used: i64,
    /// How long the step took when it ran.
    #[serde(default)]
    pub duration_ms: u64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The format of entries and records this version writes and reads.
pub const FORMAT_VERSION: u32 = FORMAT;

fn entry_name(key: &Digest) -> Vec<u8> {
    format!("{}.json", key.hex()).into_bytes()
}

/// Look a key up: `None` when there is no usable entry (a damaged entry is a miss, and is
/// replaced when the step runs again).
pub fn lookup(store: &Store, key: &Digest) -> Result<Option<Entry>> {
    let dir = store.dir(b"cache/entries")?;
    let bytes = match fsutil::read_small(dir.as_fd(), &entry_name(key), MAX_RECORD) {
        Ok(b) => b,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(store.err("reading a build cache entry", e)),
    };
    match serde_json::from_slice::<Entry>(&bytes) {
        Ok(e) if e.format == FORMAT && e.key == key.to_string() => Ok(Some(e)),
        Ok(_) | Err(_) => {
            log::warn!("build cache entry {} is damaged: ignoring it", key.short());
            Ok(None)
        }
    }
}

/// Write (or replace) an entry.
pub fn store_entry(store: &Store, entry: &Entry) -> Result<()> {
    let key = Digest::parse(&entry.key)?;
    let dir = store.dir(b"cache/entries")?;
    let bytes = serde_json::to_vec_pretty(entry)
        .map_err(|e| Error::invalid(format!("encoding a cache entry: {e}")))?;
    fsutil::write_atomic(dir.as_fd(), &entry_name(&key), &bytes, 0o600)
        .map_err(|e| store.err("writing a build cache entry", e))
}

/// Every entry (unreadable ones skipped).
pub fn list(store: &Store) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for e in sys::read_dir_all(store.dir(b"cache/entries")?)
        .map_err(|e| store.err("reading the build cache", e))?
    {
        let Some(hex) = e.name.strip_suffix(b".json") else {
            continue;
        };
        let Some(key) = std::str::from_utf8(hex).ok().and_then(Digest::from_hex) else {
            continue;
        };
        if let Some(entry) = lookup(store, &key)? {
            out.push(entry);
        }
    }
    Ok(out)
}

/// The layers cache entries keep alive (for `gc`): diffIDs and blob digests.
pub fn referenced(store: &Store) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let mut layers = Vec::new();
    let mut blobs = Vec::new();
    for e in list(store)? {
        if let Some(l) = &e.layer {
            layers.push(l.diff_id()?);
            blobs.push(l.blob.digest()?);
        }
    }
    Ok((layers, blobs))
}

// ---------------------------------------------------------------------------------------------
// Build records

/// What one step's key was made of, kept to explain the next build's misses.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Stage index and name, and the step's index in the stage.
    pub stage: usize,
    #[serde(default)]
    pub stage_name: Option<String>,
    pub index: usize,
    /// The Containerfile line and the instruction as written.
    pub line: usize,
    pub text: String,
    /// The instruction after substitution (what the key saw).
    pub expanded: String,
    pub key: String,
    /// The state the step started from.
    pub parent_state: String,
    /// FROM: the base image's manifest digest (or `scratch`, or `stage N`).
    #[serde(default)]
    pub base: Option<String>,
    /// Build args that entered the key (a RUN's environment).
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// Every build arg in scope, for saying which one changed an instruction's substitution.
    #[serde(default)]
    pub scope: BTreeMap<String, String>,
    /// COPY/ADD: digest of the source listing (stored under `cache/manifests`).
    #[serde(default)]
    pub sources: Option<String>,
    /// COPY --from: the state of the stage or image copied from.
    #[serde(default)]
    pub from_state: Option<String>,
    pub cached: bool,
}

/// The last build of a Containerfile and target.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BuildRecord {
    pub format: u32,
    pub containerfile: String,
    pub target: Option<String>,
    pub created: i64,
    pub steps: Vec<StepRecord>,
}

/// The record id of a Containerfile (its absolute path) and target.
pub fn record_id(containerfile: &str, target: Option<&str>) -> Digest {
    let mut h = crate::digest::Hasher::default();
    h.update(b"layerfs build record v1\0");
    h.update(containerfile.as_bytes());
    h.update(b"\0");
    h.update(target.unwrap_or("").as_bytes());
    h.finish()
}

pub fn load_record(store: &Store, id: &Digest) -> Result<Option<BuildRecord>> {
    let dir = store.dir(b"cache/builds")?;
    let name = format!("{}.json", id.hex()).into_bytes();
    let bytes = match fsutil::read_small(dir.as_fd(), &name, MAX_RECORD) {
        Ok(b) => b,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(store.err("reading a build record", e)),
    };
    Ok(serde_json::from_slice::<BuildRecord>(&bytes)
        .ok()
        .filter(|r| r.format == FORMAT))
}

pub fn save_record(store: &Store, id: &Digest, record: &BuildRecord) -> Result<()> {
    let dir = store.dir(b"cache/builds")?;
    let bytes = serde_json::to_vec(record)
        .map_err(|e| Error::invalid(format!("encoding a build record: {e}")))?;
    let name = format!("{}.json", id.hex()).into_bytes();
    fsutil::write_atomic(dir.as_fd(), &name, &bytes, 0o600)
        .map_err(|e| store.err("writing a build record", e))
}

fn all_records(store: &Store) -> Result<Vec<(Vec<u8>, Option<BuildRecord>)>> {
    let mut out = Vec::new();
    for e in sys::read_dir_all(store.dir(b"cache/builds")?)
        .map_err(|e| store.err("reading build records", e))?
    {
        let record = e
            .name
            .strip_suffix(b".json")
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(Digest::from_hex)
            .map(|id| load_record(store, &id))
            .transpose()?
            .flatten();
        out.push((e.name, record));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Source listings

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "f",
        EntryKind::Dir => "d",
        EntryKind::Symlink => "l",
        EntryKind::Fifo => "p",
        EntryKind::CharDevice => "c",
        EntryKind::BlockDevice => "b",
    }
}

fn kind_of(s: &str) -> Option<EntryKind> {
    Some(match s {
        "f" => EntryKind::File,
        "d" => EntryKind::Dir,
        "l" => EntryKind::Symlink,
        "p" => EntryKind::Fifo,
        "c" => EntryKind::CharDevice,
        "b" => EntryKind::BlockDevice,
        _ => return None,
    })
}

/// One line per entry, byte-exact names in hex: `path kind mode uid gid rdev link content`.
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut out = String::new();
    for (path, e) in m {
        out.push_str(&format!(
            "{} {} {:o} {} {} {} {} {}\n",
            hex(path),
            kind_name(e.kind),
            e.mode,
            e.uid,
            e.gid,
            e.rdev,
            e.link_target.as_deref().map_or("-".to_string(), hex),
            e.content.map_or("-".to_string(), |d| d.hex()),
        ));
    }
    out.into_bytes()
}

pub fn decode_manifest(bytes: &[u8]) -> Option<Manifest> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 8 {
            return None;
        }
        out.push((
            unhex(f[0])?,
            EntryDigest {
                kind: kind_of(f[1])?,
                mode: u32::from_str_radix(f[2], 8).ok()?,
                uid: f[3].parse().ok()?,
                gid: f[4].parse().ok()?,
                rdev: f[5].parse().ok()?,
                link_target: if f[6] == "-" {
                    None
                } else {
                    Some(unhex(f[6])?)
                },
                content: if f[7] == "-" {
                    None
                } else {
                    Some(Digest::from_hex(f[7])?)
                },
            },
        ));
    }
    Some(out)
}

pub fn save_manifest(store: &Store, digest: &Digest, m: &Manifest) -> Result<()> {
    let dir = store.dir(b"cache/manifests")?;
    let name = digest.hex().into_bytes();
    if sys::stat_at_opt(dir.as_fd(), &name)
        .map_err(|e| store.err("cache manifests", e))?
        .is_some()
    {
        return Ok(());
    }
    fsutil::write_atomic(dir.as_fd(), &name, &encode_manifest(m), 0o600)
        .map_err(|e| store.err("writing a source listing", e))
}

/// The stored bytes of a source listing (what a registry gets).
pub fn manifest_bytes(store: &Store, digest: &Digest) -> Option<Vec<u8>> {
    let dir = store.dir(b"cache/manifests").ok()?;
    fsutil::read_small(dir.as_fd(), digest.hex().as_bytes(), MAX_RECORD).ok()
}

pub fn load_manifest(store: &Store, digest: &Digest) -> Option<Manifest> {
    let dir = store.dir(b"cache/manifests").ok()?;
    let bytes = fsutil::read_small(dir.as_fd(), digest.hex().as_bytes(), MAX_RECORD).ok()?;
    decode_manifest(&bytes)
}

// ---------------------------------------------------------------------------------------------
// Pruning

/// What `cache prune` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub entries: u64,
    pub records: u64,
    pub manifests: u64,
}

/// Drop cache entries no recorded last build uses (with `all`: every entry and record), and
/// source listings no record names. Their layers go at the next `gc`.
pub fn prune(store: &Store, all: bool) -> Result<Pruned> {
    let _lock = store.lock(sys::LockKind::Exclusive)?;
    let mut pruned = Pruned::default();
    let mut keep_keys = BTreeSet::new();
    let mut keep_manifests = BTreeSet::new();
    let builds = store.dir(b"cache/builds")?;
    for (name, record) in all_records(store)? {
        match record {
            Some(r) if !all => {
                for s in r.steps {
                    keep_keys.insert(s.key);
                    if let Some(m) = s.sources {
                        keep_manifests.insert(m);
                    }
                }
            }
            _ => {
                sys::unlink_at(builds.as_fd(), &name, false)
                    .map_err(|e| store.err("removing a build record", e))?;
                pruned.records += 1;
            }
        }
    }
    let entries = store.dir(b"cache/entries")?;
    for e in sys::read_dir_all(store.dir(b"cache/entries")?)
        .map_err(|e| store.err("reading the build cache", e))?
    {
        let key = e
            .name
            .strip_suffix(b".json")
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(Digest::from_hex)
            .map(|d| d.to_string());
        if key.is_some_and(|k| keep_keys.contains(&k)) {
            continue;
        }
        sys::unlink_at(entries.as_fd(), &e.name, false)
            .map_err(|err| store.err(&format!("removing {}", ShowPath(&e.name)), err))?;
        pruned.entries += 1;
    }
    let manifests = store.dir(b"cache/manifests")?;
    for e in sys::read_dir_all(store.dir(b"cache/manifests")?)
        .map_err(|e| store.err("reading source listings", e))?
    {
        let live = std::str::from_utf8(&e.name)
            .ok()
            .and_then(Digest::from_hex)
            .is_some_and(|d| keep_manifests.contains(&d.to_string()));
        if !live {
            sys::unlink_at(manifests.as_fd(), &e.name, false)
                .map_err(|err| store.err("removing a source listing", err))?;
            pruned.manifests += 1;
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_byte_names() {
        let m: Manifest = vec![
            (
                b"src/a b\xff".to_vec(),
                EntryDigest {
                    kind: EntryKind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    link_target: None,
                    content: Some(Digest::of(b"x")),
                },
            ),
            (
                b"l".to_vec(),
                EntryDigest {
                    kind: EntryKind::Symlink,
                    mode: 0o777,
                    uid: 1,
                    gid: 2,
                    rdev: 0,
                    link_target: Some(b"../x y".to_vec()),
                    content: None,
                },
            ),
        ];
        assert_eq!(decode_manifest(&encode_manifest(&m)), Some(m));
        assert_eq!(decode_manifest(b"zz f 644 0 0 0 - -\n"), None);
        assert_eq!(decode_manifest(b"61 q 644 0 0 0 - -\n"), None);
    }

    #[test]
    fn record_ids_differ_by_file_and_target() {
        let a = record_id("/p/Containerfile", None);
        assert_ne!(a, record_id("/p/Containerfile", Some("app")));
        assert_ne!(a, record_id("/q/Containerfile", None));
        assert_eq!(a, record_id("/p/Containerfile", None));
    }
}
