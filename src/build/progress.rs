//! What a build tells its user while it runs: one line per step (`CACHED`, or the reason it
//! ran), the step's output live, and how long it took and what it weighed; or, with
//! `--progress json`, one JSON object per event on stdout.
//!
//! Plain output goes to stderr, so stdout carries only the result (the manifest digest).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Json,
    /// Nothing but errors (`-q`).
    Quiet,
}

/// The reporter; cheap to clone (output threads hold one).
#[derive(Clone)]
pub struct Progress {
    mode: Mode,
    /// Serializes lines from the output threads and the builder.
    lock: Arc<Mutex<()>>,
}

/// A step as it starts.
pub struct StepStart<'a> {
    pub stage: &'a str,
    pub number: usize,
    pub total: usize,
    pub text: &'a str,
}

/// A step as it ends.
pub struct StepEnd<'a> {
    pub stage: &'a str,
    pub number: usize,
    pub key: Option<&'a str>,
    pub cached: bool,
    pub reason: Option<&'a str>,
    pub duration: Duration,
    pub layer_size: Option<u64>,
    /// The cache source (`HOST/REPO`) a cached step's entry was pulled from.
    pub cached_from: Option<&'a str>,
}

/// `1.5 MB` style sizes (powers of 1000, as `docker images`).
pub fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        Progress {
            mode,
            lock: Arc::new(Mutex::new(())),
        }
    }

    fn line(&self, text: &str) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.mode {
            Mode::Plain => {
                let _ = writeln!(std::io::stderr().lock(), "{text}");
            }
            Mode::Json => {
                let _ = writeln!(std::io::stdout().lock(), "{text}");
            }
            Mode::Quiet => {}
        }
    }

    fn event(&self, v: serde_json::Value) {
        if self.mode == Mode::Json {
            self.line(&v.to_string());
        }
    }

    /// Free text (plain only): the stage being built, the final result.
    pub fn note(&self, text: &str) {
        if self.mode == Mode::Plain {
            self.line(text);
        }
    }

    /// Something the user should know that does not stop the build (a cache source that is
    /// down, an export that failed): one line on stderr whatever the mode (`warning: ...`),
    /// and with `--progress json` also a `warning` event.
    pub fn warn(&self, text: &str) {
        let text = text.replace('\n', " ");
        {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(std::io::stderr().lock(), "warning: {text}");
        }
        self.event(json!({"event": "warning", "message": text}));
    }

    /// A JSON event (nothing in the other modes).
    pub fn json_event(&self, v: serde_json::Value) {
        self.event(v);
    }

    pub fn step_start(&self, s: &StepStart<'_>) {
        match self.mode {
            Mode::Plain => self.line(&format!(
                "[{} {}/{}] {}",
                s.stage, s.number, s.total, s.text
            )),
            Mode::Json => self.event(json!({
                "event": "step",
                "stage": s.stage,
                "step": s.number,
                "total": s.total,
                "instruction": s.text,
            })),
            Mode::Quiet => {}
        }
    }

    /// Why a step is about to run (plain: before its output).
    pub fn step_runs(&self, stage: &str, number: usize, reason: &str) {
        if self.mode == Mode::Plain {
            self.line(&format!("[{stage} {number}] running: {reason}"));
        }
    }

    pub fn output(&self, stage: &str, number: usize, stderr: bool, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        match self.mode {
            Mode::Plain => self.line(&format!("  | {text}")),
            Mode::Json => self.event(json!({
                "event": "output",
                "stage": stage,
                "step": number,
                "stream": if stderr { "stderr" } else { "stdout" },
                "line": text,
            })),
            Mode::Quiet => {}
        }
    }

    pub fn step_end(&self, e: &StepEnd<'_>) {
        match self.mode {
            Mode::Plain => {
                if e.cached {
                    match e.cached_from {
                        Some(from) => {
                            self.line(&format!("[{} {}] CACHED (from {from})", e.stage, e.number))
                        }
                        None => self.line(&format!("[{} {}] CACHED", e.stage, e.number)),
                    }
                } else {
                    let mut s = format!(
                        "[{} {}] done in {:.2} s",
                        e.stage,
                        e.number,
                        e.duration.as_secs_f64()
                    );
                    if let Some(n) = e.layer_size {
                        s.push_str(&format!(", layer {}", human(n)));
                    }
                    self.line(&s);
                }
            }
            Mode::Json => self.event(json!({
                "event": "end",
                "stage": e.stage,
                "step": e.number,
                "key": e.key,
                "cached": e.cached,
                "reason": e.reason,
                "duration_ms": e.duration.as_millis() as u64,
                "layer_size": e.layer_size,
                "cached_from": e.cached_from,
            })),
            Mode::Quiet => {}
        }
    }

    /// The end of the build.
    pub fn done(
        &self,
        manifest: &str,
        tags: &[String],
        steps: usize,
        cached: usize,
        took: Duration,
    ) {
        match self.mode {
            Mode::Plain => {
                self.line(&format!(
                    "built {} in {:.2} s ({cached} of {steps} steps cached){}",
                    &manifest[..manifest.len().min(19)],
                    took.as_secs_f64(),
                    if tags.is_empty() {
                        String::new()
                    } else {
                        format!(", tagged {}", tags.join(", "))
                    }
                ));
            }
            Mode::Json => self.event(json!({
                "event": "done",
                "manifest": manifest,
                "tags": tags,
                "steps": steps,
                "cached": cached,
                "duration_ms": took.as_millis() as u64,
            })),
            Mode::Quiet => {}
        }
    }
}
