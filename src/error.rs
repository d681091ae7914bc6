//! The crate's error type: every variant displays as one line that names the file (when there
//! is one) and what is wrong with it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written.
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    /// The file is not a usable ONNX model (not protobuf, no graph, inconsistent tensors ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A problem with an external data file a model refers to.
    #[error("{path}: external data: {msg}")]
    ExternalData { path: PathBuf, msg: String },
    /// A model that is structurally invalid (dangling input, cycle, duplicate names ...).
    #[error("{0}")]
    Invalid(String),
    /// The user asked for something that cannot be done (e.g. `-o` naming the input).
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Error::Io { path: path.into(), msg: e.to_string() }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
}
