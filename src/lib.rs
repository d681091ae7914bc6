//! acnet-onnx: fuse structurally re-parameterised CNN blocks (ACNet, RepVGG, ...) in ONNX
//! models into the plain convolutions they are equivalent to, and prove the equivalence.

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub mod bench;
pub mod cli;
pub mod error;
pub mod fuse;
pub mod graph;
pub mod io;
pub mod kernel;
pub mod passes;
mod sink;
pub mod tensor;
pub mod verify;

pub use error::{Error, Result};
pub use io::{DataMode, Model};
