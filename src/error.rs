//! The crate's one error type. Every variant displays as one line that names the file (when there
//! is one) and what is wrong with it, and every error means "could not do it": exit code 2 (a
//! check that ran and found a difference is not an error but a report, exit code 1).
//!
//! Names that come from a file (tensor, node, graph names) may hold newlines or other control
//! characters: they are escaped, so a message stays one line whatever the file holds.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// The user asked for something that cannot be done (e.g. `-o` naming the input, bad options).
    #[error("{}", one_line(.0))]
    Usage(String),
    /// tract cannot read the model file.
    #[error("{}", one_line(&format!("cannot load {}: {msg}", path.display())))]
    Load { path: PathBuf, msg: String },
    /// The model uses an ONNX operator (op type) that tract cannot run.
    #[error("{}", one_line(&format!("cannot run {}: tract does not support ONNX operator {op}", path.display())))]
    Unsupported { path: PathBuf, op: String },
    /// The two models of a check differ in their inputs or outputs (names, count, dtypes, fixed dims).
    #[error("{}", one_line(&format!("model signatures differ: {}", .0)))]
    Signature(String),
    /// A bad input specification or input file for a check.
    #[error("{}", one_line(&format!("bad input: {}", .0)))]
    Input(String),
    /// tract failed to type or run the model, or the model holds what tract would crash on.
    #[error("{}", one_line(&format!("running {} failed: {msg}", path.display())))]
    Run { path: PathBuf, msg: String },
    /// tract refused to type or plan one node of the model (an operator it cannot run for these
    /// inputs); `node` is the ONNX node's name (its first output when it has none). The check
    /// cuts both models at such a node when it can (see [`crate::verify`]); the message is
    /// [`Error::Run`]'s.
    #[error("{}", one_line(&format!("running {} failed: {msg}", path.display())))]
    Refused { path: PathBuf, node: String, msg: String },
    /// The equivalence check of `fuse` could not be made (the inner error says why).
    #[error("{0} (pass --no-verify to skip the check)")]
    Check(Box<Error>),
    /// A bug in acnet-onnx (a panic), caught and reported as one line.
    #[error("{}", one_line(.0))]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code of this error: always 2 ("could not do it").
    pub fn exit_code(&self) -> i32 {
        2
    }

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

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Replace the default panic output (a message and maybe a backtrace) by recording the message
/// with its location: [`catch`] reports it as one line instead. Installed by the command line.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = payload_text(info.payload()).unwrap_or_default();
        LAST_PANIC.with(|l| *l.borrow_mut() = Some(format!("{msg}{at}")));
    }));
}

/// The text a panic was raised with, if it was raised with text.
pub(crate) fn payload_text(p: &(dyn std::any::Any + Send)) -> Option<String> {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned())
}

/// A caught panic: the payload's text and the message the hook recorded (with its location).
pub(crate) struct Panic {
    /// The text the panic was raised with (no location).
    pub text: Option<String>,
    /// What [`install_panic_hook`] recorded: the text and where, when the hook is installed.
    pub recorded: Option<String>,
}

impl Panic {
    /// The most informative description: the recorded message, else the payload's text.
    pub fn message(&self) -> String {
        self.recorded.clone().or_else(|| self.text.clone()).unwrap_or_else(|| "panic".into())
    }
}

/// Run `f`, turning a panic into an `Err` (tract panics on some malformed graphs; a panic of our
/// own is a bug, reported as one line by the caller).
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, Panic> {
    LAST_PANIC.with(|l| l.borrow_mut().take());
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| Panic { text: payload_text(&*p), recorded: LAST_PANIC.with(|l| l.borrow_mut().take()) })
}
