//! The image a build stage is making: its layers, its runtime config (what `ENV`, `CMD`,
//! `WORKDIR`, ... set) and its history, and the OCI image config written at the end.
//!
//! Invariants: [`ImageState::state_digest`] depends only on the layers (by diffID) and the
//! runtime config, never on history or times, so two steps that leave the same filesystem and
//! config lead to the same next keys (early cut-off). Configs are written through oci-spec's
//! typed [`ImageConfiguration`] and serialized with sorted keys, so the same inputs give the
//! same bytes (reproducible manifest digests).

use std::collections::{BTreeMap, BTreeSet};

use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, Os,
    RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cache::{HistoryEntry, LayerRef};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::store::images::Image;
use crate::store::model::Descriptor;

/// The runtime part of an image config, with Docker's extensions (`Healthcheck`, `OnBuild`,
/// `Shell`) that the OCI config does not define.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub exposed_ports: BTreeSet<String>,
    #[serde(default)]
    pub volumes: BTreeSet<String>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub healthcheck: Option<Value>,
    #[serde(default)]
    pub onbuild: Vec<String>,
    #[serde(default)]
    pub shell: Option<Vec<String>>,
    #[serde(default)]
    pub author: Option<String>,
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    v?.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn keys(v: Option<&Value>) -> BTreeSet<String> {
    v.and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

impl RunConfig {
    /// The runtime config of a stored image's config document.
    pub fn from_image_config(config: &Value) -> RunConfig {
        let c = config.get("config");
        let get = |k: &str| c.and_then(|c| c.get(k));
        let text = |k: &str| get(k).and_then(Value::as_str).unwrap_or("").to_string();
        RunConfig {
            env: strings(get("Env")).unwrap_or_default(),
            cmd: strings(get("Cmd")),
            entrypoint: strings(get("Entrypoint")),
            working_dir: text("WorkingDir"),
            user: text("User"),
            labels: get("Labels")
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            exposed_ports: keys(get("ExposedPorts")),
            volumes: keys(get("Volumes")),
            stop_signal: get("StopSignal")
                .and_then(Value::as_str)
                .map(str::to_string),
            healthcheck: get("Healthcheck").cloned().filter(|v| !v.is_null()),
            onbuild: strings(get("OnBuild")).unwrap_or_default(),
            shell: strings(get("Shell")),
            author: config
                .get("author")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// The value of environment variable `name`.
    pub fn env_get(&self, name: &str) -> Option<&str> {
        self.env.iter().rev().find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }

    /// Set `name=value`, replacing an earlier value in place (as Docker keeps the order).
    pub fn env_set(&mut self, name: &str, value: &str) {
        let entry = format!("{name}={value}");
        match self
            .env
            .iter_mut()
            .find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == name)
        {
            Some(slot) => *slot = entry,
            None => self.env.push(entry),
        }
    }

    /// The shell for shell-form commands: SHELL, else `/bin/sh -c`.
    pub fn shell(&self) -> Vec<String> {
        self.shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    /// Canonical bytes (sorted keys), for digests.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_value(self)
            .map(|v| crate::store::model::to_bytes(&v))
            .unwrap_or_default()
    }
}

/// Where a stage started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    Scratch,
    /// A stored image: its manifest digest.
    Image {
        name: String,
        manifest: Digest,
    },
    /// Another stage of the same build.
    Stage(usize),
}

/// A stage's image so far.
#[derive(Clone, Debug)]
pub struct ImageState {
    pub layers: Vec<LayerRef>,
    pub config: RunConfig,
    pub history: Vec<(HistoryEntry, String)>,
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
    /// History of the base image, kept verbatim.
    pub base_history: Vec<Value>,
}

impl ImageState {
    pub fn scratch() -> ImageState {
        ImageState {
            layers: Vec::new(),
            config: RunConfig {
                env: vec![format!("PATH={}", super::DEFAULT_PATH)],
                ..RunConfig::default()
            },
            history: Vec::new(),
            architecture: crate::store::images::host_arch().to_string(),
            os: "linux".into(),
            variant: None,
            base_history: Vec::new(),
        }
    }

    /// The state of a stored image.
    pub fn of_image(img: &Image) -> Result<ImageState> {
        let ids = img.diff_ids()?;
        if ids.len() != img.manifest.layers.len() {
            return Err(Error::invalid(format!(
                "image {}: {} diff_ids for {} layers",
                img.manifest_digest,
                ids.len(),
                img.manifest.layers.len()
            )));
        }
        let layers = ids
            .iter()
            .zip(&img.manifest.layers)
            .map(|(id, blob)| LayerRef {
                diff_id: id.to_string(),
                blob: blob.clone(),
                size: 0,
            })
            .collect();
        let text = |k: &str| {
            img.config
                .get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let mut config = RunConfig::from_image_config(&img.config);
        // As BuildKit: an image without PATH gets the default one, so RUN steps and the
        // built image find their programs.
        if config.env_get("PATH").is_none() {
            config.env_set("PATH", super::DEFAULT_PATH);
        }
        Ok(ImageState {
            layers,
            config,
            history: Vec::new(),
            architecture: text("architecture")
                .unwrap_or_else(|| crate::store::images::host_arch().to_string()),
            os: text("os").unwrap_or_else(|| "linux".into()),
            variant: text("variant"),
            base_history: img
                .config
                .get("history")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        })
    }

    pub fn diff_ids(&self) -> Result<Vec<Digest>> {
        self.layers.iter().map(LayerRef::diff_id).collect()
    }

    /// What the next step's key starts from: the layers and the runtime config.
    pub fn state_digest(&self) -> Digest {
        let mut h = Hasher::default();
        h.update(b"layerfs build state v1\0");
        h.update(self.os.as_bytes());
        h.update(b"\0");
        h.update(self.architecture.as_bytes());
        h.update(b"\0");
        for l in &self.layers {
            h.update(l.diff_id.as_bytes());
            h.update(b"\0");
        }
        h.update(&self.config.canonical());
        h.finish()
    }

    /// Add what a step produced.
    pub fn apply(
        &mut self,
        layer: Option<LayerRef>,
        config: RunConfig,
        history: HistoryEntry,
        created: String,
    ) {
        if let Some(l) = layer {
            self.layers.push(l);
        }
        self.config = config;
        self.history.push((history, created));
    }

    /// When the newest step of this image was made, as its history records it (all written by
    /// `store::time::rfc3339`, so they order as strings): the image's own creation time, so a
    /// rebuild where every step hits gives the same config, byte for byte.
    pub fn newest_step_time(&self) -> Option<&str> {
        self.history.iter().map(|(_, t)| t.as_str()).max()
    }

    /// The image config document, as the store will hash it.
    pub fn config_bytes(&self, created: &str) -> Result<Vec<u8>> {
        let c = &self.config;
        let mut cb = ConfigBuilder::default().env(c.env.clone());
        if let Some(cmd) = &c.cmd {
            cb = cb.cmd(cmd.clone());
        }
        if let Some(ep) = &c.entrypoint {
            cb = cb.entrypoint(ep.clone());
        }
        if !c.working_dir.is_empty() {
            cb = cb.working_dir(c.working_dir.clone());
        }
        if !c.user.is_empty() {
            cb = cb.user(c.user.clone());
        }
        if !c.labels.is_empty() {
            cb = cb.labels(
                c.labels
                    .clone()
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
        }
        if !c.exposed_ports.is_empty() {
            cb = cb.exposed_ports(c.exposed_ports.iter().cloned().collect::<Vec<_>>());
        }
        if !c.volumes.is_empty() {
            cb = cb.volumes(c.volumes.iter().cloned().collect::<Vec<_>>());
        }
        if let Some(s) = &c.stop_signal {
            cb = cb.stop_signal(s.clone());
        }
        let config = cb
            .build()
            .map_err(|e| Error::invalid(format!("image config: {e}")))?;
        let mut history = Vec::new();
        for (h, when) in &self.history {
            let mut hb = HistoryBuilder::default()
                .created(when.clone())
                .created_by(h.created_by.clone());
            if let Some(cm) = &h.comment {
                hb = hb.comment(cm.clone());
            }
            if h.empty_layer {
                hb = hb.empty_layer(true);
            }
            history.push(
                hb.build()
                    .map_err(|e| Error::invalid(format!("image history: {e}")))?,
            );
        }
        let rootfs = RootFsBuilder::default()
            .typ("layers")
            .diff_ids(
                self.layers
                    .iter()
                    .map(|l| l.diff_id.clone())
                    .collect::<Vec<_>>(),
            )
            .build()
            .map_err(|e| Error::invalid(format!("image rootfs: {e}")))?;
        let mut ib = ImageConfigurationBuilder::default()
            .created(created.to_string())
            .architecture(Arch::from(self.architecture.as_str()))
            .os(Os::from(self.os.as_str()))
            .config(config)
            .rootfs(rootfs)
            .history(history);
        if let Some(v) = &self.variant {
            ib = ib.variant(v.clone());
        }
        if let Some(a) = &c.author {
            ib = ib.author(a.clone());
        }
        let image: ImageConfiguration = ib
            .build()
            .map_err(|e| Error::invalid(format!("image config: {e}")))?;
        let mut doc = serde_json::to_value(&image)
            .map_err(|e| Error::invalid(format!("image config: {e}")))?;
        // The base image's history comes first, verbatim (oci-spec would drop unknown fields).
        if let Some(h) = doc.get_mut("history").and_then(Value::as_array_mut) {
            let mine = std::mem::take(h);
            h.extend(self.base_history.iter().cloned());
            h.extend(mine);
        }
        if let Some(cfg) = doc.get_mut("config").and_then(Value::as_object_mut) {
            if let Some(hc) = &c.healthcheck {
                cfg.insert("Healthcheck".into(), hc.clone());
            }
            if !c.onbuild.is_empty() {
                cfg.insert("OnBuild".into(), json!(c.onbuild));
            }
            if let Some(sh) = &c.shell {
                cfg.insert("Shell".into(), json!(sh));
            }
        }
        Ok(crate::store::model::to_bytes(&doc))
    }

    /// Layer descriptors for the manifest.
    pub fn manifest_layers(&self) -> Vec<Descriptor> {
        self.layers.iter().map(|l| l.blob.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_set_replaces_in_place() {
        let mut c = RunConfig {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            ..RunConfig::default()
        };
        c.env_set("PATH", "/usr/bin");
        c.env_set("B", "x=y");
        assert_eq!(c.env, ["PATH=/usr/bin", "A=1", "B=x=y"]);
        assert_eq!(c.env_get("B"), Some("x=y"));
        assert_eq!(c.env_get("C"), None);
    }

    #[test]
    fn state_digest_ignores_history_but_not_config() {
        let mut a = ImageState::scratch();
        let b = a.clone();
        a.history.push((HistoryEntry::default(), "t".into()));
        assert_eq!(a.state_digest(), b.state_digest());
        a.config.cmd = Some(vec!["sh".into()]);
        assert_ne!(a.state_digest(), b.state_digest());
    }

    #[test]
    fn config_round_trips_docker_fields() {
        let mut s = ImageState::scratch();
        s.config.labels.insert("b".into(), "2".into());
        s.config.labels.insert("a".into(), "1".into());
        s.config.healthcheck = Some(json!({"Test": ["CMD", "true"]}));
        s.config.onbuild = vec!["RUN true".into()];
        s.config.exposed_ports.insert("80/tcp".into());
        let bytes = s.config_bytes("2024-01-01T00:00:00Z").unwrap();
        // Same inputs, same bytes (labels are a hash map inside oci-spec).
        assert_eq!(bytes, s.config_bytes("2024-01-01T00:00:00Z").unwrap());
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let back = RunConfig::from_image_config(&v);
        assert_eq!(back.labels, s.config.labels);
        assert_eq!(back.healthcheck, s.config.healthcheck);
        assert_eq!(back.onbuild, s.config.onbuild);
        assert_eq!(back.exposed_ports, s.config.exposed_ports);
        assert_eq!(back.env, s.config.env);
    }
}
