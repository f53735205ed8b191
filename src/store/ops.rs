//! The store commands' work: import (a layer tar, or an OCI image layout), diff and commit.
//! Each stages under `tmp/`, then publishes under the exclusive store lock in one short step
//! that ends with the `index.json` update.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::images::{self, Image, NewLayer};
use super::layers::{self, StagedLayer};
use super::model::{self, Descriptor, Index, Manifest};
use super::{Staging, Store};
use crate::digest::{Digest, HashWriter};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::oci::compress::{Compression, Encoder, Limits};
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
/// `parent` when given).
pub fn import_tar(
    store: &Store,
    input: impl Read,
    name: Option<&str>,
    parent: Option<&str>,
    created_by: &str,
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
            time_now(),
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

/// Tar -> sha256 (diffID) -> compressor -> sha256 (blob) -> sink.
type Chain<W> = HashWriter<Encoder<HashWriter<W>>>;

fn chain<W: Write>(sink: W, compression: Compression) -> io::Result<Chain<W>> {
    Ok(HashWriter::new(Encoder::new(
        compression,
        HashWriter::new(sink),
    )?))
}

fn finish_chain<W: Write>(c: Chain<W>, stats: export::Stats) -> Result<(Diffed, W)> {
    let diff_id = c.hasher.finish();
    let mut blob = c
        .inner
        .finish()
        .map_err(|e| Error::io("writing the layer", e))?;
    blob.flush()
        .map_err(|e| Error::io("writing the layer", e))?;
    let size = blob.hasher.bytes;
    Ok((
        Diffed {
            diff_id,
            blob: blob.hasher.finish(),
            blob_size: size,
            stats,
        },
        blob.inner,
    ))
}

fn open_upper(upper: &Path) -> Result<std::os::fd::OwnedFd> {
    sys::open_dir_path(upper).map_err(|e| Error::io(format!("upper {}", upper.display()), e))
}

/// `layerfs diff`.
pub fn diff(
    upper: &Path,
    out: Output,
    compression: Compression,
    opts: export::Options,
    progress: &dyn Fn(u64),
) -> Result<Diffed> {
    let ufd = open_upper(upper)?;
    match out {
        Output::Discard => {
            let c = chain(io::sink(), compression).map_err(|e| Error::io("compressor", e))?;
            let (stats, c) = export::export(ufd.as_fd(), c, opts, progress)?;
            Ok(finish_chain(c, stats)?.0)
        }
        Output::Stdout => {
            let sink = BufWriter::with_capacity(1 << 20, io::stdout().lock());
            let c = chain(sink, compression).map_err(|e| Error::io("compressor", e))?;
            let (stats, c) = export::export(ufd.as_fd(), c, opts, progress)?;
            Ok(finish_chain(c, stats)?.0)
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
                let c = chain(BufWriter::with_capacity(1 << 20, f), compression)
                    .map_err(|e| Error::io("compressor", e))?;
                let (stats, c) = export::export(ufd.as_fd(), c, opts, progress)?;
                let (d, w) = finish_chain(c, stats)?;
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

/// Writes to both sinks.
struct Tee<A, B> {
    a: A,
    b: B,
}

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.a.write_all(buf)?;
        self.b.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.a.flush()?;
        self.b.flush()
    }
}

/// What `commit` made.
#[derive(Clone, Debug)]
pub struct Committed {
    pub diffed: Diffed,
    pub manifest: Digest,
    pub new_layer: bool,
}

/// `layerfs commit`: diff `upper`, store the blob, extract the same tar as the layer directory
/// (in parallel, through a pipe: extraction from the produced tar guarantees the layer
/// directory is exactly what the blob says), write config and manifest, and tag `name`.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    store: &Store,
    upper: &Path,
    from: Option<&str>,
    name: &str,
    message: Option<&str>,
    compression: Compression,
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
    let ufd = open_upper(upper)?;
    let staging = store.staging()?;
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
    let blob_fd = sys::open_at(
        staging.fd(),
        layers::STAGED_BLOB,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o644,
    )
    .map_err(|e| Error::io("staging the blob", e))?;
    let (rx, tx) = sys::pipe().map_err(|e| Error::io("pipe", e))?;
    let (diffed, extracted) = std::thread::scope(|s| {
        let extractor = s.spawn(move || -> Result<import::Stats> {
            let mut tar = TarReader::new(io::BufReader::with_capacity(1 << 20, File::from(rx)));
            let stats = import::extract(&mut tar, layer_fd.as_fd(), formats, &|_| {})?;
            tar.finish()?;
            Ok(stats)
        });
        let written = (|| -> Result<Diffed> {
            let blob = BufWriter::with_capacity(1 << 20, File::from(blob_fd));
            let c = chain(blob, compression).map_err(|e| Error::io("compressor", e))?;
            let tee = Tee {
                a: c,
                b: BufWriter::with_capacity(1 << 20, File::from(tx)),
            };
            let (stats, mut tee) = export::export(ufd.as_fd(), tee, opts, progress)?;
            tee.flush().map_err(|e| Error::io("writing the layer", e))?;
            drop(tee.b);
            let (d, blob) = finish_chain(tee.a, stats)?;
            blob.into_inner()
                .map_err(|e| Error::io("writing the blob", e.into_error()))?;
            Ok(d)
        })();
        let extracted = extractor
            .join()
            .unwrap_or_else(|_| Err(Error::invalid("the extraction thread panicked")));
        (written, extracted)
    });
    // When extraction fails the writer sees a broken pipe: the extractor's error is the cause.
    // When the walk fails the extractor sees a truncated tar: the walk's error is the cause.
    let (diffed, stats) = match (diffed, extracted) {
        (Ok(d), Ok(s)) => (d, s),
        (Err(w), Err(x)) => return Err(if w.is(libc::EPIPE) { x } else { w }),
        (Err(w), Ok(_)) => return Err(w),
        (Ok(_), Err(x)) => return Err(x),
    };
    log::debug!("commit extracted {} entries", stats.entries);
    staging.sync()?;
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
    store.publish(
        &staging,
        layers::STAGED_BLOB,
        b"blobs/sha256",
        diffed.blob.hex().as_bytes(),
    )?;
    let new_layer = layers::publish_tree(
        store,
        &staging,
        layers::STAGED_LAYER,
        &diffed.diff_id,
        diffed.stats.tar_bytes,
    )?;
    let staged = StagedLayer {
        diff_id: diffed.diff_id,
        tar_size: diffed.stats.tar_bytes,
        blob: Descriptor::new(compression.media_type(), diffed.blob, diffed.blob_size),
        stats,
    };
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
