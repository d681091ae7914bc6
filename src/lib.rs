//! acnet-onnx: fuse structurally re-parameterised CNN blocks (ACNet, RepVGG, ...) in ONNX
//! models into the plain convolutions they are equivalent to, and prove the equivalence.
//!
//! The whole job is one call, [`fuse_file`] (what `acnet-onnx fuse` runs): load, rewrite every
//! block, stage the output, check it against the input in tract, move it into place.
//!
//! ```
//! use acnet_onnx::{fuse_file, FuseOptions};
//! let out = std::env::temp_dir().join(format!("acnet-onnx-doc-{}.onnx", std::process::id()));
//! let report = fuse_file("fixtures/conv2/ts_fold.onnx".as_ref(), &out, &FuseOptions::default())?;
//! assert_eq!(report.fuse.blocks_merged, 3);
//! assert!(report.check.as_ref().is_some_and(|c| c.passed));
//! assert_eq!(report.written.as_ref().map(|s| &s.model), Some(&out));
//! # std::fs::remove_file(&out).unwrap();
//! # Ok::<(), acnet_onnx::Error>(())
//! ```
//!
//! The steps are public too: [`Model::load`], [`fuse`] (in memory), [`stage`] / [`save`] (atomic
//! writes), [`verify()`] (the equivalence check in tract) and [`bench::bench_latency`].
//!
//! Data flows one way through the modules: `model` (load, save) → `graph` (index, constants,
//! names) → `rewrite` (the rules and their driver) → `kernel` (the affine-conv algebra) → `tract`
//! (the only code that builds tract models) → `verify` → `bench` → `pipeline` → `cli`.

// The crate under its own name, so that the graph builder the integration tests share
// (tests/support) also serves the unit tests.
extern crate self as acnet_onnx;

pub mod proto {
    //! The ONNX messages (prost types generated from the vendored `proto/onnx.proto`).
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub mod bench;
pub mod cli;
mod error;
mod graph;
pub mod kernel;
mod model;
mod pipeline;
#[cfg(feature = "python")]
mod python;
mod rewrite;
mod tract;
pub mod verify;

#[cfg(test)]
#[path = "../tests/support/mod.rs"]
pub(crate) mod support;

pub use error::{one_line, Error, Result};
pub use graph::consts::ConstError;
pub use kernel::read::{Form, ReadError};
pub use kernel::Misfit;
pub use model::external::is_external;
pub use model::save::{save, stage, DataMode, Saved, Staged, EXTERNAL_THRESHOLD};
pub use model::{tensor, Model, PROTOBUF_LIMIT};
pub use pipeline::{
    fuse_file, fuse_file_with, inspect_file, verify_files, Event, FuseFileReport, FuseOptions, InitializerInfo,
    InspectReport, VerifyFileOptions,
};
pub use rewrite::{
    fuse, fuse_at, validate, ChainSum, FcMisfit, FuseReport, Reason, Refusal, RegionReason, Rewrite, RuleId, Stats,
};
pub use verify::{verify, VerifyOptions, VerifyReport};

/// glibc's allocator as the command line's process runs it. glibc returns freed memory above
/// 128 KiB (adaptively up to 32 MiB) to the system and trims the heap's top, so every
/// kernel-sized array the rewrite allocates is page-faulted (and zeroed by the kernel) anew;
/// keeping freed memory for reuse makes `fuse` ~15% faster on ImageNet-scale models without
/// raising its peak (measured in benches/perf/). With `one_arena` (a process that is the
/// command line's alone, before any other thread exists), every thread shares one arena: the
/// check's threads (samples, tract's matrix products, rayon) would each keep freed memory in an
/// arena of their own, which the check's phases (one model's weights at a time, free memory
/// returned between them) could not hand back; ~10% lower peak on ResNet-50, no slower.
/// A program using the library that never calls this keeps its allocator as it set it.
#[doc(hidden)]
pub fn tune_allocator(one_arena: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (under the allocator's own lock)
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        if one_arena {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = one_arena;
}
