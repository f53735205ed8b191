//! `layerfs build`: the stages a target needs, each step looked up in the cache by its key
//! and run only on a miss, with the reason for every miss.
//!
//! A step that hits costs a key computation and one small file read: no mount, no copy (a
//! COPY's key needs its sources' digest, which the context's stat cache answers without
//! reading unchanged files). A step that misses runs in a layerfs mount of its parent's
//! layers with a fresh upper in the store's staging area (RUN through the OCI runtime, COPY
//! and ADD by copying into the mount), and the upper becomes the step's layer through the
//! canonical diff. Config-only steps (ENV, CMD, ...) have keys and entries too, so every
//! step says `CACHED` or why it ran, and add history entries marked `empty_layer`.
//!
//! Why a step ran is found by comparing with the last build of the same Containerfile and
//! target (`cache/builds`): the first difference in the step's own inputs (instruction, build
//! args, base image, sources), else the earlier step whose change reached it.
//!
//! Invariants: a failed step leaves no mount, no staging directory and no cache entry (its
//! staging directory and mount are owned by values dropped on every path); the image is named
//! only once every stage succeeded; keys never depend on times or on how the context got here.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::cache::{self, BuildRecord, Entry, HistoryEntry, LayerRef, StepRecord};
use super::context::{self, Context, Manifest, StatCache};
use super::copy::{self, CopyOptions};
use super::dockerfile::{
    self, CommandLine, Dockerfile, Healthcheck, Instruction, Located, SourceRef,
};
use super::ignore::IgnoreRules;
use super::image::{ImageState, RunConfig};
use super::key::{self, KeyInputs};
use super::progress::{Progress, StepEnd, StepStart};
use super::remote::{self, CacheFrom};
use super::rootfs::{self, MountedRoot, RootSpec};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::oci::compress::{Codec, Compression};
use crate::oci::export;
use crate::registry::{self, Reference};
use crate::run::{self, Network, Output, RunSpec, Runtime, Stream};
use crate::store::{Store, images, ops};
use crate::sys::{self, LockKind};

mod copy_step;
use copy_step::{Found, ImageView};

/// Largest Containerfile read.
const MAX_CONTAINERFILE: u64 = 16 << 20;
/// Lines of a failed step's output repeated in its error.
const TAIL_LINES: usize = 12;

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub context: PathBuf,
    /// The Containerfile; default `Containerfile`, then `Dockerfile`, in the context.
    pub file: Option<PathBuf>,
    pub tags: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    /// Stages (names or indexes) whose steps ignore the cache.
    pub no_cache_filter: Vec<String>,
    pub network: Network,
    pub source_date_epoch: Option<i64>,
    pub runtime: Option<PathBuf>,
    /// Cache repositories asked at a local miss, in order (`--cache-from`).
    pub cache_from: Vec<Reference>,
    /// Cache repositories the build's entries are pushed to (`--cache-to`).
    pub cache_to: Vec<Reference>,
    /// How to reach those registries.
    pub registry: registry::Options,
}

/// Why a build failed: the Containerfile itself (exit 2), or running it (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Containerfile(String),
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<run::RunError> for BuildError {
    fn from(e: run::RunError) -> Self {
        BuildError::Failed(Error::invalid(e.to_string()))
    }
}

type BResult<T> = std::result::Result<T, BuildError>;

/// What a build made.
#[derive(Clone, Debug)]
pub struct Built {
    pub manifest: Digest,
    pub tags: Vec<String>,
    pub steps: usize,
    pub cached: usize,
}

/// Where the Containerfile is: `--file`, else `Containerfile`, else `Dockerfile` in the context.
pub fn find_containerfile(context: &Path, file: Option<&Path>) -> BResult<PathBuf> {
    if let Some(f) = file {
        return Ok(f.to_path_buf());
    }
    for name in ["Containerfile", "Dockerfile"] {
        let p = context.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(BuildError::Containerfile(format!(
        "no Containerfile or Dockerfile in {} (give one with -f)",
        context.display()
    )))
}

/// A stage's result, for later stages and COPY --from.
#[derive(Clone)]
struct StageResult {
    state: ImageState,
}

/// The state a build carries from step to step.
struct Builder<'a> {
    store: &'a Store,
    opts: &'a BuildOptions,
    df: Dockerfile,
    containerfile: String,
    context: Context,
    stat_cache: StatCache,
    stat_cache_name: Vec<u8>,
    previous: Option<BuildRecord>,
    record: BuildRecord,
    progress: Progress,
    runtime: Option<Runtime>,
    stages: HashMap<usize, StageResult>,
    steps: usize,
    cached: usize,
    codec: Codec,
    /// `--cache-from` sources (none: `None`).
    remote: Option<CacheFrom>,
}

fn cf_error(file: &str, e: impl std::fmt::Display) -> BuildError {
    BuildError::Containerfile(format!("{file}: {e}"))
}

/// Run a build.
pub fn build(store: &Store, opts: &BuildOptions, progress: Progress) -> BResult<Built> {
    let started = Instant::now();
    for t in &opts.tags {
        crate::store::validate_name(t).map_err(|e| BuildError::Containerfile(e.to_string()))?;
    }
    let context_dir = std::fs::canonicalize(&opts.context).map_err(|e| {
        BuildError::Failed(Error::io(
            format!("build context {}", opts.context.display()),
            e,
        ))
    })?;
    let cf_path = find_containerfile(&context_dir, opts.file.as_deref())?;
    let cf_abs = std::fs::canonicalize(&cf_path).map_err(|e| {
        BuildError::Failed(Error::io(format!("Containerfile {}", cf_path.display()), e))
    })?;
    let shown = cf_path.display().to_string();
    let text = read_limited(&cf_abs).map_err(BuildError::Failed)?;
    let df = dockerfile::parse(&text).map_err(|e| cf_error(&shown, e))?;

    let ctx_fd = sys::open_dir_path(&context_dir).map_err(|e| {
        BuildError::Failed(Error::io(
            format!("build context {}", context_dir.display()),
            e,
        ))
    })?;
    let rules = load_rules(&ctx_fd, &cf_abs)?;
    let context = Context::from_fd(ctx_fd, rules);

    let stat_cache_name = Digest::of(context_dir.as_os_str().as_encoded_bytes())
        .hex()
        .into_bytes();
    let stat_dir = store.dir(b"cache/stat")?;
    let stat_cache = StatCache::load(stat_dir.as_fd(), &stat_cache_name);
    let record_id = cache::record_id(&cf_abs.display().to_string(), opts.target.as_deref());
    let previous = cache::load_record(store, &record_id)?;
    // The shared record is keyed by the Containerfile's path relative to the context, the
    // same on every machine.
    let relative_cf = remote::relative_path(&cf_abs, &context_dir);
    let shared_id = remote::shared_record_id(&relative_cf, opts.target.as_deref());

    let mut b = Builder {
        store,
        opts,
        df,
        containerfile: shown.clone(),
        context,
        stat_cache,
        stat_cache_name,
        previous,
        record: BuildRecord {
            format: 1,
            containerfile: cf_abs.display().to_string(),
            target: opts.target.clone(),
            created: crate::store::time::now(),
            steps: Vec::new(),
        },
        progress,
        runtime: None,
        stages: HashMap::new(),
        steps: 0,
        cached: 0,
        codec: Codec::new(Compression::Gzip, None)?,
        remote: (!opts.cache_from.is_empty())
            .then(|| CacheFrom::new(&opts.cache_from, &opts.registry)),
    };
    if b.previous.is_none() {
        // No earlier build here: the last build a cache source saw explains the misses.
        let progress = b.progress.clone();
        if let Some(r) = b.remote.as_mut() {
            if let Some((record, from)) = r.record(&shared_id, &mut |w| progress.warn(&w)) {
                progress.note(&format!(
                    "no earlier build of {shown} here: misses are explained against the last \
                     build {from} has"
                ));
                b.previous = Some(record);
            }
        }
    }
    let global =
        b.df.global_scope(&opts.build_args)
            .map_err(|e| cf_error(&shown, e))?;
    let order =
        b.df.stages_needed(opts.target.as_deref(), &|k| global.get(k).cloned())
            .map_err(|e| cf_error(&shown, e))?;
    let Some(&last) = order.last() else {
        return Err(cf_error(&shown, "no stage to build"));
    };
    for &i in &order {
        let result = b.build_stage(i, &global)?;
        b.stages.insert(i, result);
    }
    let state = b.stages[&last].state.clone();
    // The time of the newest step, not of this build: a rebuild where every step hits must
    // give the same image (the clock moving on is no change).
    let created = match (opts.source_date_epoch, state.newest_step_time()) {
        (Some(epoch), _) => crate::store::time::rfc3339(epoch),
        (None, Some(newest)) => newest.to_string(),
        (None, None) => crate::store::time::rfc3339(crate::store::time::now()),
    };
    let manifest = write_and_tag(store, &state, &created, &opts.tags)?;
    // A rebuild that changed nothing writes nothing (each write is synced).
    // (Whether a step hit does not matter to the next build's explanations.)
    let same_inputs = |a: &[StepRecord], b: &[StepRecord]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                StepRecord {
                    cached: false,
                    ..x.clone()
                } == StepRecord {
                    cached: false,
                    ..y.clone()
                }
            })
    };
    let record_changed = !b
        .previous
        .as_ref()
        .is_some_and(|p| same_inputs(&p.steps, &b.record.steps));
    if record_changed {
        if let Err(e) = cache::save_record(store, &record_id, &b.record) {
            log::warn!("not saving the build record: {e}");
        }
    }
    if b.stat_cache.needs_save() {
        if let Err(e) = b.stat_cache.save(stat_dir.as_fd(), &b.stat_cache_name) {
            log::warn!("not saving the context's stat cache: {e}");
        }
    }
    b.progress.done(
        &manifest.to_string(),
        &opts.tags,
        b.steps,
        b.cached,
        started.elapsed(),
    );
    if let Some(r) = &b.remote {
        let i = r.imported;
        if i.entries > 0 {
            b.progress.note(&format!(
                "{} steps pulled from the shared cache: {} layers, {} downloaded, {:.2} s",
                i.entries,
                i.layers,
                super::progress::human(i.bytes),
                i.time.as_secs_f64()
            ));
        }
    }
    let keys: Vec<Digest> = b
        .record
        .steps
        .iter()
        .filter_map(|s| Digest::parse(&s.key).ok())
        .collect();
    for dest in &opts.cache_to {
        export_cache(
            store,
            &b.progress,
            dest,
            &opts.registry,
            &keys,
            (&shared_id, &b.record, &relative_cf),
        );
    }
    Ok(Built {
        manifest,
        tags: opts.tags.clone(),
        steps: b.steps,
        cached: b.cached,
    })
}

/// `--cache-to`: push the build's entries and record to `dest`. A failure is one warning:
/// the image is built and named by now, and the cache is an optimization (BuildKit fails the
/// build unless `ignore-error=true`; see README).
fn export_cache(
    store: &Store,
    progress: &Progress,
    dest: &Reference,
    opts: &registry::Options,
    keys: &[Digest],
    record: (&Digest, &BuildRecord, &str),
) {
    let started = Instant::now();
    let to = dest.repo_key();
    match remote::export(store, dest, opts, keys, Some(record)) {
        Ok(x) => {
            progress.note(&format!(
                "exported the build cache to {to}: {} entries ({} pushed, {} already there), \
                 record {}, {} blobs uploaded ({}), {} mounted, in {:.2} s",
                x.entries,
                x.pushed,
                x.existed,
                if x.record_pushed {
                    "pushed"
                } else {
                    "unchanged"
                },
                x.uploaded,
                super::progress::human(x.bytes),
                x.mounted,
                started.elapsed().as_secs_f64()
            ));
            progress.json_event(json!({
                "event": "cache_export",
                "to": to,
                "entries": x.entries,
                "pushed": x.pushed,
                "existed": x.existed,
                "record_pushed": x.record_pushed,
                "uploaded": x.uploaded,
                "mounted": x.mounted,
                "bytes": x.bytes,
                "duration_ms": started.elapsed().as_millis() as u64,
            }));
        }
        Err(e) => {
            progress.warn(&format!(
                "exporting the build cache to {to} failed (the image is built): {e}"
            ));
            progress.json_event(json!({
                "event": "cache_export",
                "to": to,
                "error": e.to_string(),
            }));
        }
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut buf = Vec::new();
    f.take(MAX_CONTAINERFILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if buf.len() as u64 > MAX_CONTAINERFILE {
        return Err(Error::invalid(format!(
            "{}: larger than {} MiB",
            path.display(),
            MAX_CONTAINERFILE >> 20
        )));
    }
    Ok(buf)
}

fn load_rules(ctx: &OwnedFd, containerfile: &Path) -> BResult<IgnoreRules> {
    let (dir, name) = match (containerfile.parent(), containerfile.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => return Ok(IgnoreRules::default()),
    };
    let dir_fd = sys::open_dir_path(dir)
        .map_err(|e| BuildError::Failed(Error::io(format!("opening {}", dir.display()), e)))?;
    let (rules, _) =
        context::load_ignore_rules(ctx.as_fd(), Some((dir_fd.as_fd(), name.as_encoded_bytes())))
            .map_err(|e| BuildError::Containerfile(e.to_string()))?;
    Ok(rules)
}

/// Store the image config and manifest of `state` and name it `tags`. A rebuild that gives
/// the image every tag already names writes nothing.
fn write_and_tag(
    store: &Store,
    state: &ImageState,
    created: &str,
    tags: &[String],
) -> Result<Digest> {
    let config = state.config_bytes(created)?;
    let (want, _) = images::image_manifest(&config, state.manifest_layers());
    let digest = want.digest()?;
    {
        let _lock = store.lock(LockKind::Shared)?;
        let all_there = !tags.is_empty()
            && tags
                .iter()
                .all(|t| images::resolve(store, t).is_ok_and(|img| img.manifest_digest == digest));
        if all_there {
            return Ok(digest);
        }
    }
    let staging = store.staging()?;
    let _lock = store.lock(LockKind::Exclusive)?;
    let desc = images::write_image(store, &staging, &config, state.manifest_layers())?;
    for t in tags {
        images::tag(store, t, &desc)?;
    }
    desc.digest()
}

/// What running a step produced.
struct Produced {
    layer: Option<LayerRef>,
    config: RunConfig,
}

/// A step's key and what it was computed from.
struct Keyed {
    key: Digest,
    record: StepRecord,
    manifest: Option<Manifest>,
}

impl Builder<'_> {
    fn stage_label(&self, stage: usize) -> String {
        self.df.stages[stage].display_name()
    }

    fn platform() -> String {
        dockerfile::args::host_platform().to_string()
    }

    fn no_cache_for(&self, stage: usize) -> Option<String> {
        if self.opts.no_cache {
            return Some("--no-cache".into());
        }
        let st = &self.df.stages[stage];
        self.opts
            .no_cache_filter
            .iter()
            .find(|f| {
                st.name.as_deref() == Some(f.to_lowercase().as_str())
                    || f.parse::<usize>().ok() == Some(stage)
            })
            .map(|f| format!("--no-cache-filter {f}"))
    }

    fn build_stage(
        &mut self,
        index: usize,
        global: &BTreeMap<String, String>,
    ) -> BResult<StageResult> {
        let stage = self.df.stages[index].clone();
        let label = self.stage_label(index);
        let total = stage.instructions.len() + 1;
        let lookup = |k: &str| global.get(k).cloned();
        let base = self
            .df
            .resolve_base(index, &lookup)
            .map_err(|e| cf_error(&self.containerfile, e))?;
        if let Some(p) = stage
            .expanded_platform(self.df.escape, &lookup)
            .map_err(|e| cf_error(&self.containerfile, e))?
        {
            let host = Self::platform();
            if p != host
                && p != format!(
                    "{}/{}",
                    std::env::consts::OS,
                    host.split('/').nth(1).unwrap_or("")
                )
            {
                return Err(cf_error(
                    &self.containerfile,
                    format!(
                        "line {}: FROM --platform={p}: this host builds {host} only",
                        stage.line
                    ),
                ));
            }
        }
        self.progress.step_start(&StepStart {
            stage: &label,
            number: 1,
            total,
            text: &stage.text,
        });
        let (mut state, base_id) = match &base {
            SourceRef::Scratch => (ImageState::scratch(), "scratch".to_string()),
            SourceRef::Stage(i) => match self.stages.get(i) {
                Some(r) => (r.state.clone(), format!("stage {}", self.stage_label(*i))),
                None => {
                    return Err(cf_error(
                        &self.containerfile,
                        format!("stage {i} was not built"),
                    ));
                }
            },
            SourceRef::Image(name) => {
                let img = {
                    let _lock = self.store.lock(LockKind::Shared)?;
                    images::resolve(self.store, name).map_err(|e| {
                        BuildError::Failed(Error::invalid(format!(
                            "FROM {name}: {e} (layerfs import or layerfs pull it first)"
                        )))
                    })?
                };
                (ImageState::of_image(&img)?, img.manifest_digest.to_string())
            }
        };
        let from_record = StepRecord {
            stage: index,
            stage_name: stage.name.clone(),
            index: 0,
            line: stage.line,
            text: stage.text.clone(),
            expanded: stage.text.clone(),
            key: state.state_digest().to_string(),
            parent_state: String::new(),
            base: Some(base_id.clone()),
            cached: true,
            ..StepRecord::default()
        };
        // The cascade starts at FROM when the base is not what it was.
        let mut first_miss: Option<String> = match self.previous_step(index, 0) {
            Some(prev) if prev.base.as_deref() != Some(base_id.as_str()) => {
                Some("base image changed".to_string())
            }
            _ => None,
        };
        if first_miss.is_some() {
            self.progress
                .step_runs(&label, 1, first_miss.as_deref().unwrap_or(""));
        }
        self.record.steps.push(from_record);
        self.progress.step_end(&StepEnd {
            stage: &label,
            number: 1,
            key: None,
            cached: first_miss.is_none(),
            reason: first_miss.as_deref(),
            duration: Duration::ZERO,
            layer_size: None,
            cached_from: None,
        });
        let base_changed = first_miss.is_some();
        if base_changed {
            first_miss = Some("base image changed".into());
        }

        // ARGs declared in this stage: name -> value (None: declared, no value).
        let mut args: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut cmd_set = false;
        for (i, ins) in stage.instructions.iter().enumerate() {
            let number = i + 2;
            self.progress.step_start(&StepStart {
                stage: &label,
                number,
                total,
                text: &ins.text,
            });
            let lookup = |k: &str| {
                state
                    .config
                    .env_get(k)
                    .map(str::to_string)
                    .or_else(|| args.get(k).cloned().flatten())
            };
            let expanded = ins
                .expand(self.df.escape, &lookup)
                .map_err(|e| cf_error(&self.containerfile, e))?;
            if let Instruction::Arg(a) = &expanded.value {
                for def in &a.defs {
                    let value = self
                        .opts
                        .build_args
                        .get(&def.name)
                        .cloned()
                        .or_else(|| def.default.clone())
                        .or_else(|| global.get(&def.name).cloned());
                    args.insert(def.name.clone(), value);
                }
                self.progress.step_end(&StepEnd {
                    stage: &label,
                    number,
                    key: None,
                    cached: true,
                    reason: None,
                    duration: Duration::ZERO,
                    layer_size: None,
                    cached_from: None,
                });
                continue;
            }
            let step_started = Instant::now();
            let keyed = self.key_step(index, i + 1, &expanded, &state, &args)?;
            log::debug!("step {number}: key in {:?}", step_started.elapsed());
            let no_cache = self.no_cache_for(index);
            let mut cached_from = None;
            let hit = match &no_cache {
                Some(_) => None,
                None => match cache::lookup(self.store, &keyed.key)? {
                    Some(e) => Some(e),
                    None => self.remote_lookup(&keyed.key).map(|(e, from)| {
                        cached_from = Some(from);
                        e
                    }),
                },
            };
            if cached_from.is_some() {
                // Saved as a run would, so the next build can say what changed in it.
                if let (Some(m), Some(d)) = (&keyed.manifest, &keyed.record.sources) {
                    if let Ok(d) = Digest::parse(d) {
                        cache::save_manifest(self.store, &d, m)?;
                    }
                }
            }
            let mut record = keyed.record;
            self.steps += 1;
            match hit {
                Some(entry) => {
                    record.cached = true;
                    self.cached += 1;
                    let created = self.history_time(entry.created);
                    state.apply(
                        entry.layer.clone(),
                        entry.config.clone(),
                        entry.history.clone(),
                        created,
                    );
                    if let Instruction::Cmd(_) = expanded.value {
                        cmd_set = true;
                    }
                    self.record.steps.push(record);
                    self.progress.step_end(&StepEnd {
                        stage: &label,
                        number,
                        key: Some(&keyed.key.to_string()),
                        cached: true,
                        reason: None,
                        duration: step_started.elapsed(),
                        layer_size: entry.layer.as_ref().map(|l| l.size),
                        cached_from: cached_from.as_deref(),
                    });
                }
                None => {
                    let reason = match no_cache {
                        Some(r) => r,
                        None => {
                            self.explain(&record, keyed.manifest.as_ref(), first_miss.as_deref())
                        }
                    };
                    self.progress.step_runs(&label, number, &reason);
                    if first_miss.is_none() {
                        first_miss =
                            Some(format!("after step {number} ({})", short_text(&ins.text)));
                    }
                    let run_args: BTreeMap<String, String> = args
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                        .collect();
                    let produced =
                        self.run_step(index, number, &expanded, &state, &run_args, &mut cmd_set)?;
                    let history = HistoryEntry {
                        created_by: key::created_by(
                            &expanded.value,
                            &state.config.shell(),
                            &run_args,
                        ),
                        comment: None,
                        empty_layer: produced.layer.is_none(),
                    };
                    let now = crate::store::time::now();
                    let entry = Entry {
                        format: 1,
                        key: keyed.key.to_string(),
                        layer: produced.layer.clone(),
                        config: produced.config.clone(),
                        history: history.clone(),
                        created: now,
                        last_used: now,
                        duration_ms: step_started.elapsed().as_millis() as u64,
                    };
                    let t = Instant::now();
                    cache::store_entry(self.store, &entry)?;
                    if let (Some(m), Some(d)) = (&keyed.manifest, &record.sources) {
                        if let Ok(d) = Digest::parse(d) {
                            cache::save_manifest(self.store, &d, m)?;
                        }
                    }
                    log::debug!(
                        "step {number}: entry and listing saved in {:?}",
                        t.elapsed()
                    );
                    let before = state.state_digest();
                    state.apply(
                        produced.layer.clone(),
                        produced.config,
                        history,
                        self.history_time(now),
                    );
                    // Early cut-off: a step that left the same state as last time does not
                    // make later steps run.
                    if self.previous_state_after(index, i + 1)
                        == Some(state.state_digest().to_string())
                        && !base_changed
                    {
                        first_miss = None;
                    }
                    let _ = before;
                    record.cached = false;
                    self.record.steps.push(record);
                    self.progress.step_end(&StepEnd {
                        stage: &label,
                        number,
                        key: Some(&keyed.key.to_string()),
                        cached: false,
                        reason: Some(&reason),
                        duration: step_started.elapsed(),
                        layer_size: produced.layer.as_ref().map(|l| l.size),
                        cached_from: None,
                    });
                }
            }
        }
        Ok(StageResult { state })
    }

    /// At a local miss: the entry of `key` from a `--cache-from` source, imported, and the
    /// source's name.
    fn remote_lookup(&mut self, key: &Digest) -> Option<(Entry, String)> {
        let progress = self.progress.clone();
        self.remote
            .as_mut()?
            .lookup(self.store, key, &mut |w| progress.warn(&w))
    }

    fn history_time(&self, when: i64) -> String {
        crate::store::time::rfc3339(self.opts.source_date_epoch.unwrap_or(when))
    }

    fn previous_step(&self, stage: usize, index: usize) -> Option<&StepRecord> {
        self.previous
            .as_ref()?
            .steps
            .iter()
            .find(|s| s.stage == stage && s.index == index)
    }

    /// The state after step `index` of `stage` in the previous build: the parent state of the
    /// step that followed it.
    fn previous_state_after(&self, stage: usize, index: usize) -> Option<String> {
        self.previous_step(stage, index + 1)
            .map(|s| s.parent_state.clone())
    }

    /// The key of a step, and the record of what it was made from.
    fn key_step(
        &mut self,
        stage: usize,
        index: usize,
        ins: &Located<Instruction>,
        state: &ImageState,
        args: &BTreeMap<String, Option<String>>,
    ) -> BResult<Keyed> {
        let parent = state.state_digest();
        let identity = key::instruction_identity(&ins.value);
        let platform = Self::platform();
        let mut inputs = KeyInputs {
            parent_state: Some(&parent),
            instruction: &identity,
            platform: &platform,
            ..KeyInputs::default()
        };
        let set_args: BTreeMap<String, String> = args
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        let mut manifest = None;
        let sources_digest;
        let from_state;
        let network;
        match &ins.value {
            Instruction::Run(r) => {
                inputs.args = set_args.clone();
                network = self.run_network(r.network.as_deref()).map(|n| match n {
                    Network::None => "none",
                    Network::Host => "host",
                });
                inputs.network = network.as_ref().ok().copied();
                network?;
            }
            Instruction::Copy(c) if c.from.is_some() => {
                let f = c.from.as_deref().unwrap_or_default();
                from_state = self.copied_state(f)?;
                inputs.from_state = Some(&from_state);
            }
            Instruction::Copy(_) | Instruction::Add(_) => {
                let (srcs, chown, chmod) = copy_parts(&ins.value);
                let chmod = chmod.map(copy::parse_chmod).transpose().map_err(|e| {
                    cf_error(&self.containerfile, format!("line {}: {e}", ins.line))
                })?;
                let chown = chown.and_then(numeric_owner);
                let mut all = Vec::new();
                for s in srcs {
                    check_add_source(&ins.value, s, ins.line, &self.containerfile)?;
                    let selected = self.context.select(s.as_bytes()).map_err(|e| {
                        BuildError::Failed(Error::invalid(format!(
                            "{}:{}: {} {e}",
                            self.containerfile,
                            ins.line,
                            ins.value.keyword()
                        )))
                    })?;
                    all.extend(self.context.manifest(
                        &selected,
                        chmod,
                        chown,
                        &mut self.stat_cache,
                    )?);
                }
                sources_digest = context::digest_manifest(&all);
                inputs.sources = Some(&sources_digest);
                manifest = Some(all);
            }
            _ => {}
        }
        let key = key::step_key(&inputs);
        let record = StepRecord {
            stage,
            stage_name: self.df.stages[stage].name.clone(),
            index,
            line: ins.line,
            text: ins.text.clone(),
            expanded: identity.clone(),
            key: key.to_string(),
            parent_state: parent.to_string(),
            base: None,
            args: inputs.args.clone(),
            scope: set_args,
            sources: inputs.sources.map(Digest::to_string),
            from_state: inputs.from_state.map(Digest::to_string),
            cached: false,
        };
        Ok(Keyed {
            key,
            record,
            manifest,
        })
    }

    fn run_network(&self, flag: Option<&str>) -> BResult<Network> {
        match flag {
            None | Some("default") => Ok(self.opts.network),
            Some("none") => Ok(Network::None),
            Some("host") => Ok(Network::Host),
            Some(other) => Err(BuildError::Containerfile(format!(
                "RUN --network={other}: want default, none or host"
            ))),
        }
    }

    /// The state a COPY --from reads: a stage's, or a stored image's.
    fn copied_state(&self, from: &str) -> BResult<Digest> {
        Ok(self.copied_image(from)?.state_digest())
    }

    fn copied_image(&self, from: &str) -> BResult<ImageState> {
        match self
            .df
            .resolve_copy_from(from)
            .map_err(|e| cf_error(&self.containerfile, format!("COPY --from={from}: {e}")))?
        {
            SourceRef::Stage(i) => self.stages.get(&i).map(|r| r.state.clone()).ok_or_else(|| {
                cf_error(
                    &self.containerfile,
                    format!("COPY --from={from}: stage not built before"),
                )
            }),
            SourceRef::Scratch => Ok(ImageState::scratch()),
            SourceRef::Image(name) => {
                let _lock = self.store.lock(LockKind::Shared)?;
                let img = images::resolve(self.store, &name).map_err(|e| {
                    BuildError::Failed(Error::invalid(format!("COPY --from={name}: {e}")))
                })?;
                Ok(ImageState::of_image(&img)?)
            }
        }
    }

    /// Why a step that missed ran, from the previous build of this Containerfile and target.
    fn explain(
        &mut self,
        now: &StepRecord,
        manifest: Option<&Manifest>,
        cascade: Option<&str>,
    ) -> String {
        let Some(prev_build) = &self.previous else {
            return "not in the cache (no earlier build of this Containerfile)".into();
        };
        let Some(prev) = prev_build
            .steps
            .iter()
            .find(|s| s.stage == now.stage && s.index == now.index)
        else {
            return "new step".into();
        };
        if prev.text != now.text {
            return "instruction changed".into();
        }
        let changed_args: Vec<&String> = now
            .args
            .iter()
            .filter(|(k, v)| prev.args.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(prev.args.keys().filter(|k| !now.args.contains_key(*k)))
            .collect();
        if !changed_args.is_empty() {
            return format!(
                "build arg {} changed",
                changed_args
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if prev.expanded != now.expanded {
            let changed: Vec<&str> = now
                .scope
                .iter()
                .filter(|(k, v)| prev.scope.get(*k) != Some(v))
                .map(|(k, _)| k.as_str())
                .chain(
                    prev.scope
                        .keys()
                        .filter(|k| !now.scope.contains_key(*k))
                        .map(String::as_str),
                )
                .collect();
            return if changed.is_empty() {
                "instruction changed after substitution (an ENV value)".into()
            } else {
                format!("build arg {} changed", changed.join(", "))
            };
        }
        if prev.sources != now.sources {
            let old_name = prev.sources.as_deref().and_then(|d| Digest::parse(d).ok());
            let old = old_name.and_then(|d| {
                cache::load_manifest(self.store, &d).or_else(|| {
                    // A record from a cache source: its listings are there.
                    self.remote.as_mut()?.listing(self.store, &d)
                })
            });
            return match (old, manifest) {
                (Some(old), Some(new)) => {
                    context::explain_changes(&old, new).unwrap_or_else(|| "sources changed".into())
                }
                _ => "sources changed".into(),
            };
        }
        if prev.from_state != now.from_state {
            return "the stage or image it copies from changed".into();
        }
        if prev.parent_state != now.parent_state {
            return cascade
                .map(str::to_string)
                .unwrap_or_else(|| "an earlier step changed".into());
        }
        "not in the cache (pruned, or another build replaced it)".into()
    }

    fn runtime(&mut self) -> BResult<Runtime> {
        if self.runtime.is_none() {
            let rt = Runtime::find(self.opts.runtime.as_deref())?;
            self.runtime = Some(rt);
        }
        self.runtime
            .clone()
            .ok_or_else(|| BuildError::Failed(Error::invalid("no OCI runtime")))
    }

    /// Run a step that missed.
    fn run_step(
        &mut self,
        stage: usize,
        number: usize,
        ins: &Located<Instruction>,
        state: &ImageState,
        run_args: &BTreeMap<String, String>,
        cmd_set: &mut bool,
    ) -> BResult<Produced> {
        let mut config = state.config.clone();
        let cfg_err = |e: String| cf_error(&self.containerfile, format!("line {}: {e}", ins.line));
        match &ins.value {
            Instruction::Run(r) => {
                let network = self.run_network(r.network.as_deref())?;
                if !r.mounts.is_empty() {
                    return Err(cfg_err("RUN --mount is not supported yet".into()));
                }
                let layer = self.layer_step(state, |b, root| {
                    b.exec(
                        stage,
                        number,
                        ins,
                        r.command.clone(),
                        state,
                        run_args,
                        network,
                        root,
                    )
                })?;
                return Ok(Produced {
                    layer: Some(layer),
                    config,
                });
            }
            Instruction::Copy(_) | Instruction::Add(_) => {
                let layer = match self.copy_direct(ins, state)? {
                    Some(layer) => layer,
                    None => self.layer_step(state, |b, root| b.copy(ins, state, root))?,
                };
                return Ok(Produced {
                    layer: Some(layer),
                    config,
                });
            }
            Instruction::Env(kvs) => {
                for kv in kvs {
                    config.env_set(&kv.key, &kv.value);
                }
            }
            Instruction::Label(kvs) => {
                for kv in kvs {
                    config.labels.insert(kv.key.clone(), kv.value.clone());
                }
            }
            Instruction::Maintainer(m) => {
                config.author = Some(m.clone());
                config.labels.insert("maintainer".into(), m.clone());
            }
            Instruction::Workdir(w) => {
                let path = copy::container_path(&config.working_dir, w);
                config.working_dir = format!("/{}", String::from_utf8_lossy(&path));
                // Created when missing (as the USER, as BuildKit does), in a layer of its own.
                let ids = state.diff_ids()?;
                let exists = matches!(
                    ImageView::open(self.store, &ids)?.kind(&path)?,
                    Found::Dir(_)
                );
                if !exists {
                    let user = state.config.user.clone();
                    let layer = self.layer_step(state, |_, root| {
                        let rootfd = root.open()?;
                        let u = run::resolve_user_at(rootfd.as_fd(), &user)?;
                        copy::make_dir(rootfd.as_fd(), &path, (u.uid, u.gid))?;
                        Ok(())
                    })?;
                    return Ok(Produced {
                        layer: Some(layer),
                        config,
                    });
                }
            }
            Instruction::User(u) => config.user = u.clone(),
            Instruction::Expose(ports) => {
                for p in dockerfile::instructions::exposed_ports(ports).map_err(cfg_err)? {
                    config.exposed_ports.insert(p);
                }
            }
            Instruction::Volume(v) => {
                for p in v {
                    config.volumes.insert(p.clone());
                }
            }
            Instruction::StopSignal(s) => config.stop_signal = Some(s.clone()),
            Instruction::Cmd(c) => {
                config.cmd = Some(key::run_argv(c, &config.shell()));
                *cmd_set = true;
            }
            Instruction::Entrypoint(c) => {
                config.entrypoint = Some(key::run_argv(c, &config.shell()));
                // Docker: an ENTRYPOINT resets a CMD inherited from the base image.
                if !*cmd_set {
                    config.cmd = None;
                }
            }
            Instruction::Shell(words) => config.shell = Some(words.clone()),
            Instruction::Healthcheck(Healthcheck::None) => {
                config.healthcheck = Some(json!({"Test": ["NONE"]}));
            }
            Instruction::Healthcheck(Healthcheck::Check(h)) => {
                let mut v = json!({"Test": h.test()});
                let ns = |d: Duration| d.as_nanos() as u64;
                if !h.interval.is_zero() {
                    v["Interval"] = json!(ns(h.interval));
                }
                if !h.timeout.is_zero() {
                    v["Timeout"] = json!(ns(h.timeout));
                }
                if !h.start_period.is_zero() {
                    v["StartPeriod"] = json!(ns(h.start_period));
                }
                if !h.start_interval.is_zero() {
                    v["StartInterval"] = json!(ns(h.start_interval));
                }
                if h.retries != 0 {
                    v["Retries"] = json!(h.retries);
                }
                config.healthcheck = Some(v);
            }
            Instruction::Onbuild(o) => config.onbuild.push(o.expression.clone()),
            Instruction::Arg(_) => {}
        }
        Ok(Produced {
            layer: None,
            config,
        })
    }

    /// Mount the parent's layers with a fresh upper, let `work` change the root, and make the
    /// upper a layer.
    fn layer_step(
        &mut self,
        state: &ImageState,
        work: impl FnOnce(&mut Self, &MountedRoot) -> BResult<()>,
    ) -> BResult<LayerRef> {
        let staging = self.store.staging()?;
        let dir = staging.path();
        let (upper, wdir, mnt) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &wdir] {
            std::fs::create_dir(d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| Error::io("preparing the step's upper", e))?;
        let ids = state.diff_ids()?;
        rootfs::prepare_upper(self.store, &upper, &ids)?;
        let t0 = Instant::now();
        let root = MountedRoot::mount(
            self.store,
            &RootSpec {
                layers: &ids,
                upper: Some((&upper, &wdir)),
                mountpoint: &mnt,
                options: &[],
                container: None,
            },
        )?;
        let t1 = Instant::now();
        let worked = work(self, &root);
        let t2 = Instant::now();
        let unmounted = root.unmount();
        worked?;
        unmounted?;
        let t3 = Instant::now();
        let layer = ops::layer_from_step_upper(
            self.store,
            &staging,
            b"upper",
            self.codec,
            export::Options {
                source_date_epoch: self.opts.source_date_epoch,
            },
            &|_| {},
        )?;
        log::debug!(
            "layer step: mount {:?}, work {:?}, unmount {:?}, diff and publish {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t3.elapsed()
        );
        drop(staging);
        Ok(LayerRef {
            diff_id: layer.diff_id.to_string(),
            blob: layer.blob,
            size: layer.tar_size,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(
        &mut self,
        stage: usize,
        number: usize,
        ins: &Located<Instruction>,
        command: CommandLine,
        state: &ImageState,
        run_args: &BTreeMap<String, String>,
        network: Network,
        root: &MountedRoot,
    ) -> BResult<()> {
        let rt = self.runtime()?;
        let rootfd = root.open()?;
        let user = run::resolve_user_at(rootfd.as_fd(), &state.config.user)?;
        let mut env: Vec<String> = run_args
            .iter()
            .filter(|(k, _)| state.config.env_get(k).is_none())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.extend(state.config.env.iter().cloned());
        let argv = key::run_argv(&command, &state.config.shell());
        let mut spec = RunSpec::new(root.path(), argv.clone());
        spec.env = env;
        spec.cwd = if state.config.working_dir.is_empty() {
            "/".into()
        } else {
            state.config.working_dir.clone()
        };
        spec.user = user;
        spec.network = network;
        let tail: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
        let sink_tail = tail.clone();
        let progress = self.progress.clone();
        let label = self.stage_label(stage);
        let output = Output::Lines(Box::new(move |stream, line| {
            progress.output(&label, number, stream == Stream::Stderr, line);
            let mut t = sink_tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == TAIL_LINES {
                t.remove(0);
            }
            t.push(String::from_utf8_lossy(line).into_owned());
        }));
        let outcome = run::run(&rt, &spec, output)?;
        if !outcome.status.success() {
            let t = tail.lock().unwrap_or_else(|p| p.into_inner());
            let last = if t.is_empty() {
                String::new()
            } else {
                format!("; last output: {}", t.join(" / "))
            };
            return Err(BuildError::Failed(Error::invalid(format!(
                "{}:{}: step {number} `{}` failed: {} ran `{}` and got {}{last}",
                self.containerfile,
                ins.line,
                short_text(&ins.text),
                rt.program().display(),
                argv.join(" "),
                outcome.status
            ))));
        }
        Ok(())
    }
}

/// Sources, `--chown` and `--chmod` of a COPY or ADD.
fn copy_parts(ins: &Instruction) -> (&[String], Option<&str>, Option<&str>) {
    match ins {
        Instruction::Copy(c) => (&c.sources, c.chown.as_deref(), c.chmod.as_deref()),
        Instruction::Add(a) => (&a.sources, a.chown.as_deref(), a.chmod.as_deref()),
        _ => (&[], None, None),
    }
}

/// `--chown=1000:1000` as numbers; names are resolved in the image when the step runs (and
/// enter the key through the instruction).
fn numeric_owner(spec: &str) -> Option<(u32, u32)> {
    let (u, g) = dockerfile::instructions::split_user(spec);
    let uid = u.parse().ok()?;
    let gid = match g {
        Some(g) => g.parse().ok()?,
        None => uid,
    };
    Some((uid, gid))
}

/// ADD of a URL or a git repository is refused (for now), with what to do instead.
fn check_add_source(ins: &Instruction, src: &str, line: usize, file: &str) -> BResult<()> {
    if let Instruction::Add(_) = ins {
        let lower = src.to_ascii_lowercase();
        if lower.starts_with("http://")
            || lower.starts_with("https://")
            || lower.starts_with("git@")
        {
            return Err(cf_error(
                file,
                format!(
                    "line {line}: ADD {src}: downloading is not supported; fetch it in a RUN step (with --network host) or COPY it from the context"
                ),
            ));
        }
    }
    Ok(())
}

fn short_text(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 60 {
        format!("{}...", one_line.chars().take(57).collect::<String>())
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_texts() {
        assert_eq!(numeric_owner("1000"), Some((1000, 1000)));
        assert_eq!(numeric_owner("1:2"), Some((1, 2)));
        assert_eq!(numeric_owner("app:2"), None);
        assert_eq!(short_text("RUN  a \\\n   b"), "RUN a \\ b");
        assert!(short_text(&"x".repeat(100)).ends_with("..."));
    }
}
