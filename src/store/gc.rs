//! Garbage collection: remove blobs and layers nothing uses, stale staging directories and
//! stale mount leases.
//!
//! Live, under the exclusive store lock:
//! * every blob reachable from `index.json` (manifests, nested indexes, configs, layers) and
//!   every layer in those configs' `rootfs.diff_ids`;
//! * every layer listed in `containers/*/image` (a container's upper only makes sense over the
//!   layers it was created on, mounted or not);
//! * every layer listed in a mount lease whose lock is still held (a live `layerfs mount`);
//! * every layer (and its blob) a build cache entry names (`cache/entries/*.json`, written by
//!   `build::cache`; `layerfs cache prune` drops entries).
//!
//! Partial registry downloads nobody holds (`registry/partial/`) count as staging (`tmp`).
//!
//! If anything `index.json` names cannot be read, gc stops without removing anything.

use std::collections::HashSet;
use std::os::fd::AsFd;

use super::Store;
use super::images::{self, ContainerRecord, LeaseRecord};
use super::model::{self, Index, Manifest};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::sys::{self, LockKind};

/// What gc did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub blobs: u64,
    pub layers: u64,
    pub tmp: u64,
    pub leases: u64,
    pub bytes_freed: u64,
}

fn parse_digest_name(name: &[u8]) -> Option<Digest> {
    Digest::from_hex(std::str::from_utf8(name).ok()?)
}

fn mark_manifest(
    store: &Store,
    digest: Digest,
    blobs: &mut HashSet<Digest>,
    layers: &mut HashSet<Digest>,
    depth: u32,
) -> Result<()> {
    if depth > 4 {
        return Err(Error::invalid("image indexes nested too deeply"));
    }
    blobs.insert(digest);
    let bytes = images::read_blob(store, &digest)?;
    let v: serde_json::Value = model::parse(&bytes, &format!("manifest {digest}"))?;
    if v.get("manifests").is_some() {
        let idx: Index = model::parse(&bytes, &format!("index {digest}"))?;
        for d in &idx.manifests {
            mark_manifest(store, d.digest()?, blobs, layers, depth + 1)?;
        }
        return Ok(());
    }
    let m: Manifest = model::parse(&bytes, &format!("manifest {digest}"))?;
    let config = m.config.digest()?;
    blobs.insert(config);
    for l in &m.layers {
        blobs.insert(l.digest()?);
    }
    let cfg: serde_json::Value = model::parse(&images::read_blob(store, &config)?, "image config")?;
    layers.extend(model::config_diff_ids(&cfg)?);
    Ok(())
}

/// The part of a build cache entry gc reads (see `build::cache::Entry`).
#[derive(serde::Deserialize)]
struct CacheEntryRefs {
    layer: Option<CacheLayerRefs>,
}

#[derive(serde::Deserialize)]
struct CacheLayerRefs {
    diff_id: String,
    blob: model::Descriptor,
}

/// Layers and blobs the build cache keeps. An unreadable entry keeps nothing (it is a miss
/// for `build` too).
fn mark_cache(
    store: &Store,
    blobs: &mut HashSet<Digest>,
    layers: &mut HashSet<Digest>,
) -> Result<()> {
    let dir = store.dir(b"cache/entries")?;
    for e in sys::read_dir_all(store.dir(b"cache/entries")?)
        .map_err(|e| store.err("reading the build cache", e))?
    {
        let Ok(bytes) = fsutil::read_small(dir.as_fd(), &e.name, images::MAX_JSON) else {
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<CacheEntryRefs>(&bytes) else {
            continue;
        };
        if let Some(l) = entry.layer {
            layers.insert(Digest::parse(&l.diff_id)?);
            blobs.insert(l.blob.digest()?);
        }
    }
    Ok(())
}

/// Collect garbage.
pub fn gc(store: &Store) -> Result<Report> {
    let _lock = store.lock(LockKind::Exclusive)?;
    let mut report = Report::default();
    let mut blobs: HashSet<Digest> = HashSet::new();
    let mut layers: HashSet<Digest> = HashSet::new();
    for d in &images::read_index(store)?.manifests {
        mark_manifest(store, d.digest()?, &mut blobs, &mut layers, 0)?;
    }
    mark_cache(store, &mut blobs, &mut layers)?;
    let containers = store.dir(b"containers")?;
    for e in sys::read_dir_all(store.dir(b"containers")?)
        .map_err(|e| store.err("reading containers", e))?
    {
        let Ok(name) = std::str::from_utf8(&e.name) else {
            continue;
        };
        if let Some(ContainerRecord { diff_ids, .. }) = images::container_record(store, name)? {
            for d in diff_ids {
                layers.insert(Digest::parse(&d)?);
            }
        }
    }
    drop(containers);
    let mounts = store.dir(b"mounts")?;
    for e in sys::read_dir_all(store.dir(b"mounts")?).map_err(|e| store.err("reading mounts", e))? {
        let fd = match sys::open_at(mounts.as_fd(), &e.name, libc::O_RDONLY, 0) {
            Ok(fd) => fd,
            Err(_) => continue,
        };
        if sys::flock(fd.as_fd(), LockKind::Exclusive, true).map_err(|e| store.err("lease", e))? {
            // Nobody holds it: the mount is gone.
            sys::unlink_at(mounts.as_fd(), &e.name, false).map_err(|e| store.err("lease", e))?;
            report.leases += 1;
            continue;
        }
        let bytes = fsutil::read_small(mounts.as_fd(), &e.name, images::MAX_JSON)
            .map_err(|e| store.err("reading a mount lease", e))?;
        let rec: LeaseRecord = model::parse(&bytes, "mount lease")?;
        for d in rec.diff_ids {
            layers.insert(Digest::parse(&d)?);
        }
    }
    let tmp = store.dir(b"tmp")?;
    for e in sys::read_dir_all(store.dir(b"tmp")?).map_err(|e| store.err("reading tmp", e))? {
        let stale = match sys::open_at(tmp.as_fd(), &e.name, libc::O_RDONLY, 0) {
            Ok(fd) => sys::flock(fd.as_fd(), LockKind::Exclusive, true)
                .map_err(|e| store.err("tmp", e))?,
            Err(_) => true,
        };
        if stale {
            report.bytes_freed += fsutil::remove_tree(tmp.as_fd(), &e.name)
                .map_err(|e| store.err("removing tmp", e))?;
            report.tmp += 1;
        }
    }
    // Partial downloads (registry::state) that no pull holds.
    let partial = store.dir(b"registry/partial")?;
    for e in sys::read_dir_all(store.dir(b"registry/partial")?)
        .map_err(|e| store.err("reading registry/partial", e))?
    {
        let unheld = match sys::open_at(partial.as_fd(), &e.name, libc::O_RDONLY, 0) {
            Ok(fd) => sys::flock(fd.as_fd(), LockKind::Exclusive, true)
                .map_err(|e| store.err("registry/partial", e))?,
            Err(_) => true,
        };
        if unheld {
            report.bytes_freed += fsutil::remove_tree(partial.as_fd(), &e.name)
                .map_err(|e| store.err("removing a partial download", e))?;
            report.tmp += 1;
        }
    }
    let blobdir = store.dir(b"blobs/sha256")?;
    for e in
        sys::read_dir_all(store.dir(b"blobs/sha256")?).map_err(|e| store.err("reading blobs", e))?
    {
        if parse_digest_name(&e.name).is_some_and(|d| blobs.contains(&d)) {
            continue;
        }
        report.bytes_freed += fsutil::remove_tree(blobdir.as_fd(), &e.name)
            .map_err(|e| store.err("removing a blob", e))?;
        report.blobs += 1;
    }
    let layerdir = store.dir(b"layers")?;
    for e in sys::read_dir_all(store.dir(b"layers")?).map_err(|e| store.err("reading layers", e))? {
        if parse_digest_name(&e.name).is_some_and(|d| layers.contains(&d)) {
            continue;
        }
        report.bytes_freed += fsutil::remove_tree(layerdir.as_fd(), &e.name)
            .map_err(|e| store.err("removing a layer", e))?;
        report.layers += 1;
    }
    let metadir = store.dir(b"layermeta")?;
    for e in sys::read_dir_all(store.dir(b"layermeta")?)
        .map_err(|e| store.err("reading layermeta", e))?
    {
        let live = e
            .name
            .strip_suffix(b".json")
            .and_then(parse_digest_name)
            .is_some_and(|d| layers.contains(&d));
        if !live {
            report.bytes_freed += fsutil::remove_tree(metadir.as_fd(), &e.name)
                .map_err(|e| store.err("removing layer metadata", e))?;
        }
    }
    sys::syncfs(store.fd()).map_err(|e| store.err("syncfs", e))?;
    Ok(report)
}
