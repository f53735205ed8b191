//! layerfs: a FUSE union filesystem for container layers that can also turn a container's
//! changes into an OCI layer and commit it.
//!
//! Dependencies flow one way: `cli` -> {`fuse`, `daemon`, `fsck`} -> `union` -> `sys`. Only `sys`
//! contains `unsafe`.

pub mod cli;
pub mod daemon;
pub mod error;
pub mod fsck;
pub mod fuse;
pub mod sys;
pub mod union;
