//! The store commands' work: import (a layer tar, or an OCI image layout), diff and commit.
//! Each stages under `tmp/`, then publishes under the exclusive store lock in one short step
//! that ends with the `index.json` update.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::images::{self, Image, NewLayer};
use super::layers::{self, StagedLayer};
use super::model::{self, Descriptor, Index, Manifest};
use super::{Staging, Store};
use crate::digest::{Digest, HashWriter};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::oci::compress::{Codec, Encoder, Limits};
use crate::oci::tarfmt::TarReader;
use crate::oci::{export, import};
use crate::sys::{self, LockKind};

/// Result of importing one layer.
#[derive(Clone, Debug)]
pub struct Imported {
    /// Layers, bottom first (one for a tar).
    pub diff_ids: Vec<Digest>,
    /// How many of them were not stored before.
    pub new_layers: usize,
    /// The manifest named, when a name was given.
    pub manifest: Option<Digest>,
}

/// `layerfs import FILE|-`: store a layer tar; with `name`, make an image of it (on top of
/// `parent` when given), created at `created` (seconds; now when `None`).
#[allow(clippy::too_many_arguments)]
pub fn import_tar(
    store: &Store,
    input: impl Read,
    name: Option<&str>,
    parent: Option<&str>,
    created_by: &str,
    created: Option<i64>,
    limits: Limits,
    progress: &dyn Fn(u64),
) -> Result<Imported> {
    if let Some(n) = name {
        super::validate_name(n)?;
    }
    if parent.is_some() && name.is_none() {
        return Err(Error::invalid("--parent needs --name for the new image"));
    }
    if let Some(p) = parent {
        let _lock = store.lock(LockKind::Shared)?;
        images::resolve(store, p)?;
    }
    let staging = store.staging()?;
    let staged = layers::stage(&staging, input, limits, None, progress)?;
    let _lock = store.lock(LockKind::Exclusive)?;
    let parent = parent.map(|p| images::resolve(store, p)).transpose()?;
    let new = layers::publish(store, &staging, &staged)?;
    let manifest = match name {
        Some(n) => Some(name_layer(
            store,
            &staging,
            parent.as_ref(),
            &staged,
            n,
            created_by,
            None,
            created.unwrap_or_else(time_now),
        )?),
        None => None,
    };
    Ok(Imported {
        diff_ids: vec![staged.diff_id],
        new_layers: new as usize,
        manifest,
    })
}

fn time_now() -> i64 {
    super::time::now()
}

/// Write config + manifest for `parent` + `layer` and tag them `name`. Under the exclusive lock.
#[allow(clippy::too_many_arguments)]
fn name_layer(
    store: &Store,
    staging: &Staging<'_>,
    parent: Option<&Image>,
    layer: &StagedLayer,
    name: &str,
    created_by: &str,
    comment: Option<&str>,
    created: i64,
) -> Result<Digest> {
    let desc = images::add_layer(
        store,
        staging,
        parent,
        &NewLayer {
            diff_id: layer.diff_id,
            blob: layer.blob.clone(),
            created,
            created_by,
            comment,
        },
    )?;
    images::tag(store, name, &desc)?;
    desc.digest()
}

// ---------------------------------------------------------------------------------------------
// OCI image layouts

/// Read a JSON blob of an OCI layout, checking its digest.
fn layout_blob(dir: BorrowedFd<'_>, desc: &Descriptor) -> Result<Vec<u8>> {
    let digest = desc.digest()?;
    let path = format!("blobs/sha256/{}", digest.hex());
    let bytes = fsutil::read_small(dir, path.as_bytes(), images::MAX_JSON)
        .map_err(|e| Error::io(format!("reading {path}"), e))?;
    if Digest::of(&bytes) != digest {
        return Err(Error::invalid(format!(
            "blob {digest} of the layout is corrupt"
        )));
    }
    Ok(bytes)
}

fn is_index(media_type: &str) -> bool {
    media_type == model::MT_INDEX || media_type == model::MT_DOCKER_LIST
}

/// `DIR[:TAG]` -> (DIR, TAG). A colon only splits when DIR exists without the suffix.
pub fn split_layout_ref(arg: &str) -> (PathBuf, Option<String>) {
    if let Some((d, t)) = arg.rsplit_once(':') {
        if !t.is_empty() && !t.contains('/') && !Path::new(arg).exists() {
            return (PathBuf::from(d), Some(t.to_string()));
        }
    }
    (PathBuf::from(arg), None)
}

/// `layerfs import --oci DIR[:TAG]`: copy an image from an OCI image layout (skopeo, umoci,
/// podman, buildah write them) into the store, verifying every digest and diffID.
pub fn import_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    name: Option<&str>,
    limits: Limits,
    progress: &dyn Fn(u64),
) -> Result<Imported> {
    let name = name
        .or(tag)
        .ok_or_else(|| Error::invalid("give --name (the layout reference has no tag)"))?;
    super::validate_name(name)?;
    let lfd = sys::open_dir_path(dir)
        .map_err(|e| Error::io(format!("OCI layout {}", dir.display()), e))?;
    let index: Index = model::parse(
        &fsutil::read_small(lfd.as_fd(), b"index.json", images::MAX_JSON)
            .map_err(|e| Error::io(format!("OCI layout {}: index.json", dir.display()), e))?,
        "index.json",
    )?;
    let mut desc = match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(t))
            .cloned()
            .ok_or_else(|| Error::invalid(format!("no image tagged {t:?} in {}", dir.display())))?,
        None => match index.manifests.as_slice() {
            [one] => one.clone(),
            _ => {
                let tags: Vec<&str> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.ref_name())
                    .collect();
                return Err(Error::invalid(format!(
                    "{} holds {} images; pick one with DIR:TAG ({})",
                    dir.display(),
                    index.manifests.len(),
                    tags.join(", ")
                )));
            }
        },
    };
    if is_index(&desc.media_type) {
        let inner: Index = model::parse(&layout_blob(lfd.as_fd(), &desc)?, "image index")?;
        let arch = images::host_arch();
        desc = inner
            .manifests
            .iter()
            .find(|d| {
                d.platform.as_ref().is_some_and(|p| {
                    p.get("os").and_then(|v| v.as_str()) == Some("linux")
                        && p.get("architecture").and_then(|v| v.as_str()) == Some(arch)
                })
            })
            .cloned()
            .ok_or_else(|| Error::invalid(format!("no linux/{arch} image in the index")))?;
    }
    let manifest_bytes = layout_blob(lfd.as_fd(), &desc)?;
    let manifest: Manifest = model::parse(&manifest_bytes, "manifest")?;
    let config_bytes = layout_blob(lfd.as_fd(), &manifest.config)?;
    let config: serde_json::Value = model::parse(&config_bytes, "image config")?;
    let diff_ids = model::config_diff_ids(&config)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::invalid(
            "image config and manifest disagree on the layer count",
        ));
    }
    let mut staged: Vec<(Staging<'_>, StagedLayer)> = Vec::new();
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
        if have {
            continue;
        }
        let path = format!("blobs/sha256/{}", blob.hex());
        let f = sys::open_beneath(lfd.as_fd(), path.as_bytes(), libc::O_RDONLY, 0)
            .map_err(|e| Error::io(format!("OCI layout {}: {path}", dir.display()), e))?;
        let staging = store.staging()?;
        let layer = layers::stage(&staging, File::from(f), limits, Some(blob), progress)
            .map_err(|e| Error::invalid(format!("layer {blob}: {e}")))?;
        if layer.diff_id != *want {
            return Err(Error::invalid(format!(
                "layer {blob}: diffID {} does not match the config's {want}",
                layer.diff_id
            )));
        }
        let mut layer = layer;
        layer.blob = ldesc.clone();
        staged.push((staging, layer));
    }
    let _lock = store.lock(LockKind::Exclusive)?;
    let mut new_layers = 0;
    for (staging, layer) in &staged {
        new_layers += layers::publish(store, staging, layer)? as usize;
    }
    for (ldesc, id) in manifest.layers.iter().zip(&diff_ids) {
        if !layers::exists(store, id)? || !blob_exists(store, &ldesc.digest()?)? {
            return Err(Error::invalid(format!(
                "layer {id} was removed while importing (a concurrent gc?); import again"
            )));
        }
    }
    let staging = store.staging()?;
    images::put_blob(store, &staging, &config_bytes)?;
    let mdigest = images::put_blob(store, &staging, &manifest_bytes)?;
    let mut tagged = desc.clone();
    tagged.annotations = None;
    images::tag(store, name, &tagged)?;
    Ok(Imported {
        diff_ids,
        new_layers,
        manifest: Some(mdigest),
    })
}

fn blob_exists(store: &Store, d: &Digest) -> Result<bool> {
    let dir = store.dir(b"blobs/sha256")?;
    Ok(sys::stat_at_opt(dir.as_fd(), d.hex().as_bytes())
        .map_err(|e| store.err("stat blob", e))?
        .is_some())
}

// ---------------------------------------------------------------------------------------------
// diff and commit

/// Where `diff` writes the tar.
pub enum Output {
    /// Compute the digests only.
    Discard,
    Stdout,
    /// Written to a temporary name beside it, renamed into place when complete.
    File(PathBuf),
}

/// Digests of a written layer.
#[derive(Clone, Debug)]
pub struct Diffed {
    pub diff_id: Digest,
    /// The blob's digest and size (equal to the tar's when uncompressed).
    pub blob: Digest,
    pub blob_size: u64,
    pub stats: export::Stats,
}

fn open_upper(upper: &Path) -> Result<std::os::fd::OwnedFd> {
    sys::open_dir_path(upper).map_err(|e| Error::io(format!("upper {}", upper.display()), e))
}

/// Chunks handed from the walking thread to its consumers.
const CHUNK: usize = 1 << 20;
type Chunk = Arc<Vec<u8>>;

/// The walking side of the pipeline: buffers the tar and hands each full chunk to every
/// consumer thread (bounded queues: memory stays at a few chunks).
struct Fanout {
    buf: Vec<u8>,
    txs: Vec<SyncSender<Chunk>>,
}

impl Fanout {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Arc::new(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        for tx in &self.txs {
            tx.send(chunk.clone())
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }
}

impl Write for Fanout {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The consuming side: reads the chunks as one stream; EOF when the walker is done.
struct ChunkReader {
    rx: Receiver<Chunk>,
    cur: Chunk,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Where a walk also extracts to (commit).
struct ExtractTo {
    dir: std::os::fd::OwnedFd,
    formats: import::Formats,
}

/// Walk `upper` into a canonical tar and, on other threads, compress it into `sink` (hashing
/// the blob) and optionally extract it into a layer directory. The walk, the compression and
/// the extraction run in parallel, with a few MiB of chunks between them. `lowers` (top
/// first; may be empty) are the layers the upper was made on, for resolving its redirects.
#[allow(clippy::too_many_arguments)]
fn pipeline<W: Write + Send>(
    upper: &Path,
    lowers: &[PathBuf],
    codec: Codec,
    sink: W,
    extract: Option<ExtractTo>,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<(Diffed, W, Option<import::Stats>)> {
    let ufd = open_upper(upper)?;
    let view = if lowers.is_empty() {
        None
    } else {
        Some(crate::union::Union::read_only_upper(upper, lowers)?)
    };
    let (ctx, crx) = sync_channel::<Chunk>(4);
    let mut txs = vec![ctx];
    let mut erx = None;
    if extract.is_some() {
        let (etx, rx) = sync_channel::<Chunk>(4);
        txs.push(etx);
        erx = Some(rx);
    }
    let reader = |rx| ChunkReader {
        rx,
        cur: Arc::new(Vec::new()),
        pos: 0,
    };
    std::thread::scope(|s| {
        let compressor = s.spawn(move || -> Result<(Digest, u64, W)> {
            let mut enc = Encoder::new(codec, HashWriter::new(sink))
                .map_err(|e| Error::io("starting the compressor", e))?;
            for chunk in crx {
                enc.write_all(&chunk)
                    .map_err(|e| Error::io("writing the layer", e))?;
            }
            let mut out = enc
                .finish()
                .map_err(|e| Error::io("writing the layer", e))?;
            out.flush().map_err(|e| Error::io("writing the layer", e))?;
            let size = out.hasher.bytes;
            Ok((out.hasher.finish(), size, out.inner))
        });
        let extractor = match (extract, erx) {
            (Some(to), Some(rx)) => Some(s.spawn(move || -> Result<import::Stats> {
                let mut tar = TarReader::new(reader(rx));
                let stats = import::extract(&mut tar, to.dir.as_fd(), to.formats, &|_| {})?;
                tar.finish()?;
                Ok(stats)
            })),
            _ => None,
        };
        let walked = (|| -> Result<(export::Stats, Digest)> {
            let out = HashWriter::new(Fanout {
                buf: Vec::with_capacity(CHUNK),
                txs,
            });
            let (stats, mut out) = export::export(ufd.as_fd(), view.as_ref(), out, opts, progress)?;
            out.flush().map_err(|e| Error::io("writing the layer", e))?;
            Ok((stats, out.hasher.finish()))
            // Dropping the fanout closes the queues: the consumers see the end.
        })();
        let compressed = compressor
            .join()
            .unwrap_or_else(|_| Err(Error::invalid("the compression thread panicked")));
        let extracted = extractor.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::invalid("the extraction thread panicked")))
        });
        // A consumer that fails makes the walk fail with a broken pipe: report the consumer's
        // error. A walk that fails makes the extractor see a truncated tar: report the walk's.
        let (stats, diff_id) = match walked {
            Ok(w) => w,
            Err(e) if e.is(libc::EPIPE) => {
                compressed?;
                if let Some(x) = extracted {
                    x?;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let (blob, blob_size, sink) = compressed?;
        let xstats = extracted.transpose()?;
        Ok((
            Diffed {
                diff_id,
                blob,
                blob_size,
                stats,
            },
            sink,
            xstats,
        ))
    })
}

/// `layerfs diff`; `lowers` (top first) resolve the upper's redirects.
pub fn diff(
    upper: &Path,
    lowers: &[PathBuf],
    out: Output,
    codec: Codec,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<Diffed> {
    match out {
        Output::Discard => Ok(pipeline(upper, lowers, codec, io::sink(), None, opts, progress)?.0),
        Output::Stdout => {
            let sink = BufWriter::with_capacity(1 << 20, io::stdout());
            Ok(pipeline(upper, lowers, codec, sink, None, opts, progress)?.0)
        }
        Output::File(path) => {
            let file_name = path
                .file_name()
                .ok_or_else(|| Error::invalid(format!("bad output file {}", path.display())))?;
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(file_name);
            tmp_name.push(format!(".tmp{}", sys::getpid()));
            let tmp = path.with_file_name(tmp_name);
            let result = (|| {
                let f = File::create(&tmp)
                    .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
                let sink = BufWriter::with_capacity(1 << 20, f);
                let (d, w, _) = pipeline(upper, lowers, codec, sink, None, opts, progress)?;
                let f = w
                    .into_inner()
                    .map_err(|e| Error::io(format!("writing {}", tmp.display()), e.into_error()))?;
                f.sync_all()
                    .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
                std::fs::rename(&tmp, &path)
                    .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))?;
                Ok(d)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result
        }
    }
}

/// What `commit` made.
#[derive(Clone, Debug)]
pub struct Committed {
    pub diffed: Diffed,
    pub manifest: Digest,
    pub new_layer: bool,
}

/// A new `STAGED_BLOB` in `staging`, for a layer blob to be written to.
fn staged_blob_writer(staging: &Staging<'_>) -> Result<BufWriter<File>> {
    let fd = sys::open_at(
        staging.fd(),
        layers::STAGED_BLOB,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o644,
    )
    .map_err(|e| Error::io("staging the blob", e))?;
    Ok(BufWriter::with_capacity(1 << 20, File::from(fd)))
}

/// Diff `upper` into `staging`: the blob (compressed with `codec`) as `STAGED_BLOB` and the
/// same tar extracted as `STAGED_LAYER` (in parallel, through a pipe: extraction from the
/// produced tar guarantees the layer directory is exactly what the blob says), synced.
fn stage_upper(
    staging: &Staging<'_>,
    upper: &Path,
    lowers: &[PathBuf],
    codec: Codec,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<(Diffed, import::Stats)> {
    sys::mkdir_at(staging.fd(), layers::STAGED_LAYER, 0o755)
        .map_err(|e| Error::io("staging the layer", e))?;
    let layer_fd = sys::open_at(
        staging.fd(),
        layers::STAGED_LAYER,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| Error::io("staging the layer", e))?;
    let formats = import::probe_formats(layer_fd.as_fd());
    let blob = staged_blob_writer(staging)?;
    let to = ExtractTo {
        dir: layer_fd,
        formats,
    };
    let (diffed, blob, stats) = pipeline(upper, lowers, codec, blob, Some(to), opts, progress)?;
    blob.into_inner()
        .map_err(|e| Error::io("writing the blob", e.into_error()))?;
    let stats = stats.unwrap_or_default();
    log::debug!("extracted {} entries", stats.entries);
    staging.sync()?;
    Ok((diffed, stats))
}

/// Publish what [`stage_upper`] staged: the blob and the layer directory. Under the exclusive
/// lock. Returns the layer and whether it was new to the store.
fn publish_staged_upper(
    store: &Store,
    staging: &Staging<'_>,
    diffed: &Diffed,
    stats: import::Stats,
    codec: Codec,
) -> Result<(StagedLayer, bool)> {
    let new_layer = publish_blob_and_tree(store, staging, layers::STAGED_LAYER, diffed)?;
    let staged = StagedLayer {
        diff_id: diffed.diff_id,
        tar_size: diffed.stats.tar_bytes,
        blob: Descriptor::new(codec.kind.media_type(), diffed.blob, diffed.blob_size),
        stats,
    };
    Ok((staged, new_layer))
}

/// A layer made from an upper directory and published in the store; no image names it yet
/// (`gc` removes it unless an image, a container or a build cache entry refers to it).
#[derive(Clone, Debug)]
pub struct PublishedLayer {
    pub diff_id: Digest,
    /// The blob as the manifest lists it.
    pub blob: Descriptor,
    /// Uncompressed tar size.
    pub tar_size: u64,
    /// Not stored before.
    pub new: bool,
}

/// Diff `upper` into a layer and publish its blob and directory (what `build` does with the
/// upper of each step).
pub fn layer_from_upper(
    store: &Store,
    upper: &Path,
    codec: Codec,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<PublishedLayer> {
    let staging = store.staging()?;
    let (diffed, stats) = stage_upper(&staging, upper, &[], codec, opts, progress)?;
    let _lock = store.lock(LockKind::Exclusive)?;
    let (staged, new) = publish_staged_upper(store, &staging, &diffed, stats, codec)?;
    Ok(PublishedLayer {
        diff_id: staged.diff_id,
        blob: staged.blob,
        tar_size: staged.tar_size,
        new,
    })
}

/// Make the upper `staging/name` of a finished build step a layer: diff it into the blob, then
/// make the upper itself the layer directory ([`super::adopt`]: what a tar cannot carry is
/// normalized in place, and a second diff must give the same diffID) instead of extracting the
/// tar into a new one. Where the upper cannot be adopted (refused, an error, a different second
/// diff) the blob just made is extracted as [`layer_from_upper`] would. `source_date_epoch`
/// changes times in the tar that the upper keeps: such a step is always extracted.
pub fn layer_from_step_upper(
    store: &Store,
    staging: &Staging<'_>,
    name: &[u8],
    codec: Codec,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<PublishedLayer> {
    let upper = staging.path().join(std::ffi::OsStr::from_bytes(name));
    if opts.source_date_epoch.is_some() {
        return layer_from_upper(store, &upper, codec, opts, progress);
    }
    let ufd = open_upper(&upper)?;
    let blob = staged_blob_writer(staging)?;
    let (diffed, blob, _) = pipeline(&upper, &[], codec, blob, None, opts, progress)?;
    blob.into_inner()
        .map_err(|e| Error::io("writing the blob", e.into_error()))?;
    let adopted = adopt_checked(ufd.as_fd(), staging, &diffed).unwrap_or_else(|e| {
        log::warn!("adopting the step's upper as its layer: {e}; extracting the layer instead");
        false
    });
    let new = if adopted {
        log::debug!("adopted the step's upper as layer {}", diffed.diff_id);
        publish_synced(store, staging, name, &diffed)?
    } else {
        // Our own blob: no limits meant for hostile input.
        let limits = Limits {
            max_size: u64::MAX,
            max_ratio: u64::MAX,
        };
        let staged = layers::stage_linked(staging, limits, diffed.blob, &|_| {})?;
        if staged.diff_id != diffed.diff_id {
            return Err(Error::invalid(format!(
                "the step's layer extracted as {}, diffed as {}",
                staged.diff_id, diffed.diff_id
            )));
        }
        let _lock = store.lock(LockKind::Exclusive)?;
        layers::publish(store, staging, &staged)?
    };
    Ok(PublishedLayer {
        diff_id: diffed.diff_id,
        blob: Descriptor::new(codec.kind.media_type(), diffed.blob, diffed.blob_size),
        tar_size: diffed.stats.tar_bytes,
        new,
    })
}

/// Sync the staging directory, then publish its blob and `staging/name` as the layer directory
/// (under the store lock). Returns whether the layer was new to the store.
fn publish_synced(
    store: &Store,
    staging: &Staging<'_>,
    name: &[u8],
    diffed: &Diffed,
) -> Result<bool> {
    staging.sync()?;
    let _lock = store.lock(LockKind::Exclusive)?;
    publish_blob_and_tree(store, staging, name, diffed)
}

/// Publish the staged blob and `staging/name` as `diffed`'s layer directory; the caller holds
/// the exclusive lock. Returns whether the layer was new to the store.
fn publish_blob_and_tree(
    store: &Store,
    staging: &Staging<'_>,
    name: &[u8],
    diffed: &Diffed,
) -> Result<bool> {
    store.publish(
        staging,
        layers::STAGED_BLOB,
        b"blobs/sha256",
        diffed.blob.hex().as_bytes(),
    )?;
    layers::publish_tree(
        store,
        staging,
        name,
        &diffed.diff_id,
        diffed.stats.tar_bytes,
    )
}

/// Normalize the upper for adoption and check that its tar did not change. `Ok(false)`: not
/// adoptable (the tar, already made, is extracted instead).
fn adopt_checked(upper: BorrowedFd<'_>, staging: &Staging<'_>, diffed: &Diffed) -> Result<bool> {
    let formats = import::probe_formats(staging.fd());
    if !super::adopt::normalize(upper, formats)? {
        log::debug!("the step's upper is not adoptable: extracting its layer");
        return Ok(false);
    }
    let (_, again) = export::export(
        upper,
        None,
        HashWriter::new(io::sink()),
        export::Options::default(),
        &|_| {},
    )?;
    let again = again.hasher.finish();
    if again != diffed.diff_id {
        log::warn!(
            "the step's upper diffs as {again} once normalized, {} before: extracting its layer",
            diffed.diff_id
        );
        return Ok(false);
    }
    Ok(true)
}

/// Diff the upper directory `staging/name` into a layer whose directory is that upper itself,
/// renamed into `layers/` (nothing extracted again, nothing deleted). Only for an upper that
/// holds exactly what extracting its tar would give: plain entries in the store's format,
/// no layerfs bookkeeping xattrs, and times the diff does not clamp (no `source_date_epoch`).
/// `build` uses it for COPY steps it writes straight into an upper.
pub fn layer_from_staged_upper(
    store: &Store,
    staging: &Staging<'_>,
    name: &[u8],
    codec: Codec,
    progress: &dyn Fn(u64),
) -> Result<PublishedLayer> {
    let upper = staging.path().join(std::ffi::OsStr::from_bytes(name));
    let blob = staged_blob_writer(staging)?;
    let (diffed, blob, _) = pipeline(
        &upper,
        &[],
        codec,
        blob,
        None,
        export::Options::default(),
        progress,
    )?;
    blob.into_inner()
        .map_err(|e| Error::io("writing the blob", e.into_error()))?;
    let new = publish_synced(store, staging, name, &diffed)?;
    Ok(PublishedLayer {
        diff_id: diffed.diff_id,
        blob: Descriptor::new(codec.kind.media_type(), diffed.blob, diffed.blob_size),
        tar_size: diffed.stats.tar_bytes,
        new,
    })
}

/// `layerfs commit`: diff `upper` into a layer (`stage_upper`; `lowers`, top first, resolve
/// its redirects), write config and manifest, and tag `name`.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    store: &Store,
    upper: &Path,
    lowers: &[PathBuf],
    from: Option<&str>,
    name: &str,
    message: Option<&str>,
    compression: Codec,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<Committed> {
    super::validate_name(name)?;
    let parent_digest = match from {
        Some(f) => {
            let _lock = store.lock(LockKind::Shared)?;
            Some(images::resolve(store, f)?.manifest_digest)
        }
        None => None,
    };
    let staging = store.staging()?;
    let (diffed, stats) = stage_upper(&staging, upper, lowers, compression, opts, progress)?;
    let _lock = store.lock(LockKind::Exclusive)?;
    let parent = match (from, parent_digest) {
        (Some(f), Some(d)) => {
            let p = images::resolve(store, f)?;
            if p.manifest_digest != d {
                return Err(Error::invalid(format!(
                    "image {f} changed while committing; commit again"
                )));
            }
            Some(p)
        }
        _ => None,
    };
    let (staged, new_layer) = publish_staged_upper(store, &staging, &diffed, stats, compression)?;
    let created = opts.source_date_epoch.unwrap_or_else(time_now);
    let manifest = name_layer(
        store,
        &staging,
        parent.as_ref(),
        &staged,
        name,
        "layerfs commit",
        message,
        created,
    )?;
    Ok(Committed {
        diffed,
        manifest,
        new_layer,
    })
}
