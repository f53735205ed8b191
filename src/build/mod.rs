//! `layerfs build`: turning a Containerfile and a build context into an image.
//!
//! - `dockerfile/`: a Dockerfile/Containerfile into stages of typed instructions, environment
//!   replacement, stage references and the predefined ARGs; pure, no I/O;
//! - `ignore`: `.dockerignore`/`.containerignore` rules, matched exactly as Docker does;
//! - `context`: the build context read through directory fds (COPY/ADD source selection,
//!   walks, content digests for the build cache, and why a cache key changed).

pub mod context;
pub mod dockerfile;
pub mod ignore;
