//! What a run may write: an output in an existing folder, never a file the run reads (unless
//! asked to work in place), and a report that overwrites nothing the run reads or writes.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A path made absolute with its folder resolved; a file that does not exist yet still has one.
fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let name = p.file_name()?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(name))
}

/// Whether two paths name the same file (existing or not).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (canonical(a), canonical(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// `<path>.data`: where a save of `path` writes its external data, or removes a stale one.
pub(crate) fn data_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".data");
    PathBuf::from(s)
}

/// A file we are asked to write must go to an existing folder and must not be a folder.
pub(crate) fn check_writable(path: &Path, what: &str) -> Result<()> {
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fail = |msg: String| Err(Error::Usage(format!("{}: {msg}", path.display())));
    if path.file_name().is_none() {
        return fail(format!("{what} must name a file"));
    }
    if !parent.is_dir() {
        return fail(format!("cannot write the {what}: no folder {}", parent.display()));
    }
    if path.is_dir() {
        return fail(format!("cannot write the {what}: it is a folder"));
    }
    Ok(())
}

/// The report must not overwrite any file the run reads or writes (`files`: path and what it is).
pub(crate) fn check_report_path(report: &Path, files: &[(&Path, &str)]) -> Result<()> {
    check_writable(report, "report")?;
    for (f, what) in files {
        if same_file(report, f) {
            return Err(Error::Usage(format!(
                "{}: --report names {what}; choose another file for the report",
                report.display()
            )));
        }
    }
    Ok(())
}

/// Write JSON to `path` (through a temporary file renamed into place).
pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("a report serialises");
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, s + "\n").and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Usage(format!("{}: {e}", path.display()))
    })
}
