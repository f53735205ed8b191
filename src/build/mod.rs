//! `layerfs build`: turning a Containerfile and a build context into an image.
//!
//! - `dockerfile/`: a Dockerfile/Containerfile into stages of typed instructions, environment
//!   replacement, stage references and the predefined ARGs; pure, no I/O;
//! - `ignore`: `.dockerignore`/`.containerignore` rules, matched exactly as Docker does;
//! - `context`: the build context read through directory fds (COPY/ADD source selection,
//!   walks, content digests for the build cache, and why a cache key changed);
//! - `cache`: the build cache in the store; `remote`: the same cache shared through
//!   registries (`--cache-to`, `--cache-from`).

pub mod builder;
pub mod cache;
pub mod context;
pub mod copy;
pub mod dockerfile;
pub mod ignore;
pub mod image;
pub mod key;
pub mod progress;
pub mod remote;
pub mod rootfs;

/// PATH of a container whose image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
