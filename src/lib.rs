//! acnet-onnx: fuse structurally re-parameterised CNN blocks (ACNet, RepVGG, ...) in ONNX
//! models into the plain convolutions they are equivalent to, and prove the equivalence.
//!
//! The whole job is one call, [`fuse_file`] (what `acnet-onnx fuse` runs):
//!
//! ```no_run
//! use acnet_onnx::{fuse_file, FuseOptions};
//! let report = fuse_file("model.onnx".as_ref(), "deploy.onnx".as_ref(), &FuseOptions::default())?;
//! println!("{}", report.fuse.summary());
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
pub use rewrite::{fuse, validate, FuseReport, Reason, Refusal, RegionReason, Rewrite, RuleId, Stats};
pub use verify::{verify, VerifyOptions, VerifyReport};
