//! `layerfs push`: copy a stored image to a registry.
//!
//! Every blob (config and layers, a few at once): `HEAD` first, skipped when the registry has
//! it; else a cross-repository mount from a repository of the same registry that
//! `registry/sources.json` says holds it; else an upload: one `PUT` for blobs up to 8 MiB,
//! `PATCH` chunks of 16 MiB with `Content-Range` above, then the closing `PUT ?digest=`.
//! What is sent is hashed on the way and must be the digest it is sent as (a corrupt store
//! blob is refused here, not by the registry). A failed upload starts again in a new session
//! (bounded). Then the manifest is `PUT` with its media type and exact stored bytes, and the
//! registry's `Docker-Content-Digest` must be the stored manifest's digest.
//!
//! The store is only read (blobs are opened under the shared lock, then read without it:
//! an open blob survives a concurrent `gc`), except `registry/sources.json` at the end.
//!
//! [`push_manifest_with_blobs`] is the general form (any blobs, stored or in memory, and a
//! manifest under a tag): `push` of an image and the build cache's export both use it.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::client::{self, Client, Req, status_error, with_query};
use super::state::{self, Sources};
use super::{Bar, Progress};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::store::model::{self, Manifest};
use crate::store::{Store, images};
use crate::sys::{self, LockKind};

/// Blobs up to this size go in one `PUT`.
pub const MONOLITHIC_MAX: u64 = 8 << 20;
/// `PATCH` chunk size above it.
pub const CHUNK: u64 = 16 << 20;

/// What a push did.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub manifest: Digest,
    pub uploaded: usize,
    pub mounted: usize,
    pub existed: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// Where a blob's bytes are.
pub enum BlobData {
    /// An open descriptor of a stored blob file.
    Stored(File),
    /// Bytes made for this push (a cache entry's config, a source listing).
    Bytes(Vec<u8>),
}

/// A blob to push: digest, size and its bytes.
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub data: BlobData,
}

impl Blob {
    /// A blob of bytes in memory.
    pub fn bytes(data: Vec<u8>) -> Blob {
        Blob {
            digest: Digest::of(&data),
            size: data.len() as u64,
            data: BlobData::Bytes(data),
        }
    }

    /// The stored blob `desc` names, opened (call under the store lock; reading needs no
    /// lock: an open blob survives a concurrent `gc`). Its size must be the descriptor's.
    pub fn stored(store: &Store, desc: &model::Descriptor) -> Result<Blob> {
        let d = desc.digest()?;
        let dir = store.dir(b"blobs/sha256")?;
        let fd = sys::open_at(dir.as_fd(), d.hex().as_bytes(), libc::O_RDONLY, 0)
            .map_err(|e| store.err(&format!("opening blob {d}"), e))?;
        let size = sys::fstat(fd.as_fd())
            .map_err(|e| store.err(&format!("stat blob {d}"), e))?
            .size;
        if size != desc.size {
            return Err(Error::invalid(format!(
                "stored blob {d} has {size} bytes, the manifest says {} \
                 (layerfs fsck --store)",
                desc.size
            )));
        }
        Ok(Blob {
            digest: d,
            size,
            data: BlobData::Stored(File::from(fd)),
        })
    }
}

enum Outcome {
    Existed,
    Mounted,
    Uploaded,
}

/// A failed upload attempt: whether a new session may succeed.
struct Failed {
    error: Error,
    retry: bool,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        let retry = matches!(error, Error::Io { .. });
        Failed { error, retry }
    }
}

fn digest_query(d: &Digest) -> String {
    format!("sha256%3A{}", d.hex())
}

/// `POST blobs/uploads/`: a new upload session's URL.
fn start_upload(client: &Client) -> Result<String> {
    let mut resp = client.send(&Req::new("POST", client.url("blobs/uploads/")))?;
    if resp.status().as_u16() != 202 {
        return Err(status_error("starting an upload", &mut resp));
    }
    session_location(client, &resp)
}

fn session_location(client: &Client, resp: &ureq::http::Response<ureq::Body>) -> Result<String> {
    let loc = client::header(resp, "location")
        .ok_or_else(|| Error::invalid("the registry's upload answer has no Location"))?;
    client.location(loc)
}

fn read_at(blob: &Blob, off: u64, len: u64) -> Result<Vec<u8>> {
    match &blob.data {
        BlobData::Stored(file) => {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, off)
                .map_err(|e| Error::io(format!("reading blob {}", blob.digest), e))?;
            Ok(buf)
        }
        BlobData::Bytes(b) => usize::try_from(off)
            .ok()
            .zip(usize::try_from(off + len).ok())
            .and_then(|(start, end)| b.get(start..end))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::invalid(format!("blob {}: short", blob.digest))),
    }
}

fn corrupt(d: &Digest, got: Digest) -> Failed {
    Failed {
        error: Error::invalid(format!(
            "stored blob {d} hashes to {got}: the store is damaged (layerfs fsck --store)"
        )),
        retry: false,
    }
}

/// One upload session: the whole blob, monolithic or in chunks.
fn upload(
    client: &Client,
    session: Option<String>,
    blob: &Blob,
    bar: &dyn Bar,
    sent: &AtomicU64,
) -> std::result::Result<(), Failed> {
    let d = &blob.digest;
    let mut loc = match session {
        Some(l) => l,
        None => start_upload(client)?,
    };
    let mut hasher = Hasher::default();
    let octets = "application/octet-stream";
    let close = |loc: &str, body: &[u8]| -> std::result::Result<(), Failed> {
        let mut req = Req::new(
            "PUT",
            with_query(loc, &format!("digest={}", digest_query(d))),
        )
        .header("content-type", octets)
        .body(body);
        req.retry = false;
        let mut resp = client.send(&req)?;
        let status = resp.status().as_u16();
        if status != 201 {
            let retry = client::transient_status(status);
            return Err(Failed {
                error: status_error(&format!("uploading blob {d}"), &mut resp),
                retry,
            });
        }
        if let Some(h) = client::header(&resp, "docker-content-digest") {
            if h != d.to_string() {
                return Err(Failed {
                    error: Error::invalid(format!("blob {d}: the registry stored it as {h}")),
                    retry: false,
                });
            }
        }
        Ok(())
    };
    if blob.size <= MONOLITHIC_MAX {
        let data = read_at(blob, 0, blob.size)?;
        hasher.update(&data);
        let got = hasher.finish();
        if got != *d {
            return Err(corrupt(d, got));
        }
        close(&loc, &data)?;
        bar.inc(blob.size);
        sent.fetch_add(blob.size, Ordering::Relaxed);
        return Ok(());
    }
    let mut off = 0;
    while off < blob.size {
        let n = CHUNK.min(blob.size - off);
        let data = read_at(blob, off, n)?;
        hasher.update(&data);
        let mut req = Req::new("PATCH", loc.clone())
            .header("content-type", octets)
            .header("content-range", format!("{off}-{}", off + n - 1))
            .body(&data);
        req.retry = false;
        let mut resp = client.send(&req)?;
        let status = resp.status().as_u16();
        if status != 202 {
            return Err(Failed {
                error: status_error(&format!("uploading blob {d}"), &mut resp),
                retry: client::transient_status(status),
            });
        }
        loc = session_location(client, &resp)?;
        off += n;
        bar.inc(n);
        sent.fetch_add(n, Ordering::Relaxed);
    }
    let got = hasher.finish();
    if got != *d {
        return Err(corrupt(d, got));
    }
    close(&loc, &[])
}

/// Push one blob: present, mounted or uploaded.
fn push_blob(
    client: &Client,
    blob: &Blob,
    sources: &Sources,
    progress: &dyn Progress,
    sent: &AtomicU64,
) -> Result<Outcome> {
    let d = &blob.digest;
    let mut resp = client.send(&Req::new("HEAD", client.url(&format!("blobs/{d}"))))?;
    match resp.status().as_u16() {
        200 => {
            progress
                .start(&d.short(), blob.size, blob.size)
                .finish("already there");
            return Ok(Outcome::Existed);
        }
        404 => {}
        _ => return Err(status_error(&format!("checking blob {d}"), &mut resp)),
    }
    let r = &client.reference;
    let mut session = None;
    for from in sources
        .mount_sources(d, &r.registry, &r.repository)
        .iter()
        .take(3)
    {
        let url = client.url(&format!(
            "blobs/uploads/?mount={}&from={from}",
            digest_query(d)
        ));
        let mut req = Req::new("POST", url);
        req.scopes.push(format!("repository:{from}:pull"));
        let resp = client.send(&req)?;
        match resp.status().as_u16() {
            201 => {
                log::info!("blob {d}: mounted from {from}");
                progress
                    .start(&d.short(), blob.size, blob.size)
                    .finish(&format!("mounted from {from}"));
                return Ok(Outcome::Mounted);
            }
            202 => {
                // The registry could not mount it and opened an upload session instead.
                session = Some(session_location(client, &resp)?);
                break;
            }
            s => log::debug!("blob {d}: mount from {from} answered {s}"),
        }
    }
    let bar = progress.start(&d.short(), blob.size, 0);
    let mut attempt = 0;
    loop {
        match upload(client, session.take(), blob, &*bar, sent) {
            Ok(()) => {
                bar.finish("pushed");
                return Ok(Outcome::Uploaded);
            }
            Err(f) if f.retry && attempt < client.retries() => {
                let wait = client::backoff(attempt, None);
                log::info!("{}; uploading blob {d} again in {wait:?}", f.error);
                std::thread::sleep(wait);
                bar.set(0);
                attempt += 1;
            }
            Err(f) => {
                bar.finish("failed");
                return Err(f.error);
            }
        }
    }
}

/// What pushing a set of blobs did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlobsPushed {
    pub uploaded: usize,
    pub mounted: usize,
    pub existed: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// Push `blobs` to `client.reference`'s repository, `jobs` at a time: each one skipped when
/// the registry has it, mounted from a repository `sources` names, or uploaded.
pub fn push_blobs(
    client: &Client,
    blobs: &[Blob],
    sources: &Sources,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<BlobsPushed> {
    let sent = AtomicU64::new(0);
    let queue = Mutex::new(blobs.iter().collect::<VecDeque<&Blob>>());
    let failed = AtomicBool::new(false);
    let outcomes: Mutex<Vec<Result<Outcome>>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, 8).min(blobs.len().max(1)) {
            s.spawn(|| {
                loop {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(blob) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                    else {
                        break;
                    };
                    let r = push_blob(client, blob, sources, progress, &sent);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    outcomes.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            });
        }
    });
    let mut pushed = BlobsPushed::default();
    for o in outcomes.into_inner().unwrap_or_else(|p| p.into_inner()) {
        match o? {
            Outcome::Existed => pushed.existed += 1,
            Outcome::Mounted => pushed.mounted += 1,
            Outcome::Uploaded => pushed.uploaded += 1,
        }
    }
    pushed.bytes = sent.load(Ordering::Relaxed);
    Ok(pushed)
}

/// `PUT` manifest `bytes` (of `media_type`) under `target` (a tag or its digest) in
/// `client.reference`'s repository; the registry's digest for it must be `Digest::of(bytes)`.
pub fn put_manifest(
    client: &Client,
    target: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<Digest> {
    let digest = Digest::of(bytes);
    let what = format!("manifest {}:{target}", client.reference.repo_key());
    let req = Req::new("PUT", client.url(&format!("manifests/{target}")))
        .header("content-type", media_type.to_string())
        .body(bytes);
    let mut resp = client.send(&req)?;
    if resp.status().as_u16() != 201 {
        return Err(status_error(&what, &mut resp));
    }
    if let Some(h) = client::header(&resp, "docker-content-digest") {
        if h != digest.to_string() {
            return Err(Error::invalid(format!(
                "{what}: the registry stored it as {h}, not {digest}"
            )));
        }
    }
    Ok(digest)
}

/// The digest of the manifest `target` (a tag) names in `client.reference`'s repository
/// (`HEAD`), or `None` when there is none. A registry that sends no digest answers `None`.
pub fn manifest_digest(client: &Client, target: &str) -> Result<Option<Digest>> {
    let what = format!("manifest {}:{target}", client.reference.repo_key());
    let req = Req::new("HEAD", client.url(&format!("manifests/{target}")))
        .header("accept", super::pull::ACCEPT);
    let mut resp = client.send(&req)?;
    match resp.status().as_u16() {
        200 => {
            Ok(client::header(&resp, "docker-content-digest").and_then(|h| Digest::parse(h).ok()))
        }
        404 => Ok(None),
        _ => Err(status_error(&what, &mut resp)),
    }
}

/// Push `blobs`, then manifest `bytes` (of `media_type`) under `target`: what `push` does for
/// an image, and the build cache for its entries. The blobs are the manifest's; `sources`
/// offers cross-repository mounts. `registry/sources.json` is not updated (the caller
/// records what went where).
#[allow(clippy::too_many_arguments)]
pub fn push_manifest_with_blobs(
    client: &Client,
    blobs: &[Blob],
    sources: &Sources,
    target: &str,
    media_type: &str,
    bytes: &[u8],
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Pushed> {
    let b = push_blobs(client, blobs, sources, jobs, progress)?;
    let manifest = put_manifest(client, target, media_type, bytes)?;
    Ok(Pushed {
        manifest,
        uploaded: b.uploaded,
        mounted: b.mounted,
        existed: b.existed,
        bytes: b.bytes,
    })
}

/// Push the stored image `image` to `client.reference`.
pub fn push(
    store: &Store,
    client: &Client,
    image: &str,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Pushed> {
    let dest = &client.reference;
    let (manifest_bytes, media_type, digest, blobs, sources) = {
        let _lock = store.lock(LockKind::Shared)?;
        let img = images::resolve(store, image)?;
        let bytes = images::read_blob(store, &img.manifest_digest)?;
        let manifest: Manifest = model::parse(&bytes, "manifest")?;
        let index_type = images::read_index(store)?
            .manifests
            .into_iter()
            .find(|d| d.digest == img.manifest_digest.to_string())
            .map(|d| d.media_type);
        let media_type = manifest
            .media_type
            .clone()
            .or(index_type)
            .unwrap_or_else(|| model::MT_MANIFEST.to_string());
        let mut blobs: Vec<Blob> = Vec::new();
        for desc in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let d = desc.digest()?;
            if blobs.iter().any(|b| b.digest == d) {
                continue;
            }
            blobs.push(Blob::stored(store, desc)?);
        }
        (
            bytes,
            media_type,
            img.manifest_digest,
            blobs,
            state::read_sources(store),
        )
    };
    if let Some(d) = dest.digest {
        if d != digest {
            return Err(Error::invalid(format!(
                "{dest}: the image's manifest is {digest}, not {d}"
            )));
        }
    }
    let target = match (&dest.digest, &dest.tag) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => "latest".to_string(),
    };
    let pushed = push_manifest_with_blobs(
        client,
        &blobs,
        &sources,
        &target,
        &media_type,
        &manifest_bytes,
        jobs,
        progress,
    )?;
    let lock = store.lock(LockKind::Exclusive)?;
    let digests: Vec<Digest> = blobs.iter().map(|b| b.digest).collect();
    if let Err(e) = state::record_sources(store, &dest.repo_key(), &digests) {
        log::warn!("not recording where the blobs went: {e}");
    }
    drop(lock);
    Ok(pushed)
}
