//! `layerfs pull`: copy an image from a registry into the store.
//!
//! 1. The manifest (OCI or Docker schema2, at most 4 MiB) is fetched and hashed: by digest
//!    it must hash to that digest, by tag to the registry's `Docker-Content-Digest` when it
//!    sends one. An index or manifest list is resolved to this host's platform (or
//!    `--platform`), and that manifest must match its descriptor's digest and size.
//! 2. The config (at most 16 MiB) must match its descriptor's digest and size.
//! 3. Each layer the store lacks is downloaded (a few at once) into
//!    `registry/partial/<hex>`, never past its descriptor's size, hashing as it goes; an
//!    interrupted download is resumed with `Range:` (here after a retry, or by a later pull).
//!    Only a blob of exactly the right size and digest goes on: through the hardened import
//!    (`layers::stage`: gzip, zstd or plain tar), whose diffID must be the config's.
//! 4. Under the exclusive store lock: layers, config and manifest are published and the name
//!    is tagged last. Manifests and configs are stored byte for byte (digests preserved).
//!
//! A failure anywhere before step 4 leaves the store as it was, except that a download cut
//! short by the network stays in `registry/partial/` to be resumed; complete downloads and
//! bytes that do not match are removed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::client::{self, Client, Req, status_error};
use super::state::{self, Partial};
use super::{Platform, Progress};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::oci::compress::Limits;
use crate::store::layers::{self, StagedLayer};
use crate::store::model::{self, Descriptor, Index, Manifest};
use crate::store::{Staging, Store, images};
use crate::sys::{self, LockKind};

/// Largest manifest or index accepted.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG: u64 = images::MAX_JSON;

/// What `Accept` asks for: the manifest kinds layerfs can store.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// What to pull and how.
pub struct PullOptions {
    /// Store name; default: the reference's `HOST/REPO:TAG`.
    pub name: Option<String>,
    pub platform: Platform,
    pub limits: Limits,
    /// Blobs downloaded at once.
    pub jobs: usize,
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct Pulled {
    pub name: String,
    pub manifest: Digest,
    pub layers: usize,
    /// Layers that had to be fetched (the rest were in the store).
    pub fetched: usize,
    /// Bytes downloaded.
    pub bytes: u64,
}

fn is_index(mt: &str) -> bool {
    mt == model::MT_INDEX || mt == model::MT_DOCKER_LIST
}

fn is_manifest(mt: &str) -> bool {
    mt == model::MT_MANIFEST || mt == model::MT_DOCKER_MANIFEST
}

/// A manifest as fetched: its bytes, media type and digest (checked).
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

fn fetch_manifest(client: &Client, reference: &str, want: Option<Digest>) -> Result<Fetched> {
    fetch_manifest_opt(client, reference, want)?.ok_or_else(|| {
        Error::invalid(format!(
            "manifest {}@{reference}: not found in the registry",
            client.reference.repo_key()
        ))
    })
}

/// Fetch and check a manifest (or index) by tag or digest; `None` when the registry has no
/// such manifest (404).
pub fn fetch_manifest_opt(
    client: &Client,
    reference: &str,
    want: Option<Digest>,
) -> Result<Option<Fetched>> {
    let what = format!("manifest {}@{reference}", client.reference.repo_key());
    let req =
        Req::new("GET", client.url(&format!("manifests/{reference}"))).header("accept", ACCEPT);
    let mut resp = client.send(&req)?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Ok(None),
        _ => return Err(status_error(&what, &mut resp)),
    }
    let content_type = client::header(&resp, "content-type")
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let header_digest = client::header(&resp, "docker-content-digest").map(str::to_string);
    let bytes = client.read_limited(&what, &mut resp, MAX_MANIFEST)?;
    let digest = Digest::of(&bytes);
    if let Some(w) = want {
        if w != digest {
            return Err(Error::invalid(format!(
                "{what}: the registry sent a manifest that hashes to {digest}, not the {w} asked \
                 for; nothing was stored"
            )));
        }
    }
    if let Some(h) = header_digest
        .as_deref()
        .filter(|h| h.starts_with("sha256:"))
    {
        if Digest::parse(h)? != digest {
            return Err(Error::invalid(format!(
                "{what}: the manifest hashes to {digest}, not to the {h} the registry claims; \
                 nothing was stored"
            )));
        }
    }
    let body_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string));
    let media_type = body_type.or(content_type).unwrap_or_default();
    if media_type.starts_with("application/vnd.docker.distribution.manifest.v1") {
        return Err(Error::invalid(format!(
            "{what}: Docker schema 1 manifests are not supported"
        )));
    }
    if !is_index(&media_type) && !is_manifest(&media_type) {
        return Err(Error::invalid(format!(
            "{what}: unsupported manifest type {media_type:?}"
        )));
    }
    Ok(Some(Fetched {
        bytes,
        media_type,
        digest,
    }))
}

/// Fetch a small blob (the config) whole, checked against its descriptor.
pub fn fetch_small_blob(client: &Client, d: &Digest, size: u64) -> Result<Vec<u8>> {
    let what = format!("blob {d}");
    let mut resp = client.send(&Req::new("GET", client.url(&format!("blobs/{d}"))))?;
    if resp.status().as_u16() != 200 {
        return Err(status_error(&what, &mut resp));
    }
    let bytes = client.read_limited(&what, &mut resp, size)?;
    if bytes.len() as u64 != size {
        return Err(Error::invalid(format!(
            "{what}: the registry sent {} bytes, the manifest says {size}; nothing was stored",
            bytes.len()
        )));
    }
    let got = Digest::of(&bytes);
    if got != *d {
        return Err(Error::invalid(format!(
            "{what}: the registry sent bytes that hash to {got}; nothing was stored"
        )));
    }
    Ok(bytes)
}

/// `bytes START-END/TOTAL` -> (start, total).
fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Why a download attempt stopped.
enum Cut {
    /// The connection broke: retry (resuming).
    Transient(Error),
    /// The registry's bytes are wrong: give up and drop them.
    Bad(Error),
    /// Anything else: give up, keeping what was downloaded.
    Fatal(Error),
}

/// One GET of the rest of a blob into `file` from `*have`, hashing into `hasher`.
#[allow(clippy::too_many_arguments)]
fn fetch_range(
    client: &Client,
    d: &Digest,
    size: u64,
    file: &mut File,
    have: &mut u64,
    hasher: &mut Hasher,
    bar: &dyn super::Bar,
    downloaded: &AtomicU64,
) -> std::result::Result<(), Cut> {
    let what = format!("blob {d}");
    let mut req = Req::new("GET", client.url(&format!("blobs/{d}")));
    // The download loop retries (and resumes); retrying inside would multiply the waits.
    req.retry = false;
    if *have > 0 {
        req = req.header("range", format!("bytes={}-", *have));
    }
    let mut resp = client.send(&req).map_err(|e| match e {
        Error::Io { .. } => Cut::Transient(e),
        e => Cut::Fatal(e),
    })?;
    let status = resp.status().as_u16();
    match status {
        206 if *have > 0 => {
            let cr = client::header(&resp, "content-range").and_then(content_range);
            match cr {
                Some((start, total)) if start == *have && total.is_none_or(|t| t == size) => {}
                _ => {
                    return Err(Cut::Bad(Error::invalid(format!(
                        "{what}: the registry answered a resume from byte {have} with {:?}",
                        client::header(&resp, "content-range")
                    ))));
                }
            }
            log::info!("{what}: resuming at byte {have} of {size}");
        }
        200 => {
            if *have > 0 {
                log::info!("{what}: the registry does not resume; starting over");
                *have = 0;
                *hasher = Hasher::default();
                bar.set(0);
                file.set_len(0)
                    .map_err(|e| Cut::Fatal(Error::io("truncating a partial download", e)))?;
            }
            if let Some(len) =
                client::header(&resp, "content-length").and_then(|v| v.parse::<u64>().ok())
            {
                if len != size {
                    return Err(Cut::Bad(Error::invalid(format!(
                        "{what}: the registry sends {len} bytes, the manifest says {size}; \
                         nothing was stored"
                    ))));
                }
            }
        }
        s if client::transient_status(s) => {
            return Err(Cut::Transient(status_error(&what, &mut resp)));
        }
        404 => {
            return Err(Cut::Fatal(Error::invalid(format!(
                "{what}: not found in the registry"
            ))));
        }
        _ => return Err(Cut::Fatal(status_error(&what, &mut resp))),
    }
    file.seek(SeekFrom::Start(*have))
        .map_err(|e| Cut::Fatal(Error::io("writing a partial download", e)))?;
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Cut::Transient(Error::io(
                    format!("{what}: download cut"),
                    e,
                )));
            }
        };
        if *have + n as u64 > size {
            return Err(Cut::Bad(Error::invalid(format!(
                "{what}: the registry sent more than the {size} bytes the manifest says; \
                 nothing was stored"
            ))));
        }
        file.write_all(&buf[..n])
            .map_err(|e| Cut::Fatal(Error::io("writing a partial download", e)))?;
        hasher.update(&buf[..n]);
        *have += n as u64;
        bar.inc(n as u64);
        downloaded.fetch_add(n as u64, Ordering::Relaxed);
    }
    if *have < size {
        return Err(Cut::Transient(Error::invalid(format!(
            "{what}: the registry ended the body at byte {have} of {size}"
        ))));
    }
    Ok(())
}

/// Download blob `d` of `size` bytes into its (locked) partial file, resuming what is there,
/// and check its size and digest. Returns the transfer's progress bar.
fn download(
    store: &Store,
    client: &Client,
    part: &mut Partial,
    d: &Digest,
    size: u64,
    progress: &dyn Progress,
    downloaded: &AtomicU64,
) -> Result<Box<dyn super::Bar>> {
    let io = |e| Error::io(format!("partial download of {d}"), e);
    if part.linked_elsewhere()? {
        // Left linked to a blob or staging directory by a pull that died: never write into
        // it; start a new file.
        part.remove(store);
        *part = state::open_partial(store, d)?;
    }
    let mut have = part.file.metadata().map_err(io)?.len();
    let mut hasher = Hasher::default();
    if have > size {
        part.file.set_len(0).map_err(io)?;
        have = 0;
    }
    // Hash what an earlier attempt left.
    let mut off = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while off < have {
        let n = part.file.read_at(&mut buf, off).map_err(io)?;
        if n == 0 {
            break;
        }
        let n = (n as u64).min(have - off) as usize;
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    if have > 0 {
        log::info!("blob {d}: {have} of {size} bytes from an earlier pull");
    }
    let bar = progress.start(&d.short(), size, have);
    // Bytes an earlier pull left may not be this registry's (or may be damaged): a digest
    // mismatch after a resume starts over once from byte 0.
    let mut resumed = have > 0;
    let mut attempt = 0;
    loop {
        if have == size {
            sys::fsync(part.file.as_fd(), true).map_err(io)?;
            let got = std::mem::take(&mut hasher).finish();
            if got == *d {
                break;
            }
            if resumed {
                log::info!("blob {d}: the resumed download hashes to {got}; starting over");
                resumed = false;
                part.file.set_len(0).map_err(io)?;
                have = 0;
                bar.set(0);
                continue;
            }
            part.remove(store);
            bar.finish("bad digest");
            return Err(Error::invalid(format!(
                "blob {d}: the registry sent {size} bytes that hash to {got}; nothing was stored"
            )));
        }
        let before = have;
        match fetch_range(
            client,
            d,
            size,
            &mut part.file,
            &mut have,
            &mut hasher,
            &*bar,
            downloaded,
        ) {
            Ok(()) => {}
            Err(Cut::Bad(e)) => {
                // Do not keep wrong bytes for a resume.
                part.remove(store);
                bar.finish("failed");
                return Err(e);
            }
            Err(Cut::Fatal(e)) => {
                bar.finish("failed");
                return Err(e);
            }
            Err(Cut::Transient(e)) => {
                if have > before {
                    attempt = 0;
                }
                if attempt >= client.retries() {
                    bar.finish("failed");
                    return Err(Error::invalid(format!(
                        "{e} (gave up after {attempt} retries; {have} of {size} bytes are kept \
                         and the next pull resumes them)"
                    )));
                }
                let wait = client::backoff(attempt, None);
                log::info!("{e}; retrying in {wait:?}");
                std::thread::sleep(wait);
                attempt += 1;
            }
        }
    }
    bar.note("extracting");
    Ok(bar)
}

fn blob_exists(store: &Store, d: &Digest) -> Result<bool> {
    let dir = store.dir(b"blobs/sha256")?;
    Ok(sys::stat_at_opt(dir.as_fd(), d.hex().as_bytes())
        .map_err(|e| store.err("stat blob", e))?
        .is_some())
}

/// A layer fetched and staged, waiting for the publish step.
struct Staged<'s> {
    staging: Staging<'s>,
    layer: StagedLayer,
    partial: Option<Partial>,
    /// The media type the blob's bytes have (sniffed: tar, gzip or zstd).
    sniffed: String,
}

/// Fetch (or take from the store's blobs) and stage one layer.
#[allow(clippy::too_many_arguments)]
fn fetch_layer<'s>(
    store: &'s Store,
    client: &Client,
    desc: &Descriptor,
    want: &Digest,
    limits: Limits,
    progress: &dyn Progress,
    downloaded: &AtomicU64,
) -> Result<Staged<'s>> {
    let d = desc.digest()?;
    // The partial's lock first: another pull of this blob may publish it while we wait.
    let mut part = state::open_partial(store, &d)?;
    let local = {
        let _lock = store.lock(LockKind::Shared)?;
        let dir = store.dir(b"blobs/sha256")?;
        match sys::open_at(dir.as_fd(), d.hex().as_bytes(), libc::O_RDONLY, 0) {
            Ok(fd) => Some(File::from(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(store.err(&format!("opening blob {d}"), e)),
        }
    };
    let sniffed = std::cell::RefCell::new(String::new());
    let check = |mut layer: StagedLayer| {
        sniffed.replace(layer.blob.media_type.clone());
        if layer.blob.size != desc.size {
            return Err(Error::invalid(format!(
                "layer {d}: {} bytes, the manifest says {}",
                layer.blob.size, desc.size
            )));
        }
        if layer.diff_id != *want {
            return Err(Error::invalid(format!(
                "layer {d}: its diffID is {}, the config says {want}; nothing was stored",
                layer.diff_id
            )));
        }
        layer.blob = desc.clone();
        Ok(layer)
    };
    if let Some(f) = local {
        // The blob is stored (its layer directory is not): extract a copy of it.
        part.remove(store);
        let staging = store.staging()?;
        let layer = layers::stage(&staging, f, limits, Some(d), &|_| {})
            .map_err(|e| Error::invalid(format!("layer {d}: {e}")))
            .and_then(check)?;
        return Ok(Staged {
            staging,
            layer,
            partial: None,
            sniffed: sniffed.take(),
        });
    }
    let bar = download(
        store, client, &mut part, &d, desc.size, progress, downloaded,
    )?;
    // The verified download is linked into the staging directory as the blob: extracted
    // from there and published by a rename, never copied.
    let staged = (|| {
        let staging = store.staging()?;
        part.link_into(store, &staging, layers::STAGED_BLOB)?;
        let layer = layers::stage_linked(&staging, limits, d, &|_| {})
            .map_err(|e| Error::invalid(format!("layer {d}: {e}")))
            .and_then(check)?;
        Ok((staging, layer))
    })();
    bar.finish(if staged.is_ok() { "done" } else { "failed" });
    match staged {
        Ok((staging, layer)) => Ok(Staged {
            staging,
            layer,
            partial: Some(part),
            sniffed: sniffed.take(),
        }),
        Err(e) => {
            // A complete download that cannot be used is not kept.
            part.remove(store);
            Err(e)
        }
    }
}

/// What [`pull_layer`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerPulled {
    /// The blob had to be downloaded (else the store had it).
    pub fetched: bool,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// Pull one layer into the store (the build cache's import): the blob `desc` names, whose
/// bytes must be of its (OCI layer) media type, whose diffID must be `diff_id` and whose
/// uncompressed size must be `tar_size` when given.
/// Downloaded, verified and extracted as `pull` does for an image's layers (resumable,
/// digest and size checked, hardened import), then published under the store lock; the
/// repository is recorded as a source of the blob. Nothing is stored when a check fails.
pub fn pull_layer(
    store: &Store,
    client: &Client,
    desc: &Descriptor,
    diff_id: &Digest,
    tar_size: Option<u64>,
    limits: Limits,
    progress: &dyn Progress,
) -> Result<LayerPulled> {
    let blob = desc.digest()?;
    if desc.media_type.contains("nondistributable") || desc.media_type.contains("foreign") {
        return Err(Error::invalid(format!(
            "layer {blob}: non-distributable layers are not supported"
        )));
    }
    let have = {
        let _lock = store.lock(LockKind::Shared)?;
        layers::exists(store, diff_id)? && blob_exists(store, &blob)?
    };
    if have {
        return Ok(LayerPulled::default());
    }
    let downloaded = AtomicU64::new(0);
    let staged = fetch_layer(store, client, desc, diff_id, limits, progress, &downloaded)?;
    let refuse = |why: String| {
        if let Some(p) = &staged.partial {
            p.remove(store);
        }
        Err(Error::invalid(format!(
            "layer {blob}: {why}; nothing was stored"
        )))
    };
    if let Some(want) = tar_size {
        if staged.layer.tar_size != want {
            return refuse(format!(
                "{} bytes uncompressed, {want} expected",
                staged.layer.tar_size
            ));
        }
    }
    if staged.sniffed != desc.media_type {
        return refuse(format!(
            "its bytes are {}, the descriptor says {}",
            staged.sniffed, desc.media_type
        ));
    }
    let lock = store.lock(LockKind::Exclusive)?;
    layers::publish(store, &staged.staging, &staged.layer)?;
    if let Err(e) = state::record_sources(store, &client.reference.repo_key(), &[blob]) {
        log::warn!("not recording where the blob came from: {e}");
    }
    drop(lock);
    if let Some(p) = staged.partial {
        p.remove(store);
    }
    Ok(LayerPulled {
        fetched: true,
        bytes: downloaded.load(Ordering::Relaxed),
    })
}

/// Choose the manifest of `platform` in an index.
fn pick_platform(index: &Index, platform: &Platform) -> Result<Descriptor> {
    if let Some(d) = index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
    {
        return Ok(d.clone());
    }
    let have: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| {
            let p = d.platform.as_ref()?;
            let f = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
            Some(format!("{}/{}", f("os"), f("architecture")))
        })
        .collect();
    Err(Error::invalid(format!(
        "no {platform} image in the index (it has {}); choose one with --platform",
        if have.is_empty() {
            "none with a platform".to_string()
        } else {
            have.join(", ")
        }
    )))
}

/// Pull `client.reference` into the store.
pub fn pull(
    store: &Store,
    client: &Client,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<Pulled> {
    let r = &client.reference;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => r
            .default_name()
            .ok_or_else(|| Error::invalid("a pull by digest needs --name"))?,
    };
    crate::store::validate_name(&name)?;
    let mut m = fetch_manifest(client, &r.manifest_ref(), r.digest)?;
    if is_index(&m.media_type) {
        let index: Index = model::parse(&m.bytes, "image index")?;
        let desc = pick_platform(&index, &opts.platform)?;
        let d = desc.digest()?;
        if desc.size > MAX_MANIFEST {
            return Err(Error::invalid(format!(
                "manifest {d} is {} bytes, more than the {MAX_MANIFEST} accepted",
                desc.size
            )));
        }
        m = fetch_manifest(client, &d.to_string(), Some(d))?;
        if m.bytes.len() as u64 != desc.size {
            return Err(Error::invalid(format!(
                "manifest {d}: {} bytes, the index says {}",
                m.bytes.len(),
                desc.size
            )));
        }
        if !is_manifest(&m.media_type) {
            return Err(Error::invalid(format!(
                "manifest {d}: an index inside an index is not supported"
            )));
        }
    }
    let manifest: Manifest = model::parse(&m.bytes, &format!("manifest {}", m.digest))?;
    let config_digest = manifest.config.digest()?;
    let config_size = manifest.config.size;
    if config_size > MAX_CONFIG {
        return Err(Error::invalid(format!(
            "config {config_digest} is {config_size} bytes, more than the {MAX_CONFIG} accepted"
        )));
    }
    let have_config = {
        let _lock = store.lock(LockKind::Shared)?;
        blob_exists(store, &config_digest)?
    };
    let config_bytes = if have_config {
        images::read_blob(store, &config_digest)?
    } else {
        fetch_small_blob(client, &config_digest, config_size)?
    };
    if config_bytes.len() as u64 != config_size {
        return Err(Error::invalid(format!(
            "config {config_digest}: {} bytes, the manifest says {config_size}",
            config_bytes.len()
        )));
    }
    let config: serde_json::Value =
        model::parse(&config_bytes, &format!("config {config_digest}"))?;
    let diff_ids = model::config_diff_ids(&config)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::invalid(format!(
            "image {}: the config lists {} layers, the manifest {}",
            m.digest,
            diff_ids.len(),
            manifest.layers.len()
        )));
    }
    let mut todo = VecDeque::new();
    for (i, (ldesc, want)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
        if ldesc.media_type.contains("nondistributable") || ldesc.media_type.contains("foreign") {
            return Err(Error::invalid(format!(
                "layer {i}: non-distributable layers are not supported"
            )));
        }
        let blob = ldesc.digest()?;
        let have = {
            let _lock = store.lock(LockKind::Shared)?;
            layers::exists(store, want)? && blob_exists(store, &blob)?
        };
        if !have
            && !todo
                .iter()
                .any(|(_, d, _): &(usize, &Descriptor, &Digest)| d.digest == ldesc.digest)
        {
            todo.push_back((i, ldesc, want));
        }
    }
    let fetched_count = todo.len();
    let downloaded = AtomicU64::new(0);
    let queue = Mutex::new(todo);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Result<Staged<'_>>>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, 8) {
            s.spawn(|| {
                loop {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some((_, ldesc, want)) = job else {
                        break;
                    };
                    let r = fetch_layer(
                        store,
                        client,
                        ldesc,
                        want,
                        opts.limits,
                        progress,
                        &downloaded,
                    );
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            });
        }
    });
    let mut staged = Vec::new();
    let mut first_error = None;
    for r in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        match r {
            Ok(s) => staged.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        // Only downloads cut short stay (to be resumed); complete ones go with the pull.
        for s in staged {
            if let Some(p) = s.partial {
                p.remove(store);
            }
        }
        return Err(e);
    }
    // Publish: layers, then config and manifest, then the name.
    let lock = store.lock(LockKind::Exclusive)?;
    for f in &staged {
        layers::publish(store, &f.staging, &f.layer)?;
    }
    for (ldesc, id) in manifest.layers.iter().zip(&diff_ids) {
        if !layers::exists(store, id)? || !blob_exists(store, &ldesc.digest()?)? {
            return Err(Error::invalid(format!(
                "layer {id} was removed while pulling (a concurrent gc?); pull again"
            )));
        }
    }
    let staging = store.staging()?;
    let c = images::put_blob(store, &staging, &config_bytes)?;
    let md = images::put_blob(store, &staging, &m.bytes)?;
    debug_assert!(c == config_digest && md == m.digest);
    let mut blobs: Vec<Digest> = vec![config_digest];
    for l in &manifest.layers {
        blobs.push(l.digest()?);
    }
    if let Err(e) = state::record_sources(store, &r.repo_key(), &blobs) {
        log::warn!("not recording where the blobs came from: {e}");
    }
    images::tag(
        store,
        &name,
        &Descriptor::new(&m.media_type, m.digest, m.bytes.len() as u64),
    )?;
    drop(lock);
    for f in staged {
        if let Some(p) = f.partial {
            p.remove(store);
        }
    }
    Ok(Pulled {
        name,
        manifest: m.digest,
        layers: manifest.layers.len(),
        fetched: fetched_count,
        bytes: downloaded.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("bytes x-9/10"), None);
        assert_eq!(content_range("items 1-2/3"), None);
    }

    #[test]
    fn platform_choice() {
        let idx: Index = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": model::MT_MANIFEST, "size": 1, "digest": Digest::of(b"a").to_string(),
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": model::MT_MANIFEST, "size": 2, "digest": Digest::of(b"b").to_string(),
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": model::MT_MANIFEST, "size": 3, "digest": Digest::of(b"c").to_string(),
                 "platform": {"os": "unknown", "architecture": "unknown"}},
            ]
        }))
        .unwrap();
        let p = |s| Platform::parse(s).unwrap();
        assert_eq!(pick_platform(&idx, &p("linux/amd64")).unwrap().size, 2);
        assert_eq!(pick_platform(&idx, &p("linux/arm64")).unwrap().size, 1);
        let e = pick_platform(&idx, &p("linux/s390x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux/arm64, linux/amd64"), "{e}");
    }
}
