//! Saving: a model is written into a staging folder beside the target, read back, flushed to
//! disk (in the background, while the caller may check the staged files: [`Staged::commit`]
//! waits for it), and only then renamed into place. Tensors the rewrite left untouched are copied
//! file to file ([`super::sink`]).

use super::external::{is_external, kv};
use super::sink::{write_all, Sink};
use super::walk::for_each_tensor_mut;
use super::{Model, PROTOBUF_LIMIT};
use crate::error::{Error, Result};
use crate::proto::tensor_proto::DataLocation;
use bytes::Bytes;
use prost::Message;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

/// Tensors of at least this many bytes go to the external data file when saving externally.
pub const EXTERNAL_THRESHOLD: usize = 1024;

/// How to store weights when saving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataMode {
    /// External if the model came with external data or would pass protobuf's 2 GiB limit.
    #[default]
    Auto,
    Inline,
    External,
}

/// The files a save wrote.
#[derive(Clone, Debug)]
pub struct Saved {
    pub model: PathBuf,
    pub data: Option<PathBuf>,
}

/// A save written into a staging folder beside the target, not yet moved into place: its files
/// can be read; they are being flushed to disk in the background. Dropping it without
/// [`Staged::commit`] removes everything it wrote.
pub struct Staged {
    dir: PathBuf,
    name: std::ffi::OsString,
    data_name: Option<String>,
    target_dir: PathBuf,
    committed: bool,
    /// the flushes of the files written, each on its own thread
    flushes: Vec<Flush>,
}

/// A written file being flushed to disk (`fsync`) on a thread of its own.
struct Flush {
    path: PathBuf,
    done: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Flush {
    fn wait(self) -> Result<()> {
        match self.done.join() {
            Ok(r) => r.map_err(|e| Error::io(&self.path, e)),
            Err(_) => Err(Error::io(&self.path, "flushing the file to disk failed")),
        }
    }
}

impl Staged {
    /// The staged model file (its external data sits beside it), e.g. for verification.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Move the staged files into place, once they are on disk. With external data, the data
    /// file first, then the model. Without, the model first, then a stale `<model>.data` left by
    /// an earlier run is removed (in that order, an interruption never leaves a model whose data
    /// file is gone).
    pub fn commit(mut self) -> Result<Saved> {
        for f in std::mem::take(&mut self.flushes) {
            f.wait()?;
        }
        let target = self.target_dir.join(&self.name);
        let mut stale = target.clone().into_os_string();
        stale.push(".data");
        let stale = PathBuf::from(stale);
        let data = match &self.data_name {
            Some(d) => {
                let to = self.target_dir.join(d);
                std::fs::rename(self.dir.join(d), &to).map_err(|e| Error::io(&to, e))?;
                Some(to)
            }
            None => None,
        };
        std::fs::rename(self.model_path(), &target).map_err(|e| Error::io(&target, e))?;
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.dir);
        if data.is_none() {
            // only a file (or a link) is a stale data file; a folder of that name is not ours
            if std::fs::symlink_metadata(&stale).is_ok_and(|m| !m.is_dir()) {
                std::fs::remove_file(&stale)
                    .map_err(|e| Error::io(&stale, format!("cannot remove the stale data file: {e}")))?;
            }
        }
        if let Ok(d) = File::open(&self.target_dir) {
            let _ = d.sync_all();
        }
        Ok(Saved { model: target, data })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Write the file at `path` with `f`, then start flushing it to disk.
fn write_flushed(path: &Path, f: impl FnOnce(&File) -> std::io::Result<()>) -> Result<Flush> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    f(&file).map_err(|e| Error::io(path, e))?;
    let done = std::thread::Builder::new()
        .name("acnet-onnx-flush".into())
        .spawn(move || file.sync_all())
        .map_err(|e| Error::io(path, format!("cannot start flushing the file: {e}")))?;
    Ok(Flush { path: path.to_path_buf(), done })
}

/// Stage a save of `model` to `path` (see [`Staged`]): written into a staging folder beside the
/// target and read back (decoded, external data checked) before it is handed out; flushed to disk
/// in the background meanwhile ([`Staged::commit`] waits for that).
pub fn stage(model: &Model, path: &Path, mode: DataMode) -> Result<Staged> {
    let name = path.file_name().ok_or_else(|| Error::Usage(format!("{}: not a file name", path.display())))?.to_owned();
    let target_dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !target_dir.is_dir() {
        return Err(Error::io(path, format!("cannot write: no folder {}", target_dir.display())));
    }
    if path.is_dir() {
        return Err(Error::io(path, "cannot write: is a folder"));
    }
    let external = match mode {
        DataMode::Inline => false,
        DataMode::External => true,
        DataMode::Auto => model.has_external_data() || model.proto.encoded_len() > PROTOBUF_LIMIT,
    };
    let dir = target_dir.join(format!("{STAGING_PREFIX}{}-{}", owner(), unique()));
    std::fs::create_dir(&dir).map_err(|e| Error::io(path, format!("cannot write in {}: {e}", target_dir.display())))?;
    let mut staged = Staged { dir, name, data_name: None, target_dir, committed: false, flushes: vec![] };
    let model_file = staged.model_path();

    if !external {
        let proto = if model.has_external_data() {
            std::borrow::Cow::Owned(model.to_inline()?)
        } else {
            std::borrow::Cow::Borrowed(&model.proto)
        };
        let len = proto.encoded_len();
        if len > PROTOBUF_LIMIT {
            return Err(Error::Usage(format!(
                "{}: the model is {len} bytes inline, over protobuf's 2 GiB limit; save with external data",
                path.display()
            )));
        }
        // streamed: the encoding is never held in memory, untouched tensors go file to file
        staged.flushes.push(write_flushed(&model_file, |file| {
            let mut sink = Sink::new(file, model.sources());
            proto.encode(&mut sink).map_err(std::io::Error::other)?;
            sink.finish()
        })?);
    } else {
        let data_name = format!("{}.data", staged.name.to_string_lossy());
        let data_file = staged.dir.join(&data_name);
        let mut proto = model.proto.clone();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut offset = 0usize;
        for_each_tensor_mut(&mut proto, &mut |t| {
            let raw = match model.raw_bytes(t)? {
                Some(r) if is_external(t) || r.len() >= EXTERNAL_THRESHOLD => r,
                _ => return Ok(()),
            };
            t.raw_data = None;
            t.data_location = Some(DataLocation::External as i32);
            t.external_data = vec![
                kv("location", &data_name),
                kv("offset", &offset.to_string()),
                kv("length", &raw.len().to_string()),
            ];
            offset += raw.len();
            chunks.push(raw);
            Ok(())
        })?;
        staged.flushes.push(write_flushed(&data_file, |file| write_all(file, model.sources(), &chunks))?);
        staged.data_name = Some(data_name);
        let buf = proto.encode_to_vec();
        if buf.len() > PROTOBUF_LIMIT {
            return Err(Error::Usage(format!(
                "{}: the model's graph alone is {} bytes, over protobuf's 2 GiB limit",
                path.display(),
                buf.len()
            )));
        }
        staged.flushes.push(write_flushed(&model_file, |mut file| file.write_all(&buf))?);
    }
    // read back what was written: a save that cannot be loaded is never moved into place
    Model::load(&model_file).map_err(|e| Error::io(path, format!("the staged model does not read back: {e}")))?;
    Ok(staged)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (t << 16) ^ N.fetch_add(1, Ordering::Relaxed)
}

/// What the name of every staging folder starts with; then `<host>-<pid>-<start>-<n>` (see
/// [`owner`]).
const STAGING_PREFIX: &str = ".acnet-onnx-";
/// What the name of every temporary folder of a check starts with; then as a staging folder.
const CHECK_PREFIX: &str = ".acnet-onnx-check-";

/// This process as the names of its folders say it, `<host>-<pid>-<start>`: the host name, the
/// process id and the process's start time in clock ticks since boot (0 where there is no
/// `/proc`), so that a later run can tell whether the process that made a folder still runs.
fn owner() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| {
        let pid = std::process::id();
        format!("{}-{pid}-{}", host(), start_ticks(pid).unwrap_or(0))
    })
}

/// The host's name (`/proc/sys/kernel/hostname`), as it can stand in a file name.
fn host() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' })
        .collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`);
/// `None` when there is no such process (or no `/proc`).
fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Process `pid`'s state (`R`, `S`, ..., `Z` for a zombie) and start time in clock ticks since
/// boot, from `/proc/<pid>/stat` (fields 3 and 22).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // field 2, the command, is in parentheses and may hold anything: count from the last ')'
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

/// The maker of a folder named `<prefix><host>-<pid>-<start>-<n>`: (host, pid, start).
fn folder_owner<'a>(name: &'a str, prefix: &str) -> Option<(&'a str, u32, u64)> {
    let mut parts = name.strip_prefix(prefix)?.rsplitn(4, '-');
    parts.next()?.parse::<u64>().ok()?;
    let start = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    Some((parts.next()?, pid, start))
}

/// Whether the process that made a folder (`pid`, started at `start`) is gone: no process with
/// that pid, one that started at another time (the pid was reused), or one that has ended and
/// not been waited for (a zombie). `false` when it cannot be told (no `/proc`, or a start time
/// that was not known).
fn gone(pid: u32, start: u64) -> bool {
    if start == 0 || start_ticks(std::process::id()).is_none() {
        return false;
    }
    match proc_stat(pid) {
        Some((state, s)) => s != start || matches!(state, 'Z' | 'X'),
        None => !Path::new("/proc").join(pid.to_string()).exists(),
    }
}

/// Remove the folders named `<prefix><host>-<pid>-<start>-<n>` in `dir` that runs killed
/// outright left behind: made on this host, by a process that is gone, and last changed before
/// `since`. A folder of a live process, of another host, or whose name does not say all of this
/// is never touched. Returns the names of the folders removed.
fn remove_stale(dir: &Path, prefix: &str, since: SystemTime) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let this_host = host();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((h, pid, start)) = folder_owner(name, prefix) else { continue };
        if h != this_host || !gone(pid, start) {
            continue;
        }
        let path = e.path();
        let old = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.modified().is_ok_and(|t| t < since));
        if old && std::fs::remove_dir_all(&path).is_ok() {
            removed.push(name.to_string());
        }
    }
    removed.sort();
    removed
}

/// Remove the staging folders beside `path` (a model about to be saved) that runs killed
/// outright (SIGKILL: a CI job's timeout) left behind, each as large as the model: made on this
/// host by a process that no longer runs, and older than `since` (when this run started).
/// Returns their names.
pub fn remove_stale_staging(path: &Path, since: SystemTime) -> Vec<String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    remove_stale(dir, STAGING_PREFIX, since)
}

/// Save `model` to `path` atomically (staged, then renamed).
pub fn save(model: &Model, path: &Path, mode: DataMode) -> Result<Saved> {
    stage(model, path, mode)?.commit()
}

/// A model written to a private temporary folder, removed when dropped: how a model edited in
/// memory is handed to tract, which reads files.
pub(crate) struct TempModel {
    dir: PathBuf,
    pub path: PathBuf,
}

impl TempModel {
    /// Write `model` as `<temp folder>/<name>` (with external data when it came with some).
    pub fn write(model: &Model, name: &std::ffi::OsStr) -> Result<TempModel> {
        let temp = std::env::temp_dir();
        // the folders of checks that were killed are removed first (each holds a model)
        remove_stale(&temp, CHECK_PREFIX, SystemTime::now());
        let dir = temp.join(format!("{CHECK_PREFIX}{}-{}", owner(), unique()));
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = TempModel { path: dir.join(name), dir };
        save(model, &tmp.path, DataMode::Auto)?;
        Ok(tmp)
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_folder_name_says_host_pid_and_start() {
        let p = STAGING_PREFIX;
        assert_eq!(folder_owner(".acnet-onnx-ci-runner-7-4711-123456-99", p), Some(("ci-runner-7", 4711, 123456)));
        assert_eq!(folder_owner(".acnet-onnx-check-vm-1-2-3", CHECK_PREFIX), Some(("vm", 1, 2)));
        // an older version's names, and what is not ours
        for name in [".acnet-onnx-4711-99", ".acnet-onnx-check-4711-99", ".acnet-onnx-vm-x-2-3", "acnet-onnx-vm-1-2-3"]
        {
            assert_eq!(folder_owner(name, p), None, "{name}");
        }
        // this process's own folders name it, and it is not gone
        let mine = format!("{p}{}-0", owner());
        let (host, pid, start) = folder_owner(&mine, p).unwrap();
        assert_eq!((host, pid), (super::host().as_str(), std::process::id()));
        assert!(start > 0 && !gone(pid, start));
        assert!(gone(pid, start + 1), "a pid that another process started with is gone");
    }

    /// A folder of a process that is gone is removed only when it is older than the run.
    #[test]
    fn a_folder_newer_than_the_run_is_left() {
        let d = tempfile::tempdir().unwrap();
        let mine = start_ticks(std::process::id()).unwrap();
        let name = format!("{STAGING_PREFIX}{}-{}-{}-0", host(), std::process::id(), mine + 1);
        std::fs::create_dir(d.path().join(&name)).unwrap();
        let made = std::fs::metadata(d.path().join(&name)).unwrap().modified().unwrap();
        assert!(remove_stale(d.path(), STAGING_PREFIX, made - Duration::from_secs(1)).is_empty());
        assert!(d.path().join(&name).is_dir());
        assert_eq!(remove_stale(d.path(), STAGING_PREFIX, made + Duration::from_secs(1)), vec![name.clone()]);
        assert!(!d.path().join(&name).exists());
    }
}
