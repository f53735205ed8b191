//! The store commands: `import`, `diff`, `commit`, `images`, `layers`, `history`, `rm`
//! and `gc`, each a thin layer over `store::ops` that prints what it did.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{
    CompressionArg, ProgressReader, human, open_store, parse_size, print_json, progress_bar, short,
};
use crate::digest::Digest;
use crate::oci::compress::{Codec, Compression, Limits};
use crate::oci::export;
use crate::store::images;
use crate::store::{self, layers, ops};
use crate::sys::{self, LockKind};

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Layer tar (`-` for standard input); compression is detected from the content.
    #[arg(required_unless_present = "oci", conflicts_with = "oci")]
    pub file: Option<PathBuf>,
    /// Import an image from an OCI image layout instead (skopeo/umoci/podman write them).
    #[arg(long, value_name = "DIR[:TAG]")]
    pub oci: Option<String>,
    /// Name the result: a one-layer image (or --parent plus this layer). A layer no image
    /// names is removed by the next gc.
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
    /// Put the layer on top of this image.
    #[arg(long, value_name = "REF", conflicts_with = "oci")]
    pub parent: Option<String>,
    /// Refuse layers larger than this uncompressed (0: no limit).
    #[arg(long, value_name = "SIZE", default_value = "256G", value_parser = parse_size)]
    pub max_size: u64,
    /// Refuse layers that decompress more than N:1 past the first 16 MiB (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub max_ratio: u64,
    /// With --name: the new image's creation time (seconds since the epoch) instead of now.
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "N")]
    pub source_date_epoch: Option<i64>,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// Upper directory (kernel overlayfs format).
    pub upper: PathBuf,
    /// A layer the upper was made on, top first as for mount (repeat): needed for an upper
    /// with directories renamed with redirect_dir=on.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// Write the tar here (`-`: stdout); without it only the digests are computed.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "none")]
    pub compression: CompressionArg,
    /// Compression level (gzip 1-9, default 1; zstd 1-19, default 3).
    #[arg(long, value_name = "N")]
    pub level: Option<u32>,
    /// Clamp file times to at most this (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "N")]
    pub source_date_epoch: Option<i64>,
}

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Upper directory to commit.
    #[arg(required_unless_present = "container", conflicts_with = "container")]
    pub upper: Option<PathBuf>,
    /// Commit the upper of this store container (its image's layers resolve the upper's
    /// redirects).
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// With UPPER: a layer it was made on, top first (repeat), as `diff --lower`.
    #[arg(long = "lower", value_name = "DIR", conflicts_with = "container")]
    pub lowers: Vec<PathBuf>,
    /// The image the upper was made on (`scratch`: none).
    #[arg(long, value_name = "REF")]
    pub from: String,
    /// Name of the new image.
    #[arg(long, value_name = "NEWREF")]
    pub name: String,
    /// Comment recorded in the image history.
    #[arg(short, long, value_name = "TEXT")]
    pub message: Option<String>,
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: CompressionArg,
    /// Compression level (gzip 1-9, default 1; zstd 1-19, default 3).
    #[arg(long, value_name = "N")]
    pub level: Option<u32>,
    /// Clamp file times (and the image's creation time) to this (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "N")]
    pub source_date_epoch: Option<i64>,
}

fn limits(max_size: u64, max_ratio: u64) -> Limits {
    Limits {
        max_size,
        max_ratio,
    }
}

pub(super) fn run_import(root: &Option<PathBuf>, quiet: bool, a: ImportArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let store = open_store(root)?;
    let lim = limits(a.max_size, a.max_ratio);
    let imported = if let Some(spec) = &a.oci {
        let (dir, tag) = ops::split_layout_ref(spec);
        let bar = progress_bar(quiet, None, "importing");
        let r = ops::import_layout(&store, &dir, tag.as_deref(), a.name.as_deref(), lim, &|n| {
            bar.inc(n)
        });
        bar.finish_and_clear();
        r?
    } else {
        let file = a.file.clone().context("give a layer tar or --oci DIR")?;
        let (input, total): (Box<dyn Read>, Option<u64>) = if file.as_os_str() == "-" {
            (Box::new(std::io::stdin().lock()), None)
        } else {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len)
        };
        let bar = progress_bar(quiet, total, "importing");
        let input = ProgressReader {
            inner: input,
            bar: bar.clone(),
        };
        let created_by = format!(
            "layerfs import {}",
            Path::new(file.file_name().unwrap_or(file.as_os_str())).display()
        );
        let r = ops::import_tar(
            &store,
            input,
            a.name.as_deref(),
            a.parent.as_deref(),
            &created_by,
            a.source_date_epoch,
            lim,
            &|_| {},
        );
        bar.finish_and_clear();
        r?
    };
    for id in &imported.diff_ids {
        println!("{id}");
    }
    if let Some(m) = imported.manifest {
        log::info!("image manifest {m}");
    }
    Ok(())
}

pub(super) fn run_diff(quiet: bool, a: DiffArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let to_stdout = a.output.as_deref() == Some(Path::new("-"));
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("refusing to write a tar to a terminal: redirect stdout or use -o FILE");
    }
    let out = match a.output {
        None => ops::Output::Discard,
        Some(_) if to_stdout => ops::Output::Stdout,
        Some(p) => ops::Output::File(p),
    };
    let compression: Compression = a.compression.into();
    let codec = Codec::new(compression, a.level)?;
    let bar = progress_bar(quiet, None, "diff");
    let opts = export::Options {
        source_date_epoch: a.source_date_epoch,
    };
    let r = ops::diff(&a.upper, &a.lowers, out, codec, opts, &|n| bar.inc(n));
    bar.finish_and_clear();
    let d = r?;
    let mut lines = vec![d.diff_id.to_string()];
    if compression != Compression::None {
        lines.push(d.blob.to_string());
    }
    for l in lines {
        if to_stdout {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    }
    Ok(())
}

pub(super) fn run_commit(root: &Option<PathBuf>, quiet: bool, a: CommitArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let store = open_store(root)?;
    let (upper, lowers) = match (&a.upper, &a.container) {
        (Some(u), _) => (u.clone(), a.lowers.clone()),
        (None, Some(c)) => {
            store::validate_container(c)?;
            let Some(rec) = images::container_record(&store, c)? else {
                bail!("no container {c} in the store");
            };
            // The image's layers, top first, for the upper's redirects.
            let mut lowers = Vec::with_capacity(rec.diff_ids.len());
            for id in rec.diff_ids.iter().rev() {
                let hex = Digest::parse(id)
                    .with_context(|| format!("container {c} record"))?
                    .hex();
                lowers.push(store.root().join("layers").join(hex));
            }
            (
                store.root().join("containers").join(c).join("upper"),
                lowers,
            )
        }
        (None, None) => bail!("give an upper directory or --container"),
    };
    let from = (a.from != "scratch").then_some(a.from.as_str());
    let bar = progress_bar(quiet, None, "commit");
    let opts = export::Options {
        source_date_epoch: a.source_date_epoch,
    };
    let r = ops::commit(
        &store,
        &upper,
        &lowers,
        from,
        &a.name,
        a.message.as_deref(),
        Codec::new(a.compression.into(), a.level)?,
        opts,
        &|n| bar.inc(n),
    );
    bar.finish_and_clear();
    let c = r?;
    println!("{}", c.diffed.diff_id);
    log::info!("image {} manifest {}", a.name, c.manifest);
    Ok(())
}

fn created_of(config: &serde_json::Value) -> String {
    config
        .get("created")
        .and_then(|v| v.as_str())
        .unwrap_or("-")
        .to_string()
}

pub(super) fn run_images(root: &Option<PathBuf>, json: bool) -> Result<()> {
    let store = open_store(root)?;
    let _lock = store.lock(LockKind::Shared)?;
    let mut rows = Vec::new();
    for (name, desc) in images::list(&store)? {
        let img = images::load(&store, Some(name.clone()), &desc)?;
        let size: u64 = img.manifest.layers.iter().map(|l| l.size).sum();
        let ids: Vec<String> = img.diff_ids()?.iter().map(Digest::to_string).collect();
        rows.push(serde_json::json!({
            "name": name,
            "manifest": img.manifest_digest.to_string(),
            "layers": ids,
            "size": size,
            "created": created_of(&img.config),
        }));
    }
    if json {
        return print_json(&serde_json::Value::Array(rows));
    }
    println!(
        "{:<32} {:<12} {:>6} {:>10}  CREATED",
        "NAME", "MANIFEST", "LAYERS", "SIZE"
    );
    for r in rows {
        println!(
            "{:<32} {:<12} {:>6} {:>10}  {}",
            r["name"].as_str().unwrap_or("-"),
            short(r["manifest"].as_str().unwrap_or("-")),
            r["layers"].as_array().map_or(0, Vec::len),
            human(r["size"].as_u64().unwrap_or(0)),
            r["created"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

pub(super) fn run_layers(root: &Option<PathBuf>, json: bool) -> Result<()> {
    let store = open_store(root)?;
    let _lock = store.lock(LockKind::Shared)?;
    let mut users: std::collections::HashMap<Digest, Vec<String>> = Default::default();
    for (name, desc) in images::list(&store)? {
        let img = images::load(&store, Some(name.clone()), &desc)?;
        for id in img.diff_ids()? {
            users.entry(id).or_default().push(name.clone());
        }
    }
    let mut rows = Vec::new();
    for id in layers::list(&store)? {
        let meta = layers::meta(&store, &id);
        rows.push(serde_json::json!({
            "diff_id": id.to_string(),
            "size": meta.as_ref().map(|m| m.size),
            "created": meta.as_ref().map(|m| m.created.clone()),
            "images": users.get(&id).cloned().unwrap_or_default(),
        }));
    }
    if json {
        return print_json(&serde_json::Value::Array(rows));
    }
    println!(
        "{:<12} {:>10}  {:<20}  IMAGES",
        "DIFF ID", "SIZE", "CREATED"
    );
    for r in rows {
        let imgs: Vec<&str> = r["images"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<12} {:>10}  {:<20}  {}",
            short(r["diff_id"].as_str().unwrap_or("-")),
            r["size"].as_u64().map_or("-".to_string(), human),
            r["created"].as_str().unwrap_or("-"),
            if imgs.is_empty() {
                "-".to_string()
            } else {
                imgs.join(", ")
            }
        );
    }
    Ok(())
}

pub(super) fn run_history(root: &Option<PathBuf>, reference: &str, json: bool) -> Result<()> {
    let store = open_store(root)?;
    let _lock = store.lock(LockKind::Shared)?;
    let img = images::resolve(&store, reference)?;
    let ids = img.diff_ids()?;
    let history: Vec<serde_json::Value> = img
        .config
        .get("history")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    // One row per history entry (steps that only changed the config show with no layer, as
    // `docker history` shows them), then any layer the history does not account for.
    let mut rows = Vec::new();
    let mut layer = 0;
    let field =
        |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_str()).map(str::to_string);
    for e in &history {
        let empty = e
            .get("empty_layer")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let (diff_id, digest, size) = if empty || layer >= ids.len() {
            (None, None, 0)
        } else {
            layer += 1;
            let l = &img.manifest.layers[layer - 1];
            (
                Some(ids[layer - 1].to_string()),
                Some(l.digest.clone()),
                l.size,
            )
        };
        rows.push(serde_json::json!({
            "diff_id": diff_id,
            "digest": digest,
            "size": size,
            "empty_layer": diff_id.is_none(),
            "created": field(e, "created"),
            "created_by": field(e, "created_by"),
            "comment": field(e, "comment"),
        }));
    }
    for (i, id) in ids.iter().enumerate().skip(layer) {
        rows.push(serde_json::json!({
            "diff_id": id.to_string(),
            "digest": img.manifest.layers[i].digest,
            "size": img.manifest.layers[i].size,
            "empty_layer": false,
            "created": null,
            "created_by": null,
            "comment": null,
        }));
    }
    // Newest first, as `docker history`.
    rows.reverse();
    if json {
        return print_json(&serde_json::Value::Array(rows));
    }
    println!(
        "{:<12} {:>10}  {:<20}  CREATED BY / COMMENT",
        "DIFF ID", "SIZE", "CREATED"
    );
    for r in rows {
        let by = r["created_by"].as_str().unwrap_or("");
        let msg = match r["comment"].as_str() {
            Some(c) if !by.is_empty() => format!("{by}: {c}"),
            Some(c) => c.to_string(),
            None => by.to_string(),
        };
        println!(
            "{:<12} {:>10}  {:<20}  {}",
            short(r["diff_id"].as_str().unwrap_or("-")),
            human(r["size"].as_u64().unwrap_or(0)),
            r["created"].as_str().unwrap_or("-"),
            msg.replace('\n', " ")
        );
    }
    Ok(())
}

pub(super) fn run_rm(
    root: &Option<PathBuf>,
    reference: Option<&str>,
    container: Option<&str>,
) -> Result<()> {
    let store = open_store(root)?;
    if let Some(name) = container {
        let freed = images::remove_container(&store, name)?;
        println!("removed container {name}: freed {}", human(freed));
        return Ok(());
    }
    let _lock = store.lock(LockKind::Exclusive)?;
    for name in images::untag(&store, reference.unwrap_or_default())? {
        println!("untagged: {name}");
    }
    Ok(())
}

pub(super) fn run_gc(root: &Option<PathBuf>) -> Result<()> {
    let store = open_store(root)?;
    let r = store::gc::gc(&store)?;
    println!(
        "removed {} blobs, {} layers, {} staging dirs, {} stale mount leases; freed {} ({} bytes)",
        r.blobs,
        r.layers,
        r.tmp,
        r.leases,
        human(r.bytes_freed),
        r.bytes_freed
    );
    Ok(())
}
