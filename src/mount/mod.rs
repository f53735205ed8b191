//! Serving a mount: everything between `/dev/fuse` (or the io_uring queues) and the union.
//!
//! - `daemon`: fork, mount, serve, signals, unmount;
//! - `fuse`: `impl fuser::Filesystem` over a [`crate::union::Union`], one union call per
//!   request, handles and passthrough;
//! - `uring`: the FUSE-over-io_uring transport, `uring_param`: the fuse module parameter that
//!   lets the kernel offer it, `cpu_pressure`: whether other work competes for the CPUs
//!   (ring threads wait in SCHED_IDLE only when none does); `busypoll`: polling `/dev/fuse`
//!   during bursts;
//! - `workers`: threads for requests that may copy data up; `prefetch`: reading
//!   subdirectories ahead of a tree walk; `heap`: giving freed memory back.
//!
//! Nothing here knows layer formats or the store: those are `union`, `oci` and `store`.

pub mod busypoll;
pub mod cpu_pressure;
pub mod daemon;
pub mod fuse;
pub mod heap;
pub mod prefetch;
pub mod uring;
pub mod uring_param;
pub mod workers;
