//! External data: tensors whose bytes live in another file (`data_location = EXTERNAL`, keys
//! `location`, `offset`, `length`), resolved against the model's folder and memory-mapped.

use super::sink::Source;
use super::walk::for_each_tensor;
use crate::error::{Error, Result};
use crate::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto, TensorProto};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Component, Path};

/// Whether a tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

fn entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data.iter().find(|e| e.key() == key).map(|e| e.value())
}

pub(crate) fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(k.to_string()), value: Some(v.to_string()) }
}

/// A `location` must stay inside the model's folder: relative, no `..`, no root or prefix.
fn safe_location(location: &str) -> bool {
    let p = Path::new(location);
    !location.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Where the bytes of an external tensor are: (location, offset, length).
fn external_ref(t: &TensorProto) -> std::result::Result<(String, usize, Option<usize>), String> {
    let loc = entry(t, "location").ok_or("stored externally but no 'location' key")?.to_string();
    let num = |k: &str| -> std::result::Result<Option<usize>, String> {
        entry(t, k)
            .map(|v| v.trim().parse::<usize>().map_err(|_| format!("'{k}' is not a byte count: {v:?}")))
            .transpose()
    };
    Ok((loc, num("offset")?.unwrap_or(0), num("length")?))
}

/// The byte range of an external tensor in a file of `len` bytes, if it fits.
fn ext_range(offset: usize, length: Option<usize>, len: usize) -> Option<std::ops::Range<usize>> {
    let end = match length {
        Some(l) => offset.checked_add(l)?,
        None => len,
    };
    (offset <= end && end <= len).then_some(offset..end)
}

/// The external data files of a model, memory-mapped, by `location`.
#[derive(Clone, Debug, Default)]
pub(crate) struct ExternalFiles {
    files: HashMap<String, Bytes>,
}

impl ExternalFiles {
    /// Map every file the model's external tensors name (relative to `dir`), checking each
    /// reference: a safe location, a readable file, a range inside it. `path` names the model in
    /// errors. The maps are also returned as sources (saving copies from them file to file).
    pub fn resolve(proto: &ModelProto, dir: &Path, path: &Path) -> Result<(ExternalFiles, Vec<Source>)> {
        let mut files: HashMap<String, Bytes> = HashMap::new();
        let mut sources = Vec::new();
        for_each_tensor(proto, &mut |t| {
            if !is_external(t) {
                return Ok(());
            }
            let bad = |msg: String| Error::ExternalData {
                path: path.to_path_buf(),
                msg: format!("tensor '{}': {msg}", t.name()),
            };
            let (loc, offset, length) = external_ref(t).map_err(bad)?;
            if !safe_location(&loc) {
                return Err(bad(format!("location {loc:?} escapes the model's folder; refused as unsafe")));
            }
            if !files.contains_key(&loc) {
                let file = dir.join(&loc);
                // a link may lead anywhere: where it really is must be inside the model's folder too
                // (the hole onnx closed as CVE-2024-27318)
                if let (Ok(real), Ok(root)) = (std::fs::canonicalize(&file), std::fs::canonicalize(dir)) {
                    if !real.starts_with(&root) {
                        return Err(bad(format!(
                            "location {loc:?} resolves outside the model's folder (to {}); refused as unsafe",
                            real.display()
                        )));
                    }
                }
                let (data, source) = super::map_file(&file, false).map_err(|e| match e {
                    Error::Io { msg, .. } => bad(format!("cannot read {}: {msg}", file.display())),
                    e => e,
                })?;
                files.insert(loc.clone(), data);
                sources.extend(source);
            }
            let data = &files[&loc];
            match ext_range(offset, length, data.len()) {
                Some(_) => Ok(()),
                None => Err(bad(format!(
                    "{loc} holds {} bytes, but the tensor is declared at offset {offset}, length {} (the file is shorter than declared)",
                    data.len(),
                    length.map(|l| l.to_string()).unwrap_or_else(|| "(rest of the file)".into())
                ))),
            }
        })?;
        Ok((ExternalFiles { files }, sources))
    }

    /// The bytes of an external tensor. `path` names the model in errors.
    pub fn bytes_of(&self, t: &TensorProto, path: &Path) -> Result<Bytes> {
        let bad =
            |m: String| Error::ExternalData { path: path.to_path_buf(), msg: format!("tensor '{}': {m}", t.name()) };
        let (loc, offset, length) = external_ref(t).map_err(bad)?;
        let data = self.files.get(&loc).ok_or_else(|| bad(format!("{loc} was not loaded")))?;
        let range = ext_range(offset, length, data.len()).ok_or_else(|| {
            bad(format!("{loc} holds {} bytes, tensor wants offset {offset} length {length:?}", data.len()))
        })?;
        Ok(data.slice(range))
    }

    /// The locations, sorted.
    pub fn locations(&self) -> Vec<&String> {
        let mut locs: Vec<&String> = self.files.keys().collect();
        locs.sort();
        locs
    }
}
