//! The crate's error type: every variant displays as one line that names the file (when there
//! is one) and what is wrong with it. Names that come from a file (tensor, node, graph names)
//! may hold newlines or other control characters: they are escaped, so a message stays one line
//! whatever the file holds.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written.
    #[error("{}", one_line(&format!("{}: {msg}", path.display())))]
    Io { path: PathBuf, msg: String },
    /// The file is not a usable ONNX model (not protobuf, no graph, inconsistent tensors ...).
    #[error("{}", one_line(&format!("{}: {msg}", path.display())))]
    Format { path: PathBuf, msg: String },
    /// A problem with an external data file a model refers to.
    #[error("{}", one_line(&format!("{}: external data: {msg}", path.display())))]
    ExternalData { path: PathBuf, msg: String },
    /// A model that is structurally invalid (dangling input, cycle, duplicate names ...).
    #[error("{}", one_line(.0))]
    Invalid(String),
    /// The user asked for something that cannot be done (e.g. `-o` naming the input).
    #[error("{}", one_line(.0))]
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

/// Longest message [`one_line`] keeps (a name in a damaged file can be megabytes long).
pub const MAX_MESSAGE: usize = 2000;

/// `msg` as one line of bounded length: newlines and tabs become spaces, other control
/// characters are escaped (`\u{1b}`), and anything past [`MAX_MESSAGE`] bytes is cut with `[...]`.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(MAX_MESSAGE + 8));
    for c in msg.chars() {
        if out.len() >= MAX_MESSAGE {
            out.push_str(" [...]");
            break;
        }
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}
