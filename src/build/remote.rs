//! The build cache shared through registries. `layerfs build --cache-to REPO` pushes the
//! cache entries a build used or made, and its build record, to a repository;
//! `--cache-from REPO` (repeatable, asked in order) is asked for a step's entry at each local
//! miss, and for the build record when the store has none. A machine with an empty store
//! then builds with every unchanged step pulled instead of run, and still says why the other
//! steps ran.
//!
//! In the repository every entry and record is an OCI artifact: an image manifest with
//! `artifactType` [`ARTIFACT_TYPE`], tagged by its key:
//!
//! ```text
//! lfc-<64 hex of the step key>   config: the entry, the bytes of cache/entries/<key>.json
//!                                without `last_used` (MT_ENTRY)
//!                                layers: the step's layer blob, the very blob the store
//!                                has (same digest); for a step without a layer the OCI
//!                                empty descriptor (`{}`), as image-spec asks of artifacts
//! lfr-<64 hex of the record id>  config: the last build record of the Containerfile and
//!                                target (MT_RECORD), its path made relative to the context
//!                                layers: the COPY/ADD source listings the record names
//!                                (MT_LISTING), each annotated with its name (ANN_LISTING)
//! ```
//!
//! The record id is `cache::record_id` of the Containerfile's path relative to the context
//! (`Containerfile`, `docker/app.Dockerfile`, `../x/Containerfile`) and the target: the same
//! on every machine that has the project, where the local record is keyed by absolute path.
//!
//! What a registry sends is checked before it is used: manifests against their digest,
//! configs and listings against their descriptors (digest and size, size-limited) and parsed
//! as untrusted; an entry's key must be the step's key and its layer the manifest's; the
//! layer blob goes through `pull`'s verified, resumable download and hardened import, and its
//! diffID and uncompressed size must be the entry's. A listing must hash to the name it is
//! used under. An entry that fails a check is refused (the step runs); a source that cannot
//! be reached or answers with an error is dropped for the rest of the build. Either way the
//! user gets one warning, and the build goes on.
//!
//! Not verified (it cannot be): that a layer is what the step would make. A cache source is
//! trusted as a base image is: read only repositories that only trusted builders push to.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Component, Path};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::cache::{self, BuildRecord, Entry};
use super::context::{self, Manifest as Listing};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::oci::compress::Limits;
use crate::registry::client::{self, Client, Req};
use crate::registry::push::{self, Blob};
use crate::registry::{NoProgress, Options, Reference, pull, state};
use crate::store::Store;
use crate::store::model::{self, Descriptor, Manifest};
use crate::sys::LockKind;

/// `artifactType` of every manifest the shared cache writes.
pub const ARTIFACT_TYPE: &str = "application/vnd.layerfs.build-cache.v1";
/// Config of an entry's manifest: the entry JSON.
pub const MT_ENTRY: &str = "application/vnd.layerfs.build-cache.entry.v1+json";
/// Config of a record's manifest: the build record JSON.
pub const MT_RECORD: &str = "application/vnd.layerfs.build-cache.record.v1+json";
/// A layer of a record's manifest: a source listing (`cache/manifests/<hex>`).
pub const MT_LISTING: &str = "application/vnd.layerfs.build-cache.listing.v1";
/// The OCI empty descriptor's media type and content.
pub const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// Annotation of a listing layer: the listing's name (its `sources` digest in the record).
pub const ANN_LISTING: &str = "dev.layerfs.build-cache.listing";

const ENTRY_PREFIX: &str = "lfc-";
const RECORD_PREFIX: &str = "lfr-";
/// Largest entry config accepted.
const MAX_ENTRY: u64 = 1 << 20;
/// Largest record accepted.
const MAX_RECORD: u64 = 16 << 20;
/// Largest source listing accepted.
const MAX_LISTING: u64 = 64 << 20;
/// Retries of a failed request to a cache source: fewer than a pull's, since the build
/// waits (an unreachable source costs 0.6 s, once). `LAYERFS_REGISTRY_RETRIES` overrides.
const SOURCE_RETRIES: u32 = 2;
/// Entries pushed at once.
const EXPORT_JOBS: usize = 3;
/// Layer media types an entry may name (the store's).
const LAYER_TYPES: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
];

/// The tag of a step's entry: `lfc-` and the key's 64 hex digits.
pub fn entry_tag(key: &Digest) -> String {
    format!("{ENTRY_PREFIX}{}", key.hex())
}

/// The tag of a build record: `lfr-` and the record id's 64 hex digits.
pub fn record_tag(id: &Digest) -> String {
    format!("{RECORD_PREFIX}{}", id.hex())
}

/// `[docker://]HOST[:PORT]/REPO`: a cache repository (entries are tagged by key, so no tag or
/// digest).
pub fn parse_repository(arg: &str) -> Result<Reference> {
    let r = Reference::parse(arg)?;
    if r.tag.is_some() || r.digest.is_some() {
        return Err(Error::invalid(format!(
            "{arg}: a cache repository takes no tag or digest (give HOST[:PORT]/REPO)"
        )));
    }
    Ok(r)
}

/// `path` relative to `base` (both absolute and canonical), with `..` where it leaves it.
pub fn relative_path(path: &Path, base: &Path) -> String {
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".to_string(); b.len() - common];
    parts.extend(
        p[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// The id of the shared build record of a Containerfile (its path relative to the
/// context) and target.
pub fn shared_record_id(relative_containerfile: &str, target: Option<&str>) -> Digest {
    cache::record_id(relative_containerfile, target)
}

/// An entry as a registry holds it: the local entry's bytes without `last_used`.
pub fn entry_config(entry: &Entry) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(&Entry {
        last_used: 0,
        ..entry.clone()
    })
    .map_err(|e| Error::invalid(format!("encoding a cache entry: {e}")))
}

/// Parse an entry a registry sent for step `key`, as untrusted input.
pub fn parse_entry(bytes: &[u8], key: &Digest) -> Result<Entry> {
    let e: Entry = model::parse(bytes, "cache entry")?;
    if e.format != cache::FORMAT_VERSION {
        return Err(Error::invalid(format!(
            "the entry has format {}; this layerfs reads format {}",
            e.format,
            cache::FORMAT_VERSION
        )));
    }
    if e.key != key.to_string() {
        return Err(Error::invalid(format!(
            "the entry is for key {}, not this step's {key}",
            e.key
        )));
    }
    // History times are written from it: years 1970-9999, as RFC 3339 has them.
    if !(0..=253_402_300_799).contains(&e.created) {
        return Err(Error::invalid(format!(
            "the entry's creation time {} is out of range",
            e.created
        )));
    }
    if e.history.empty_layer != e.layer.is_none() {
        return Err(Error::invalid(
            "the entry's history and layer disagree on whether it has a layer",
        ));
    }
    if let Some(l) = &e.layer {
        l.diff_id()?;
        l.blob.digest()?;
        if !LAYER_TYPES.contains(&l.blob.media_type.as_str()) {
            return Err(Error::invalid(format!(
                "the entry's layer has media type {:?}",
                l.blob.media_type
            )));
        }
    }
    Ok(e)
}

fn artifact_manifest(config: Descriptor, layers: Vec<Descriptor>) -> Vec<u8> {
    let mut extra = BTreeMap::new();
    extra.insert(
        "artifactType".to_string(),
        serde_json::Value::from(ARTIFACT_TYPE),
    );
    model::to_bytes(&Manifest {
        schema_version: 2,
        media_type: Some(model::MT_MANIFEST.to_string()),
        config,
        layers,
        extra,
    })
}

/// The OCI empty descriptor (`{}`).
pub fn empty_descriptor() -> Descriptor {
    Descriptor::new(MT_EMPTY, Digest::of(EMPTY_JSON), EMPTY_JSON.len() as u64)
}

/// The manifest of an entry whose config is `config` and whose layer is `layer`.
pub fn entry_manifest(config: &[u8], layer: Option<&Descriptor>) -> Vec<u8> {
    artifact_manifest(
        Descriptor::new(MT_ENTRY, Digest::of(config), config.len() as u64),
        vec![layer.cloned().unwrap_or_else(empty_descriptor)],
    )
}

/// The config and layer descriptors of an entry's manifest, checked.
pub fn check_entry_manifest(m: &Manifest) -> Result<(Descriptor, Option<Descriptor>)> {
    if m.schema_version != 2 || m.config.media_type != MT_ENTRY {
        return Err(Error::invalid(format!(
            "not a layerfs build cache entry (config of type {:?})",
            m.config.media_type
        )));
    }
    if m.config.size > MAX_ENTRY {
        return Err(Error::invalid(format!(
            "the entry is {} bytes, more than the {MAX_ENTRY} accepted",
            m.config.size
        )));
    }
    m.config.digest()?;
    let layer = match m.layers.as_slice() {
        [] => None,
        [d] if d.media_type == MT_EMPTY => None,
        [d] => {
            d.digest()?;
            Some(d.clone())
        }
        more => {
            return Err(Error::invalid(format!(
                "the entry's manifest has {} layers",
                more.len()
            )));
        }
    };
    Ok((m.config.clone(), layer))
}

/// A manifest as a cache source answered it.
struct Got {
    bytes: Vec<u8>,
    /// `Docker-Content-Digest`.
    digest: Option<String>,
}

/// `GET manifests/<tag>`: `None` when there is none. Errors are the source's (unreachable,
/// refusing); what the body holds is checked by the caller.
fn get_manifest(client: &Client, tag: &str) -> Result<Option<Got>> {
    let what = format!("{}:{tag}", client.reference.repo_key());
    let req = Req::new("GET", client.url(&format!("manifests/{tag}")))
        .header("accept", model::MT_MANIFEST);
    let mut resp = client.send(&req)?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Ok(None),
        _ => return Err(client::status_error(&what, &mut resp)),
    }
    let digest = client::header(&resp, "docker-content-digest").map(str::to_string);
    let bytes = client.read_limited(&what, &mut resp, pull::MAX_MANIFEST)?;
    Ok(Some(Got { bytes, digest }))
}

/// Check a fetched manifest's digest and parse it.
fn parse_got(got: &Got) -> Result<Manifest> {
    let digest = Digest::of(&got.bytes);
    if let Some(h) = got.digest.as_deref().filter(|h| h.starts_with("sha256:")) {
        if Digest::parse(h)? != digest {
            return Err(Error::invalid(format!(
                "the manifest hashes to {digest}, not to the {h} the registry claims"
            )));
        }
    }
    model::parse(&got.bytes, "cache manifest")
}

/// What the sources gave this build.
#[derive(Clone, Copy, Debug, Default)]
pub struct Imported {
    /// Entries pulled.
    pub entries: usize,
    /// Layers downloaded (the rest were in the store).
    pub layers: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Time spent asking and pulling.
    pub time: Duration,
}

struct Source {
    reference: Reference,
    label: String,
    client: Option<Client>,
    dropped: bool,
}

/// The `--cache-from` sources of a build.
pub struct CacheFrom {
    sources: Vec<Source>,
    opts: Options,
    limits: Limits,
    /// Listings a fetched record names: name -> (descriptor, source).
    listings: HashMap<String, (Descriptor, usize)>,
    pub imported: Imported,
}

impl CacheFrom {
    /// Sources to ask in order; nothing is sent before the first question.
    pub fn new(repositories: &[Reference], opts: &Options) -> CacheFrom {
        let mut opts = opts.clone();
        if opts.retries.is_none() && std::env::var_os("LAYERFS_REGISTRY_RETRIES").is_none() {
            opts.retries = Some(SOURCE_RETRIES);
        }
        CacheFrom {
            sources: repositories
                .iter()
                .map(|r| Source {
                    reference: r.clone(),
                    label: r.repo_key(),
                    client: None,
                    dropped: false,
                })
                .collect(),
            opts,
            limits: Limits::default(),
            listings: HashMap::new(),
            imported: Imported::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Source `i`'s client, connecting at first use; `None` (with one warning) when the
    /// source is or becomes unusable.
    fn client(&mut self, i: usize, warn: &mut dyn FnMut(String)) -> Option<&Client> {
        let s = &mut self.sources[i];
        if s.dropped {
            return None;
        }
        if s.client.is_none() {
            match Client::new(&s.reference, &self.opts, false) {
                Ok(c) => s.client = Some(c),
                Err(e) => {
                    self.drop_source(i, &e, warn);
                    return None;
                }
            }
        }
        self.sources[i].client.as_ref()
    }

    /// The manifest tagged `tag` in source `i`, if it has one; a source that fails is dropped
    /// (with one warning) for the rest of the build.
    fn manifest_in(&mut self, i: usize, tag: &str, warn: &mut dyn FnMut(String)) -> Option<Got> {
        let client = self.client(i, warn)?;
        match get_manifest(client, tag) {
            Ok(got) => got,
            Err(e) => {
                self.drop_source(i, &e, warn);
                None
            }
        }
    }

    fn drop_source(&mut self, i: usize, e: &Error, warn: &mut dyn FnMut(String)) {
        let s = &mut self.sources[i];
        s.dropped = true;
        s.client = None;
        warn(format!(
            "cache source {}: {}; building without it",
            s.label,
            one_line(e)
        ));
    }

    /// Ask the sources, in order, for the entry of step `key`; the first that checks out is
    /// imported (its layer published, the entry written) and returned with its source's
    /// name. `None`: no source has it (or none could give it); the step runs.
    pub fn lookup(
        &mut self,
        store: &Store,
        key: &Digest,
        warn: &mut dyn FnMut(String),
    ) -> Option<(Entry, String)> {
        let started = Instant::now();
        let tag = entry_tag(key);
        let limits = self.limits;
        let mut found = None;
        for i in 0..self.sources.len() {
            let Some(got) = self.manifest_in(i, &tag, warn) else {
                continue;
            };
            let Some(client) = self.client(i, warn) else {
                continue;
            };
            match import_entry(store, client, key, &got, limits) {
                Ok((entry, pulled)) => {
                    self.imported.entries += 1;
                    if pulled.fetched {
                        self.imported.layers += 1;
                    }
                    self.imported.bytes += pulled.bytes;
                    found = Some((entry, self.sources[i].label.clone()));
                    break;
                }
                Err(e) => warn(format!(
                    "refused the cache entry {} from {}: {}",
                    key.short(),
                    self.sources[i].label,
                    one_line(&e)
                )),
            }
        }
        self.imported.time += started.elapsed();
        found
    }

    /// The shared build record `id` from the first source that has one (its listings are
    /// fetched when [`Self::listing`] asks).
    pub fn record(
        &mut self,
        id: &Digest,
        warn: &mut dyn FnMut(String),
    ) -> Option<(BuildRecord, String)> {
        let started = Instant::now();
        let tag = record_tag(id);
        let mut found = None;
        for i in 0..self.sources.len() {
            let Some(got) = self.manifest_in(i, &tag, warn) else {
                continue;
            };
            let Some(client) = self.client(i, warn) else {
                continue;
            };
            match fetch_record(client, &got) {
                Ok((record, listings)) => {
                    for (name, desc) in listings {
                        self.listings.insert(name, (desc, i));
                    }
                    found = Some((record, self.sources[i].label.clone()));
                    break;
                }
                Err(e) => warn(format!(
                    "ignored the build record from {}: {}",
                    self.sources[i].label,
                    one_line(&e)
                )),
            }
        }
        self.imported.time += started.elapsed();
        found
    }

    /// Source listing `name` of a fetched record: downloaded, checked against its name and
    /// saved in the store (to explain a changed COPY).
    pub fn listing(&mut self, store: &Store, name: &Digest) -> Option<Listing> {
        let (desc, i) = self.listings.get(&name.to_string())?.clone();
        let mut quiet = |w: String| log::warn!("{w}");
        let client = self.client(i, &mut quiet)?;
        let r = (|| -> Result<Listing> {
            let bytes = pull::fetch_small_blob(client, &desc.digest()?, desc.size)?;
            let listing = cache::decode_manifest(&bytes)
                .ok_or_else(|| Error::invalid("not a source listing"))?;
            let got = context::digest_manifest(&listing);
            if got != *name {
                return Err(Error::invalid(format!(
                    "the listing is of sources {got}, not {name}"
                )));
            }
            cache::save_manifest(store, name, &listing)?;
            Ok(listing)
        })();
        r.map_err(|e| log::warn!("source listing {} from a cache source: {e}", name.short()))
            .ok()
    }
}

/// Fetch, check and import an entry whose manifest is `got`.
fn import_entry(
    store: &Store,
    client: &Client,
    key: &Digest,
    got: &Got,
    limits: Limits,
) -> Result<(Entry, pull::LayerPulled)> {
    let m = parse_got(got)?;
    let (config, layer) = check_entry_manifest(&m)?;
    let bytes = pull::fetch_small_blob(client, &config.digest()?, config.size)?;
    let mut entry = parse_entry(&bytes, key)?;
    let pulled = match (&entry.layer, &layer) {
        (None, None) => pull::LayerPulled::default(),
        (Some(l), Some(d)) if l.blob.digest == d.digest && l.blob.size == d.size => {
            pull::pull_layer(
                store,
                client,
                &l.blob,
                &l.diff_id()?,
                Some(l.size),
                limits,
                &NoProgress,
            )?
        }
        _ => {
            return Err(Error::invalid(
                "the entry's layer is not the one its manifest lists",
            ));
        }
    };
    entry.last_used = crate::store::time::now();
    cache::store_entry(store, &entry)?;
    Ok((entry, pulled))
}

/// Fetch and check a record whose manifest is `got`: the record and its listings (name ->
/// descriptor).
fn fetch_record(client: &Client, got: &Got) -> Result<(BuildRecord, Vec<(String, Descriptor)>)> {
    let m = parse_got(got)?;
    if m.config.media_type != MT_RECORD {
        return Err(Error::invalid(format!(
            "not a layerfs build record (config of type {:?})",
            m.config.media_type
        )));
    }
    if m.config.size > MAX_RECORD {
        return Err(Error::invalid(format!(
            "the record is {} bytes, more than the {MAX_RECORD} accepted",
            m.config.size
        )));
    }
    let bytes = pull::fetch_small_blob(client, &m.config.digest()?, m.config.size)?;
    let record: BuildRecord = model::parse(&bytes, "build record")?;
    if record.format != cache::FORMAT_VERSION {
        return Err(Error::invalid(format!(
            "the record has format {}",
            record.format
        )));
    }
    let mut listings = Vec::new();
    for d in &m.layers {
        let name = d
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_LISTING))
            .and_then(|n| Digest::parse(n).ok());
        match name {
            Some(n) if d.media_type == MT_LISTING && d.size <= MAX_LISTING => {
                d.digest()?;
                listings.push((n.to_string(), d.clone()));
            }
            _ => log::debug!("record layer {} ignored", d.digest),
        }
    }
    Ok((record, listings))
}

/// A record as a registry holds it: the Containerfile's path relative to the context, and
/// without what describes one run rather than the build (when it ran, which steps hit), so
/// the same build exports the same bytes.
pub fn travelling_record(record: &BuildRecord, relative_containerfile: &str) -> BuildRecord {
    BuildRecord {
        containerfile: relative_containerfile.to_string(),
        created: 0,
        steps: record
            .steps
            .iter()
            .map(|s| cache::StepRecord {
                cached: false,
                ..s.clone()
            })
            .collect(),
        ..record.clone()
    }
}

/// The manifest and blobs of a record as a registry holds it.
fn record_artifact(
    store: &Store,
    record: &BuildRecord,
    relative_containerfile: &str,
) -> Result<(Vec<u8>, Vec<Blob>)> {
    let travelling = travelling_record(record, relative_containerfile);
    let config = model::to_bytes(&travelling);
    let config_desc = Descriptor::new(MT_RECORD, Digest::of(&config), config.len() as u64);
    let mut blobs = vec![Blob::bytes(config)];
    let mut layers = Vec::new();
    let names: BTreeSet<&String> = record
        .steps
        .iter()
        .filter_map(|s| s.sources.as_ref())
        .collect();
    for name in names {
        let Ok(d) = Digest::parse(name) else {
            continue;
        };
        let Some(bytes) = cache::manifest_bytes(store, &d) else {
            continue;
        };
        let blob = Blob::bytes(bytes);
        let mut desc = Descriptor::new(MT_LISTING, blob.digest, blob.size);
        desc.annotations = Some(BTreeMap::from([(ANN_LISTING.to_string(), name.clone())]));
        if !blobs.iter().any(|b| b.digest == blob.digest) {
            blobs.push(blob);
        }
        layers.push(desc);
    }
    Ok((artifact_manifest(config_desc, layers), blobs))
}

/// What an export did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Exported {
    /// Entries in the repository now.
    pub entries: usize,
    /// Entries pushed (the others were there already, the same).
    pub pushed: usize,
    pub existed: usize,
    /// The record was pushed (else it was there, the same).
    pub record_pushed: bool,
    /// Blobs uploaded, mounted from another repository, or already there.
    pub uploaded: usize,
    pub mounted: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// One artifact to push.
struct Item {
    tag: String,
    manifest: Vec<u8>,
    blobs: Vec<Blob>,
}

/// Push the entries of `keys` (those the store has) and `record` (with the Containerfile's
/// path relative to the context, under `record_id`) to `dest`. Manifests the repository
/// already holds, byte for byte, are skipped after one `HEAD`; blobs as in `push`.
pub fn export(
    store: &Store,
    dest: &Reference,
    opts: &Options,
    keys: &[Digest],
    record: Option<(&Digest, &BuildRecord, &str)>,
) -> Result<Exported> {
    let client = Client::new(dest, opts, true)?;
    let mut items = Vec::new();
    let mut layer_blobs = Vec::new();
    let sources;
    {
        let _lock = store.lock(LockKind::Shared)?;
        let mut seen = BTreeSet::new();
        for key in keys {
            if !seen.insert(*key) {
                continue;
            }
            let Some(entry) = cache::lookup(store, key)? else {
                continue;
            };
            let config = entry_config(&entry)?;
            let manifest = entry_manifest(&config, entry.layer.as_ref().map(|l| &l.blob));
            let mut blobs = vec![Blob::bytes(config)];
            match &entry.layer {
                Some(l) => {
                    blobs.push(Blob::stored(store, &l.blob)?);
                    layer_blobs.push(l.blob.digest()?);
                }
                None => blobs.push(Blob::bytes(EMPTY_JSON.to_vec())),
            }
            items.push(Item {
                tag: entry_tag(key),
                manifest,
                blobs,
            });
        }
        sources = state::read_sources(store);
    }
    let record_item = match record {
        Some((id, r, rel)) => {
            let (manifest, blobs) = record_artifact(store, r, rel)?;
            Some(Item {
                tag: record_tag(id),
                manifest,
                blobs,
            })
        }
        None => None,
    };
    let out = Mutex::new(Exported::default());
    // Whether it had to be pushed.
    let push_item = |item: &Item| -> Result<bool> {
        let digest = Digest::of(&item.manifest);
        if push::manifest_digest(&client, &item.tag)? == Some(digest) {
            return Ok(false);
        }
        let p = push::push_manifest_with_blobs(
            &client,
            &item.blobs,
            &sources,
            &item.tag,
            model::MT_MANIFEST,
            &item.manifest,
            1,
            &NoProgress,
        )?;
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        o.uploaded += p.uploaded;
        o.mounted += p.mounted;
        o.bytes += p.bytes;
        Ok(true)
    };
    let queue = Mutex::new(items.iter().collect::<VecDeque<&Item>>());
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..EXPORT_JOBS.min(items.len()) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(item) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                    else {
                        break;
                    };
                    match push_item(item) {
                        Ok(pushed) => {
                            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                            o.entries += 1;
                            if pushed {
                                o.pushed += 1;
                            } else {
                                o.existed += 1;
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    // The record last: it names entries that are all there now.
    let record_pushed = match &record_item {
        Some(item) => push_item(item)?,
        None => false,
    };
    let lock = store.lock(LockKind::Exclusive)?;
    if let Err(e) = state::record_sources(store, &dest.repo_key(), &layer_blobs) {
        log::warn!("not recording where the blobs went: {e}");
    }
    drop(lock);
    Ok(Exported {
        record_pushed,
        ..out.into_inner().unwrap_or_else(|p| p.into_inner())
    })
}

/// An error as one line.
fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::cache::{HistoryEntry, LayerRef};
    use crate::build::image::RunConfig;

    fn entry(key: &Digest, layer: bool) -> Entry {
        Entry {
            format: 1,
            key: key.to_string(),
            layer: layer.then(|| LayerRef {
                diff_id: Digest::of(b"tar").to_string(),
                blob: Descriptor::new(LAYER_TYPES[1], Digest::of(b"gz"), 2),
                size: 3,
            }),
            config: RunConfig {
                env: vec!["A=1".into()],
                ..RunConfig::default()
            },
            history: HistoryEntry {
                created_by: "RUN x".into(),
                comment: None,
                empty_layer: !layer,
            },
            created: 1_700_000_000,
            last_used: 1_800_000_000,
            duration_ms: 42,
        }
    }

    #[test]
    fn tags_are_valid_and_keyed() {
        let key = Digest::of(b"step");
        let t = entry_tag(&key);
        assert_eq!(t.len(), 68);
        assert!(t.starts_with("lfc-") && t.ends_with(&key.hex()));
        assert_eq!(record_tag(&key), format!("lfr-{}", key.hex()));
        // The distribution grammar: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
        let r = Reference::parse(&format!("localhost:5000/cache:{t}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some(t.as_str()));
        assert!(parse_repository("docker://localhost:5000/team/cache").is_ok());
        assert!(parse_repository("localhost:5000/cache:x").is_err());
        assert!(parse_repository("cache").is_err());
    }

    #[test]
    fn entries_travel_without_local_bookkeeping() {
        let key = Digest::of(b"k");
        let e = entry(&key, true);
        let bytes = entry_config(&e).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("last_used"), "{text}");
        // The local file's bytes, but for last_used.
        let local = serde_json::to_vec_pretty(&e).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&local).unwrap();
        let mut v = v.as_object().unwrap().clone();
        v.remove("last_used");
        let travelled: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(travelled, serde_json::Value::Object(v));
        // Same entry, same bytes, whenever it is pushed.
        let later = Entry {
            last_used: 1,
            ..e.clone()
        };
        assert_eq!(entry_config(&later).unwrap(), bytes);
        let back = parse_entry(&bytes, &key).unwrap();
        assert_eq!(
            back,
            Entry {
                last_used: 0,
                ..e.clone()
            }
        );
        // Untrusted: another key, another format, a history that contradicts the layer, an
        // unknown layer type, garbage.
        assert!(
            parse_entry(&bytes, &Digest::of(b"other"))
                .unwrap_err()
                .to_string()
                .contains("not this step's")
        );
        let bad = |f: &dyn Fn(&mut Entry)| {
            let mut x = e.clone();
            f(&mut x);
            parse_entry(&entry_config(&x).unwrap(), &key).is_err()
        };
        assert!(bad(&|x| x.format = 2));
        assert!(bad(&|x| x.created = -1));
        assert!(bad(&|x| x.created = i64::MAX));
        assert!(bad(&|x| x.history.empty_layer = true));
        assert!(bad(&|x| {
            if let Some(l) = x.layer.as_mut() {
                l.blob.media_type = "text/html".into();
            }
        }));
        assert!(bad(&|x| {
            if let Some(l) = x.layer.as_mut() {
                l.diff_id = "md5:00".into();
            }
        }));
        assert!(parse_entry(b"{\"format\":1", &key).is_err());
        assert!(parse_entry(b"[]", &key).is_err());
    }

    #[test]
    fn manifests_have_the_cache_media_types() {
        let key = Digest::of(b"k");
        let e = entry(&key, true);
        let config = entry_config(&e).unwrap();
        let layer = &e.layer.as_ref().unwrap().blob;
        let bytes = entry_manifest(&config, Some(layer));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["mediaType"], model::MT_MANIFEST);
        assert_eq!(v["artifactType"], ARTIFACT_TYPE);
        assert_eq!(v["config"]["mediaType"], MT_ENTRY);
        assert_eq!(v["config"]["digest"], Digest::of(&config).to_string());
        assert_eq!(v["config"]["size"], config.len());
        assert_eq!(v["layers"][0]["digest"], layer.digest);
        assert_eq!(v["layers"][0]["mediaType"], LAYER_TYPES[1]);
        let m: Manifest = model::parse(&bytes, "m").unwrap();
        assert_eq!(check_entry_manifest(&m).unwrap().1.as_ref(), Some(layer));

        // A config-only step: the OCI empty descriptor, read back as no layer.
        let none = entry(&key, false);
        let config = entry_config(&none).unwrap();
        let bytes = entry_manifest(&config, None);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["layers"][0]["mediaType"], MT_EMPTY);
        assert_eq!(
            v["layers"][0]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(v["layers"][0]["size"], 2);
        let m: Manifest = model::parse(&bytes, "m").unwrap();
        assert_eq!(check_entry_manifest(&m).unwrap().1, None);
        // Zero layers is read as no layer too; two layers, or another config type, are not
        // entries.
        let mut zero = m.clone();
        zero.layers.clear();
        assert_eq!(check_entry_manifest(&zero).unwrap().1, None);
        let mut two = m.clone();
        two.layers = vec![layer.clone(), layer.clone()];
        assert!(check_entry_manifest(&two).is_err());
        let mut image = m.clone();
        image.config.media_type = model::MT_CONFIG.into();
        assert!(check_entry_manifest(&image).is_err());
        let mut huge = m;
        huge.config.size = MAX_ENTRY + 1;
        assert!(check_entry_manifest(&huge).is_err());
    }

    #[test]
    fn records_travel_with_a_relative_path() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("s")).unwrap();
        let listing: Listing = vec![(
            b"src/a".to_vec(),
            context::EntryDigest {
                kind: context::EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                link_target: None,
                content: Some(Digest::of(b"a")),
            },
        )];
        let name = context::digest_manifest(&listing);
        cache::save_manifest(&store, &name, &listing).unwrap();
        let record = BuildRecord {
            format: 1,
            containerfile: "/home/me/p/Containerfile".into(),
            target: None,
            created: 1,
            steps: vec![cache::StepRecord {
                sources: Some(name.to_string()),
                ..cache::StepRecord::default()
            }],
        };
        let (bytes, blobs) = record_artifact(&store, &record, "Containerfile").unwrap();
        let m: Manifest = model::parse(&bytes, "m").unwrap();
        assert_eq!(m.config.media_type, MT_RECORD);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].media_type, MT_LISTING);
        assert_eq!(
            m.layers[0].annotations.as_ref().unwrap()[ANN_LISTING],
            name.to_string()
        );
        assert_eq!(blobs.len(), 2);
        let got = Got {
            bytes: bytes.clone(),
            digest: None,
        };
        assert!(parse_got(&got).is_ok());
        let lying = Got {
            bytes,
            digest: Some(Digest::of(b"x").to_string()),
        };
        assert!(parse_got(&lying).is_err());
        assert_eq!(
            relative_path(Path::new("/a/ctx/Containerfile"), Path::new("/a/ctx")),
            "Containerfile"
        );
        assert_eq!(
            relative_path(Path::new("/a/files/x.Dockerfile"), Path::new("/a/ctx")),
            "../files/x.Dockerfile"
        );
        assert_ne!(
            shared_record_id("Containerfile", None),
            shared_record_id("Containerfile", Some("app"))
        );
    }
}
