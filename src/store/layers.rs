//! Layers: staging a layer from a blob stream (blob kept as given, tar extracted), publishing
//! it under `layers/<diffID>`, and listing what is stored.
//!
//! A layer is keyed by its diffID (sha256 of the uncompressed tar): the same layer imported
//! twice, in any compression, is extracted and kept once.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Staging, Store, model};
use crate::digest::{Digest, HashReader, Hasher};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::oci::compress::{self, Limits};
use crate::oci::import::{self, Stats};
use crate::oci::tarfmt::TarReader;
use crate::sys;

/// Names inside a staging directory.
pub const STAGED_BLOB: &[u8] = b"blob";
pub const STAGED_LAYER: &[u8] = b"layer";

/// What `layermeta/<hex>.json` records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerMeta {
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    /// When it was first stored (RFC 3339).
    pub created: String,
}

/// A layer extracted into a staging directory, ready to publish.
#[derive(Clone, Debug)]
pub struct StagedLayer {
    pub diff_id: Digest,
    pub tar_size: u64,
    /// The blob as given (compressed or not), staged as `blob`.
    pub blob: model::Descriptor,
    pub stats: Stats,
}

struct TeeState {
    /// Where the blob is copied; none when it is already in the staging directory.
    file: Option<BufWriter<File>>,
    /// Hashes the blob; none when its digest was checked as it was written (a download).
    hasher: Option<Hasher>,
    bytes: u64,
    error: Option<io::Error>,
}

/// Copies everything read into the staged blob file and hashes it.
struct Tee<R> {
    inner: R,
    state: Arc<Mutex<TeeState>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.bytes += n as u64;
        if let Some(h) = st.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        if let Some(Err(e)) = st.file.as_mut().map(|f| f.write_all(&buf[..n])) {
            let kind = e.kind();
            st.error = Some(e);
            return Err(io::Error::new(kind, "writing the staged blob"));
        }
        Ok(n)
    }
}

/// Read a layer blob from `input`: keep its bytes as `blob` and extract it as `layer` in
/// `staging`, then flush both to disk. `expect` checks the blob's digest (OCI layouts).
pub fn stage(
    staging: &Staging<'_>,
    input: impl Read,
    limits: Limits,
    expect: Option<Digest>,
    progress: &dyn Fn(u64),
) -> Result<StagedLayer> {
    let blob_fd = sys::open_at(
        staging.fd(),
        STAGED_BLOB,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o644,
    )
    .map_err(|e| Error::io("staging the blob", e))?;
    let state = Arc::new(Mutex::new(TeeState {
        file: Some(BufWriter::with_capacity(1 << 20, File::from(blob_fd))),
        hasher: Some(Hasher::default()),
        bytes: 0,
        error: None,
    }));
    extract_blob(staging, input, state, limits, expect, progress)
}

/// Stage a layer whose blob is already in `staging` as `blob`: a download whose bytes were
/// hashed as they were written and matched `checked` (and which sits in the store, where only
/// the store's owner writes), so it is not hashed again: extract it as `layer`, then flush.
/// Nothing is copied.
pub fn stage_linked(
    staging: &Staging<'_>,
    limits: Limits,
    checked: Digest,
    progress: &dyn Fn(u64),
) -> Result<StagedLayer> {
    let fd = sys::open_at(staging.fd(), STAGED_BLOB, libc::O_RDONLY, 0)
        .map_err(|e| Error::io("opening the staged blob", e))?;
    let state = Arc::new(Mutex::new(TeeState {
        file: None,
        hasher: None,
        bytes: 0,
        error: None,
    }));
    let input = io::BufReader::with_capacity(1 << 20, File::from(fd));
    extract_blob(staging, input, state, limits, Some(checked), progress)
}

fn extract_blob(
    staging: &Staging<'_>,
    input: impl Read,
    state: Arc<Mutex<TeeState>>,
    limits: Limits,
    expect: Option<Digest>,
    progress: &dyn Fn(u64),
) -> Result<StagedLayer> {
    let tee = Tee {
        inner: input,
        state: state.clone(),
    };
    let (compression, decoded) = compress::decoder(tee, limits)?;
    let mut tar = TarReader::new(HashReader::new(decoded));
    sys::mkdir_at(staging.fd(), STAGED_LAYER, 0o755)
        .map_err(|e| Error::io("staging the layer", e))?;
    let layer_fd = sys::open_at(
        staging.fd(),
        STAGED_LAYER,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| Error::io("staging the layer", e))?;
    let formats = import::probe_formats(layer_fd.as_fd());
    let result = import::extract(&mut tar, layer_fd.as_fd(), formats, progress);
    let tee_error = |e: Error| -> Error {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        match st.error.take() {
            Some(io) => Error::io("writing the staged blob", io),
            None => e,
        }
    };
    let stats = result.map_err(tee_error)?;
    let hashed = tar.finish().map_err(tee_error)?;
    let tar_size = hashed.hasher.bytes;
    let diff_id = hashed.hasher.clone().finish();
    drop(hashed);
    let (blob_digest, blob_size) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = st.file.as_mut() {
            f.flush()
                .map_err(|e| Error::io("writing the staged blob", e))?;
        }
        match (st.hasher.take(), expect) {
            (Some(h), _) => (h.finish(), st.bytes),
            (None, Some(checked)) => (checked, st.bytes),
            (None, None) => return Err(Error::invalid("a staged blob with no digest")),
        }
    };
    if let Some(want) = expect {
        if want != blob_digest {
            return Err(Error::invalid(format!(
                "blob digest mismatch: expected {want}, got {blob_digest}"
            )));
        }
    }
    staging.sync()?;
    Ok(StagedLayer {
        diff_id,
        tar_size,
        blob: model::Descriptor::new(compression.media_type(), blob_digest, blob_size),
        stats,
    })
}

/// Whether `layers/<diffID>` exists.
pub fn exists(store: &Store, diff_id: &Digest) -> Result<bool> {
    let layers = store.dir(b"layers")?;
    Ok(sys::stat_at_opt(layers.as_fd(), diff_id.hex().as_bytes())
        .map_err(|e| store.err("stat layer", e))?
        .is_some())
}

/// Publish a staged layer (its blob and its tree) under the store lock. Returns false when the
/// layer was already stored (the staged copy is then dropped with the staging directory).
pub fn publish(store: &Store, staging: &Staging<'_>, layer: &StagedLayer) -> Result<bool> {
    let blob = layer.blob.digest()?;
    store.publish(staging, STAGED_BLOB, b"blobs/sha256", blob.hex().as_bytes())?;
    publish_tree(store, staging, STAGED_LAYER, &layer.diff_id, layer.tar_size)
}

/// Publish an extracted tree staged as `name` as the layer `diff_id`.
pub fn publish_tree(
    store: &Store,
    staging: &Staging<'_>,
    name: &[u8],
    diff_id: &Digest,
    tar_size: u64,
) -> Result<bool> {
    if exists(store, diff_id)? {
        return Ok(false);
    }
    let meta = LayerMeta {
        diff_id: diff_id.to_string(),
        size: tar_size,
        created: super::time::rfc3339(super::time::now()),
    };
    let metadir = store.dir(b"layermeta")?;
    fsutil::write_atomic(
        metadir.as_fd(),
        format!("{}.json", diff_id.hex()).as_bytes(),
        &model::to_bytes(&meta),
        0o644,
    )
    .map_err(|e| store.err("writing layer metadata", e))?;
    store.publish(staging, name, b"layers", diff_id.hex().as_bytes())
}

/// Metadata of a stored layer, if recorded.
pub fn meta(store: &Store, diff_id: &Digest) -> Option<LayerMeta> {
    let dir = store.dir(b"layermeta").ok()?;
    let bytes = fsutil::read_small(
        dir.as_fd(),
        format!("{}.json", diff_id.hex()).as_bytes(),
        1 << 16,
    )
    .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every stored layer's diffID.
pub fn list(store: &Store) -> Result<Vec<Digest>> {
    let dir = store.dir(b"layers")?;
    let mut out: Vec<Digest> = sys::read_dir_all(dir)
        .map_err(|e| store.err("reading layers", e))?
        .into_iter()
        .filter_map(|e| Digest::from_hex(std::str::from_utf8(&e.name).ok()?))
        .collect();
    out.sort();
    Ok(out)
}

/// Path of a stored layer's tree (for mounting).
pub fn path(store: &Store, diff_id: &Digest) -> std::path::PathBuf {
    store.root().join("layers").join(diff_id.hex())
}

/// Whether a layer's root is opaque (its tar had a top-level `.wh..wh..opq`): the layers below
/// it are hidden entirely. Overlay mounts ignore opaque markers on the root, so the stack is
/// cut when it is built instead.
pub fn root_is_opaque(store: &Store, diff_id: &Digest) -> Result<bool> {
    let fd = store.dir(format!("layers/{}", diff_id.hex()).as_bytes())?;
    for attr in [
        crate::union::whiteout::TRUSTED_OPAQUE,
        crate::union::whiteout::USER_OPAQUE,
    ] {
        let v = sys::xattr_get(sys::XTarget::Fd(fd.as_fd()), attr)
            .map_err(|e| store.err("reading layer xattrs", e))?;
        if v.as_deref() == Some(b"y") {
            return Ok(true);
        }
    }
    Ok(false)
}
