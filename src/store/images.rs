//! Images: `index.json`, resolving references, writing configs and manifests, tagging;
//! container records and mount leases (what keeps layers alive besides images).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::model::{self, Descriptor, Index, Manifest};
use super::{Staging, Store};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::sys::{self, LockKind, SetTime, XTarget};

/// Largest JSON document read from the store or an OCI layout.
pub const MAX_JSON: u64 = 16 << 20;

/// A resolved image.
#[derive(Clone, Debug)]
pub struct Image {
    /// Name it was found under (none when resolved by digest).
    pub name: Option<String>,
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub manifest: Manifest,
    pub config: Value,
}

impl Image {
    /// Layers, bottom first.
    pub fn diff_ids(&self) -> Result<Vec<Digest>> {
        let ids = model::config_diff_ids(&self.config)?;
        if ids.len() != self.manifest.layers.len() {
            return Err(Error::invalid(format!(
                "image {}: config lists {} layers, manifest {}",
                self.manifest_digest,
                ids.len(),
                self.manifest.layers.len()
            )));
        }
        Ok(ids)
    }
}

pub fn read_index(store: &Store) -> Result<Index> {
    let bytes = fsutil::read_small(store.fd(), b"index.json", MAX_JSON)
        .map_err(|e| store.err("reading index.json", e))?;
    model::parse(&bytes, "index.json")
}

pub fn write_index(store: &Store, index: &Index) -> Result<()> {
    fsutil::write_atomic(store.fd(), b"index.json", &model::to_bytes(index), 0o644)
        .map_err(|e| store.err("writing index.json", e))
}

/// Read a blob (a JSON document) and check its digest.
pub fn read_blob(store: &Store, digest: &Digest) -> Result<Vec<u8>> {
    let dir = store.dir(b"blobs/sha256")?;
    let bytes = fsutil::read_small(dir.as_fd(), digest.hex().as_bytes(), MAX_JSON)
        .map_err(|e| store.err(&format!("reading blob {digest}"), e))?;
    if Digest::of(&bytes) != *digest {
        return Err(Error::invalid(format!("blob {digest} is corrupt")));
    }
    Ok(bytes)
}

/// Load the image a manifest descriptor points at.
pub fn load(store: &Store, name: Option<String>, desc: &Descriptor) -> Result<Image> {
    let digest = desc.digest()?;
    let bytes = read_blob(store, &digest)?;
    let manifest: Manifest = model::parse(&bytes, &format!("manifest {digest}"))?;
    let config_digest = manifest.config.digest()?;
    let config: Value = model::parse(
        &read_blob(store, &config_digest)?,
        &format!("config {config_digest}"),
    )?;
    Ok(Image {
        name,
        manifest_digest: digest,
        manifest_size: bytes.len() as u64,
        manifest,
        config,
    })
}

/// Resolve a reference: an image name, or a manifest digest (`sha256:<hex>`, or a unique hex
/// prefix of at least 12 digits).
pub fn resolve(store: &Store, reference: &str) -> Result<Image> {
    let index = read_index(store)?;
    if let Some(d) = index
        .manifests
        .iter()
        .find(|d| d.ref_name() == Some(reference))
    {
        return load(store, Some(reference.to_string()), d);
    }
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let found: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| {
                d.digest
                    .strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(hex))
            })
            .collect();
        if let Some(first) = found.first() {
            if found.iter().all(|d| d.digest == first.digest) {
                return load(store, first.ref_name().map(str::to_string), first);
            }
        }
    }
    Err(Error::invalid(format!(
        "no image {reference:?} in the store"
    )))
}

/// Every named image: (name, manifest descriptor).
pub fn list(store: &Store) -> Result<Vec<(String, Descriptor)>> {
    let index = read_index(store)?;
    let mut out: Vec<(String, Descriptor)> = index
        .manifests
        .iter()
        .map(|d| (d.ref_name().unwrap_or("<none>").to_string(), d.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Stage a small blob and publish it (content-addressed, so publishing early is harmless:
/// until `index.json` names it, `gc` may collect it).
pub fn put_blob(store: &Store, staging: &Staging<'_>, bytes: &[u8]) -> Result<Digest> {
    let digest = Digest::of(bytes);
    let name = format!("json-{}", digest.hex()).into_bytes();
    let fd = sys::open_at(
        staging.fd(),
        &name,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o644,
    )
    .map_err(|e| store.err("staging a blob", e))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)
        .and_then(|()| sys::fsync(f.as_fd(), false))
        .map_err(|e| store.err("staging a blob", e))?;
    store.publish(staging, &name, b"blobs/sha256", digest.hex().as_bytes())?;
    Ok(digest)
}

/// The host's platform in OCI terms.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// What a new layer adds to an image.
pub struct NewLayer<'a> {
    pub diff_id: Digest,
    pub blob: Descriptor,
    pub created: i64,
    pub created_by: &'a str,
    pub comment: Option<&'a str>,
}

/// Write the config and manifest of `parent` (or nothing) plus `layer`; returns the manifest
/// descriptor (not yet named).
pub fn add_layer(
    store: &Store,
    staging: &Staging<'_>,
    parent: Option<&Image>,
    layer: &NewLayer<'_>,
) -> Result<Descriptor> {
    let created = super::time::rfc3339(layer.created);
    let mut config = match parent {
        Some(p) => p.config.clone(),
        None => json!({
            "architecture": host_arch(),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [],
        }),
    };
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::invalid("parent image config is not a JSON object"))?;
    obj.insert("created".into(), json!(created));
    let rootfs = obj
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    match rootfs.get_mut("diff_ids").and_then(Value::as_array_mut) {
        Some(ids) => ids.push(json!(layer.diff_id.to_string())),
        None => return Err(Error::invalid("parent image config has no rootfs.diff_ids")),
    }
    let mut entry = json!({"created": created, "created_by": layer.created_by});
    if let Some(c) = layer.comment {
        entry["comment"] = json!(c);
    }
    match obj
        .entry("history")
        .or_insert_with(|| json!([]))
        .as_array_mut()
    {
        Some(h) => h.push(entry),
        None => return Err(Error::invalid("parent image config has a bad history")),
    }
    let mut layers = parent
        .map(|p| p.manifest.layers.clone())
        .unwrap_or_default();
    layers.push(layer.blob.clone());
    write_image(store, staging, &model::to_bytes(&config), layers)
}

/// Store an image config and a manifest listing `layers` (bottom first); returns the
/// manifest's descriptor (not yet named).
pub fn write_image(
    store: &Store,
    staging: &Staging<'_>,
    config_bytes: &[u8],
    layers: Vec<Descriptor>,
) -> Result<Descriptor> {
    put_blob(store, staging, config_bytes)?;
    let (desc, bytes) = image_manifest(config_bytes, layers);
    put_blob(store, staging, &bytes)?;
    Ok(desc)
}

/// The manifest (descriptor and bytes) [`write_image`] writes for a config and its layers.
pub fn image_manifest(config_bytes: &[u8], layers: Vec<Descriptor>) -> (Descriptor, Vec<u8>) {
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(model::MT_MANIFEST.to_string()),
        config: Descriptor::new(
            model::MT_CONFIG,
            Digest::of(config_bytes),
            config_bytes.len() as u64,
        ),
        layers,
        extra: Default::default(),
    };
    let bytes = model::to_bytes(&manifest);
    let desc = Descriptor::new(model::MT_MANIFEST, Digest::of(&bytes), bytes.len() as u64);
    (desc, bytes)
}

/// Name a manifest in `index.json` (replacing what the name pointed at). Call under the
/// exclusive store lock.
pub fn tag(store: &Store, name: &str, manifest: &Descriptor) -> Result<()> {
    let mut index = read_index(store)?;
    index.manifests.retain(|d| d.ref_name() != Some(name));
    let mut desc = manifest.clone();
    let mut ann = desc.annotations.take().unwrap_or_default();
    ann.insert(model::REF_NAME.to_string(), name.to_string());
    desc.annotations = Some(ann);
    index.manifests.push(desc);
    write_index(store, &index)
}

/// Remove a name (or every name of a manifest digest); returns the names removed.
pub fn untag(store: &Store, reference: &str) -> Result<Vec<String>> {
    let mut index = read_index(store)?;
    let before = index.manifests.clone();
    index.manifests.retain(|d| d.ref_name() != Some(reference));
    if index.manifests.len() == before.len() {
        let img = resolve(store, reference)?;
        let digest = img.manifest_digest.to_string();
        index.manifests.retain(|d| d.digest != digest);
    }
    let removed: Vec<String> = before
        .iter()
        .filter(|d| !index.manifests.contains(d))
        .map(|d| d.ref_name().unwrap_or("<none>").to_string())
        .collect();
    if removed.is_empty() {
        return Err(Error::invalid(format!(
            "no image {reference:?} in the store"
        )));
    }
    write_index(store, &index)?;
    Ok(removed)
}

// ---------------------------------------------------------------------------------------------
// Containers and mount leases

/// `containers/<name>/image`: what a container's upper was made against.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    pub image: Option<String>,
    pub manifest: Option<String>,
    /// Layers of the image, bottom first.
    pub diff_ids: Vec<String>,
}

/// Paths of a container's upper and work directories.
pub struct ContainerDirs {
    pub upper: std::path::PathBuf,
    pub work: std::path::PathBuf,
}

/// Create `containers/<name>` (upper, work, record) or reuse it when it was made from the same
/// layers. Takes the exclusive store lock.
pub fn ensure_container(store: &Store, name: &str, image: Option<&Image>) -> Result<ContainerDirs> {
    super::validate_container(name)?;
    let diff_ids: Vec<String> = match image {
        Some(i) => i.diff_ids()?.iter().map(Digest::to_string).collect(),
        None => Vec::new(),
    };
    let _lock = store.lock(LockKind::Exclusive)?;
    let dirs = ContainerDirs {
        upper: store.root().join("containers").join(name).join("upper"),
        work: store.root().join("containers").join(name).join("work"),
    };
    if let Some(rec) = container_record(store, name)? {
        if rec.diff_ids != diff_ids {
            return Err(Error::invalid(format!(
                "container {name} was created from {}; mount it with the same --image",
                rec.image.as_deref().unwrap_or("no image")
            )));
        }
        return Ok(dirs);
    }
    let staging = store.staging()?;
    let mk = |p: &[u8], mode: u32| {
        sys::mkdir_at(staging.fd(), p, mode).map_err(|e| store.err("creating container", e))
    };
    mk(b"c", 0o700)?;
    let c = sys::open_at(staging.fd(), b"c", libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(|e| store.err("creating container", e))?;
    sys::mkdir_at(c.as_fd(), b"upper", 0o755).map_err(|e| store.err("creating container", e))?;
    sys::mkdir_at(c.as_fd(), b"work", 0o700).map_err(|e| store.err("creating container", e))?;
    if let Some(top) = image
        .map(Image::diff_ids)
        .transpose()?
        .and_then(|ids| ids.last().copied())
    {
        let upper = sys::open_at(c.as_fd(), b"upper", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| store.err("creating container", e))?;
        let layer = store.dir(format!("layers/{}", top.hex()).as_bytes())?;
        copy_root_attrs(layer.as_fd(), upper.as_fd())
            .map_err(|e| store.err("creating container", e))?;
    }
    let rec = ContainerRecord {
        image: image.and_then(|i| i.name.clone()),
        manifest: image.map(|i| i.manifest_digest.to_string()),
        diff_ids,
    };
    fsutil::write_atomic(c.as_fd(), b"image", &model::to_bytes(&rec), 0o644)
        .map_err(|e| store.err("creating container", e))?;
    staging.sync()?;
    if !store.publish(&staging, b"c", b"containers", name.as_bytes())? {
        return Err(Error::invalid(format!(
            "container {name} appeared meanwhile"
        )));
    }
    Ok(dirs)
}

/// Give a new container's upper root the attributes of the image's top layer root (mode,
/// owner, times, carried xattrs): the mount shows the upper root as `/`, so the container
/// starts out looking exactly like its image (containers-storage does the same).
pub fn copy_root_attrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> std::io::Result<()> {
    let st = sys::fstat(from)?;
    for name in sys::xattr_list(XTarget::Fd(from))? {
        if crate::oci::keep_xattr(&name) {
            if let Some(v) = sys::xattr_get(XTarget::Fd(from), &name)? {
                sys::xattr_set(XTarget::Fd(to), &name, &v, 0)?;
            }
        }
    }
    sys::fchown(to, Some(st.uid), Some(st.gid))?;
    sys::fchmod(to, st.perm())?;
    sys::futimens(to, SetTime::At(st.atime), SetTime::At(st.mtime))
}

/// The record of an existing container.
pub fn container_record(store: &Store, name: &str) -> Result<Option<ContainerRecord>> {
    let dir = store.dir(b"containers")?;
    let path = format!("{name}/image");
    match fsutil::read_small(dir.as_fd(), path.as_bytes(), MAX_JSON) {
        Ok(bytes) => Ok(Some(model::parse(
            &bytes,
            &format!("container {name} record"),
        )?)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            if sys::stat_at_opt(dir.as_fd(), name.as_bytes())
                .map_err(|e| store.err("stat container", e))?
                .is_some()
            {
                // A container dir without a record (made by hand): it uses no store layers.
                return Ok(Some(ContainerRecord {
                    image: None,
                    manifest: None,
                    diff_ids: Vec::new(),
                }));
            }
            Ok(None)
        }
        Err(e) => Err(store.err(&format!("reading container {name}"), e)),
    }
}

/// Remove a container (its upper and work) when no mount uses it. Returns the bytes freed.
pub fn remove_container(store: &Store, name: &str) -> Result<u64> {
    super::validate_container(name)?;
    let _lock = store.lock(LockKind::Exclusive)?;
    if container_record(store, name)?.is_none() {
        return Err(Error::invalid(format!("no container named {name}")));
    }
    for (fd, rec) in live_leases(store)? {
        if rec.container.as_deref() != Some(name) {
            continue;
        }
        // A held lease whose mount is gone: its daemon is exiting (after a plain `umount`,
        // say) and lets go of it in a moment.
        let exiting = !fsutil::is_mounted(Path::new(&rec.mountpoint));
        if exiting && wait_released(fd.as_fd(), EXITING_DAEMON_GRACE)? {
            continue;
        }
        return Err(Error::invalid(format!(
            "container {name} is mounted at {}; unmount it first",
            rec.mountpoint
        )));
    }
    // Out of sight in one rename, then deleted: a crash leaves it whole or gone (tmp/ is
    // cleaned by gc).
    let staging = store.staging()?;
    let containers = store.dir(b"containers")?;
    sys::rename_at(
        containers.as_fd(),
        name.as_bytes(),
        staging.fd(),
        b"removed",
        0,
    )
    .map_err(|e| store.err(&format!("removing container {name}"), e))?;
    sys::fsync(containers.as_fd(), false).map_err(|e| store.err("fsync", e))?;
    fsutil::remove_tree(staging.fd(), b"removed")
        .map_err(|e| store.err(&format!("removing container {name}"), e))
}

/// A live mount's claim on layers: `mounts/<id>.json`, flock-held for as long as the
/// descriptor stays open (the mount daemon inherits it across its fork).
pub struct Lease {
    _fd: OwnedFd,
    name: Vec<u8>,
}

/// The leases held right now, each with a descriptor of its file (to wait on with
/// [`wait_released`]). A lease that can be locked is stale: its mount is gone.
pub fn live_leases(store: &Store) -> Result<Vec<(OwnedFd, LeaseRecord)>> {
    let mounts = store.dir(b"mounts")?;
    let mut live = Vec::new();
    for e in sys::read_dir_all(store.dir(b"mounts")?).map_err(|e| store.err("reading mounts", e))? {
        let Ok(fd) = sys::open_at(mounts.as_fd(), &e.name, libc::O_RDONLY, 0) else {
            continue;
        };
        if sys::flock(fd.as_fd(), LockKind::Shared, true).map_err(|e| store.err("lease", e))? {
            continue;
        }
        let bytes = fsutil::read_small(mounts.as_fd(), &e.name, MAX_JSON)
            .map_err(|e| store.err("reading a mount lease", e))?;
        live.push((fd, model::parse(&bytes, "mount lease")?));
    }
    Ok(live)
}

/// How long a lease whose mount is gone may stay held before it counts as live: a daemon
/// takes milliseconds to exit; a mount in another mount namespace never shows here, and
/// costs this wait before it is reported.
const EXITING_DAEMON_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Wait until nobody holds the lease open as `fd` (its daemon has exited), up to `timeout`.
/// Returns whether it was released. A daemon goes on holding its lease for a moment after
/// its filesystem is unmounted: until it has torn down and its last thread has exited.
pub fn wait_released(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if sys::flock(fd, LockKind::Shared, true)
            .map_err(|e| Error::io("waiting for a mount lease", e))?
        {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[derive(Serialize, Deserialize)]
pub struct LeaseRecord {
    pub mountpoint: String,
    pub container: Option<String>,
    pub diff_ids: Vec<String>,
}

/// Record that a mount uses `diff_ids`; the lease lasts while the returned value (or a forked
/// copy of its descriptor) is open.
pub fn take_lease(store: &Store, record: &LeaseRecord) -> Result<Lease> {
    let _lock = store.lock(LockKind::Exclusive)?;
    let dir = store.dir(b"mounts")?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = super::time::now();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{}-{now}-{seq}.json", sys::getpid());
    let fd = sys::open_at(
        dir.as_fd(),
        name.as_bytes(),
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
        0o600,
    )
    .map_err(|e| store.err("creating a mount lease", e))?;
    sys::flock(fd.as_fd(), LockKind::Exclusive, false)
        .map_err(|e| store.err("locking a mount lease", e))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&model::to_bytes(record))
        .and_then(|()| sys::fsync(f.as_fd(), false))
        .map_err(|e| store.err("writing a mount lease", e))?;
    Ok(Lease {
        _fd: f.into(),
        name: name.into_bytes(),
    })
}

impl Lease {
    /// End the lease now and remove its file (a lease only dropped stays as a stale file
    /// until `gc`, since a forked mount daemon may still hold it).
    pub fn release(self, store: &Store) {
        if let Ok(dir) = store.dir(b"mounts") {
            let _ = sys::unlink_at(dir.as_fd(), &self.name, false);
        }
    }
}
