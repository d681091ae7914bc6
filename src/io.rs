//! Loading and saving ONNX models, with their external data.
//!
//! A model is decoded straight from a memory map: `raw_data` fields are `bytes::Bytes` slices of
//! the map, so weights are never copied on load. External data (`data_location = EXTERNAL`,
//! keys `location`, `offset`, `length`) is resolved against the model's folder and memory-mapped
//! too. Saving writes into a staging folder beside the target, then renames, so an interrupted
//! or failed save never leaves a half-written model.

use crate::error::{Error, Result};
use crate::proto::{
    tensor_proto::DataLocation, AttributeProto, GraphProto, ModelProto, SparseTensorProto, StringStringEntryProto, TensorProto,
};
use crate::sink::{Sink, Source};
use crate::tensor::{checked_numel, raw_len, typed_len};
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Protobuf's hard limit on a message: a model whose inline encoding would pass it must be
/// saved with external data.
pub const PROTOBUF_LIMIT: usize = (1usize << 31) - 1;
/// Tensors of at least this many bytes go to the external data file when saving externally.
pub const EXTERNAL_THRESHOLD: usize = 1024;

/// A decoded model plus what is needed to read its weights.
#[derive(Clone, Debug)]
pub struct Model {
    pub proto: ModelProto,
    /// The file it was loaded from, if any.
    pub path: Option<PathBuf>,
    /// Memory maps of the external data files, by `location`.
    external_files: HashMap<String, Bytes>,
    /// The memory-mapped files the model's bytes are slices of (saving copies untouched
    /// tensors from them file to file).
    sources: Vec<Source>,
}

/// Map a file read-only. Directories are refused; so are other non-regular files (pipes,
/// devices) unless `stream` is set, in which case they are read to the end into memory.
/// Returns the bytes and, when they are a map, the map with its open file.
fn map_file(path: &Path, stream: bool) -> Result<(Bytes, Option<Source>)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::io(path, "is a folder, not a file"));
    }
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        if !stream {
            return Err(Error::io(path, "not a regular file"));
        }
        // a model over protobuf's limit is not a model: never read more than that
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, PROTOBUF_LIMIT as u64 + 1), &mut v)
            .map_err(|e| Error::io(path, e))?;
        if v.len() > PROTOBUF_LIMIT {
            return Err(Error::format(path, "more than 2 GiB, over protobuf's limit: not an ONNX model"));
        }
        return Ok((Bytes::from(v), None));
    }
    if meta.len() == 0 {
        return Ok((Bytes::new(), None));
    }
    // SAFETY: the map is read-only; a concurrent writer of the same file is outside what any
    // model loader can defend against (the same holds for onnxruntime and tract).
    let map = Bytes::from_owner(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    Ok((map.clone(), Some(Source { map, file: std::sync::Arc::new(file) })))
}

fn entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data.iter().find(|e| e.key() == key).map(|e| e.value())
}

/// Whether a tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

/// Every tensor stored in a model: the graph's initializers, sparse initializers' parts,
/// tensor attributes of nodes (Constant values and the like), the same in subgraphs, in
/// training-info graphs, and in local functions (their nodes and attribute defaults).
fn for_each_model_tensor<'a>(m: &'a ModelProto, f: &mut dyn FnMut(&'a TensorProto) -> Result<()>) -> Result<()> {
    if let Some(g) = &m.graph {
        for_each_tensor(g, f)?;
    }
    for ti in &m.training_info {
        for g in ti.initialization.iter().chain(&ti.algorithm) {
            for_each_tensor(g, f)?;
        }
    }
    for func in &m.functions {
        for a in &func.attribute_proto {
            attr_tensors(a, f)?;
        }
        for n in &func.node {
            for a in &n.attribute {
                attr_tensors(a, f)?;
            }
        }
    }
    Ok(())
}

fn for_each_model_tensor_mut(m: &mut ModelProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    if let Some(g) = &mut m.graph {
        for_each_tensor_mut(g, f)?;
    }
    for ti in &mut m.training_info {
        for g in ti.initialization.iter_mut().chain(&mut ti.algorithm) {
            for_each_tensor_mut(g, f)?;
        }
    }
    for func in &mut m.functions {
        for a in &mut func.attribute_proto {
            attr_tensors_mut(a, f)?;
        }
        for n in &mut func.node {
            for a in &mut n.attribute {
                attr_tensors_mut(a, f)?;
            }
        }
    }
    Ok(())
}

fn sparse_parts<'a>(s: &'a SparseTensorProto, f: &mut dyn FnMut(&'a TensorProto) -> Result<()>) -> Result<()> {
    for t in s.values.iter().chain(&s.indices) {
        f(t)?;
    }
    Ok(())
}

fn sparse_parts_mut(s: &mut SparseTensorProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    for t in s.values.iter_mut().chain(&mut s.indices) {
        f(t)?;
    }
    Ok(())
}

fn attr_tensors<'a>(a: &'a AttributeProto, f: &mut dyn FnMut(&'a TensorProto) -> Result<()>) -> Result<()> {
    for t in a.t.iter().chain(&a.tensors) {
        f(t)?;
    }
    for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
        sparse_parts(s, f)?;
    }
    for sg in a.g.iter().chain(&a.graphs) {
        for_each_tensor(sg, f)?;
    }
    Ok(())
}

fn attr_tensors_mut(a: &mut AttributeProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    for t in a.t.iter_mut().chain(&mut a.tensors) {
        f(t)?;
    }
    for s in a.sparse_tensor.iter_mut().chain(&mut a.sparse_tensors) {
        sparse_parts_mut(s, f)?;
    }
    for sg in a.g.iter_mut().chain(&mut a.graphs) {
        for_each_tensor_mut(sg, f)?;
    }
    Ok(())
}

/// Every tensor stored in a graph and its subgraphs.
fn for_each_tensor<'a>(g: &'a GraphProto, f: &mut dyn FnMut(&'a TensorProto) -> Result<()>) -> Result<()> {
    for t in &g.initializer {
        f(t)?;
    }
    for s in &g.sparse_initializer {
        sparse_parts(s, f)?;
    }
    for n in &g.node {
        for a in &n.attribute {
            attr_tensors(a, f)?;
        }
    }
    Ok(())
}

fn for_each_tensor_mut(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        sparse_parts_mut(s, f)?;
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            attr_tensors_mut(a, f)?;
        }
    }
    Ok(())
}

/// A `location` must stay inside the model's folder: relative, no `..`, no root or prefix.
fn safe_location(location: &str) -> bool {
    let p = Path::new(location);
    !location.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
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

fn dtype_name(dt: i32) -> String {
    match crate::proto::tensor_proto::DataType::try_from(dt) {
        Ok(d) => d.as_str_name().to_lowercase(),
        Err(_) => format!("data type {dt}"),
    }
}

impl Model {
    /// Wrap a model built in memory (no file behind it).
    pub fn from_proto(proto: ModelProto) -> Model {
        Model { proto, path: None, external_files: HashMap::new(), sources: Vec::new() }
    }

    /// Load a model from a file, memory-mapped; resolve and check its external data.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let (bytes, source) = map_file(path, true)?;
        if bytes.is_empty() {
            return Err(Error::format(path, "empty file, not an ONNX model"));
        }
        let mut model = Self::decode(bytes, path)?;
        model.sources.extend(source);
        Ok(model)
    }

    /// Decode a model from bytes; `path` names the file (and its folder holds external data).
    /// Everything that could later make a reader index out of bounds or allocate more than the
    /// input holds is checked here: tensor sizes against dims and data type, external data
    /// references against their files.
    pub fn decode(bytes: Bytes, path: &Path) -> Result<Model> {
        if bytes.is_empty() {
            return Err(Error::format(path, "empty file, not an ONNX model"));
        }
        let proto = ModelProto::decode(bytes).map_err(|e| {
            Error::format(path, format!("not an ONNX model, or a truncated or damaged one (protobuf: {e})"))
        })?;
        if proto.graph.is_none() {
            return Err(Error::format(path, "not an ONNX model: no graph"));
        }
        if proto.ir_version.is_none() {
            return Err(Error::format(path, "not an ONNX model (or a truncated one): no ir_version"));
        }
        if proto.opset_import.is_empty() {
            return Err(Error::format(path, "not an ONNX model (or a truncated one): no opset_import"));
        }
        let opset = crate::graph::default_opset(&proto);
        crate::graph::check_arity(proto.graph.as_ref().unwrap(), opset).map_err(|e| match e {
            Error::Invalid(msg) => Error::format(path, msg),
            e => e,
        })?;
        let mut model = Model { proto, path: Some(path.to_path_buf()), external_files: HashMap::new(), sources: Vec::new() };
        model.resolve_external()?;
        model.check_tensors()?;
        Ok(model)
    }

    /// The folder external data locations are relative to.
    pub fn dir(&self) -> PathBuf {
        match self.path.as_ref().and_then(|p| p.parent()) {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn display_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| PathBuf::from("<memory>"))
    }

    fn resolve_external(&mut self) -> Result<()> {
        let dir = self.dir();
        let path = self.display_path();
        let mut files: HashMap<String, Bytes> = HashMap::new();
        let mut sources = Vec::new();
        for_each_model_tensor(&self.proto, &mut |t| {
            if !is_external(t) {
                return Ok(());
            }
            let bad = |msg: String| Error::ExternalData { path: path.clone(), msg: format!("tensor '{}': {msg}", t.name()) };
            let (loc, offset, length) = external_ref(t).map_err(bad)?;
            if !safe_location(&loc) {
                return Err(bad(format!("location {loc:?} escapes the model's folder; refused as unsafe")));
            }
            if !files.contains_key(&loc) {
                let file = dir.join(&loc);
                let (data, source) = map_file(&file, false).map_err(|e| match e {
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
        self.external_files = files;
        self.sources.extend(sources);
        Ok(())
    }

    /// Check every stored tensor's size against its dims and type, so later code can trust them
    /// (and never allocates by a declared size the data does not back).
    fn check_tensors(&self) -> Result<()> {
        let path = self.display_path();
        for_each_model_tensor(&self.proto, &mut |t| {
            let bad = |msg: String| Error::format(path.clone(), format!("tensor '{}': {msg}", t.name()));
            let n = checked_numel(&t.dims).map_err(bad)?;
            let dt = t.data_type.unwrap_or(0);
            match self.raw_bytes(t).map_err(|e| bad(e.to_string()))? {
                Some(raw) => {
                    if let Some(want) = raw_len(dt, n).map_err(bad)? {
                        if raw.len() != want {
                            return Err(bad(format!(
                                "{} bytes of data, but dims {:?} of {} need {want}",
                                raw.len(),
                                t.dims,
                                dtype_name(dt)
                            )));
                        }
                    }
                }
                None => {
                    if let Some((field, have, want)) = typed_len(t, n) {
                        if have != want {
                            return Err(bad(format!(
                                "{have} values in {field}, but dims {:?} of {} need {want}",
                                t.dims,
                                dtype_name(dt)
                            )));
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// The raw bytes of a tensor: its `raw_data`, or the slice of its external file; `None`
    /// when the values are in the typed fields (`float_data`, ...).
    pub fn raw_bytes(&self, t: &TensorProto) -> Result<Option<Bytes>> {
        if is_external(t) {
            let bad = |m: String| Error::ExternalData { path: self.display_path(), msg: format!("tensor '{}': {m}", t.name()) };
            let (loc, offset, length) = external_ref(t).map_err(bad)?;
            let data = self.external_files.get(&loc).ok_or_else(|| bad(format!("{loc} was not loaded")))?;
            let range = ext_range(offset, length, data.len())
                .ok_or_else(|| bad(format!("{loc} holds {} bytes, tensor wants offset {offset} length {length:?}", data.len())))?;
            return Ok(Some(data.slice(range)));
        }
        Ok(t.raw_data.clone())
    }

    /// Let go of the memory pages of bytes read from the model's files (see
    /// [`crate::sink::release`]); bytes held in memory are left alone.
    pub(crate) fn release(&self, bytes: &[u8]) {
        crate::sink::release(&self.sources, bytes);
    }

    /// Whether any tensor of the model is stored externally.
    pub fn has_external_data(&self) -> bool {
        let mut any = false;
        let _ = for_each_model_tensor(&self.proto, &mut |t| {
            any |= is_external(t);
            Ok(())
        });
        any
    }

    /// The files the model consists of: its own path (if it has one) and every external data
    /// file it read.
    pub fn files(&self) -> Vec<PathBuf> {
        let dir = self.dir();
        let mut v: Vec<PathBuf> = self.path.iter().cloned().collect();
        let mut locs: Vec<&String> = self.external_files.keys().collect();
        locs.sort();
        v.extend(locs.into_iter().map(|l| dir.join(l)));
        v
    }

    /// The model with every tensor inline: external tensors get their bytes as `raw_data`.
    pub fn to_inline(&self) -> Result<ModelProto> {
        let mut proto = self.proto.clone();
        for_each_model_tensor_mut(&mut proto, &mut |t| {
            if is_external(t) {
                t.raw_data = self.raw_bytes(t)?;
                t.external_data.clear();
                t.data_location = None;
            }
            Ok(())
        })?;
        Ok(proto)
    }
}

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

/// A save written into a staging folder beside the target, not yet moved into place.
/// Dropping it without [`Staged::commit`] removes everything it wrote.
pub struct Staged {
    dir: PathBuf,
    name: std::ffi::OsString,
    data_name: Option<String>,
    target_dir: PathBuf,
    committed: bool,
}

impl Staged {
    /// The staged model file (its external data sits beside it), e.g. for verification.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Move the staged files into place. With external data, the data file first, then the
    /// model. Without, the model first, then a stale `<model>.data` left by an earlier run is
    /// removed (in that order, an interruption never leaves a model whose data file is gone).
    pub fn commit(mut self) -> Result<Saved> {
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
                std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, format!("cannot remove the stale data file: {e}")))?;
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

fn write_synced(path: &Path, f: impl FnOnce(&File) -> std::io::Result<()>) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    f(&file).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Stage a save of `model` to `path` (see [`Staged`]): written into a staging folder beside the
/// target, flushed to disk, and read back (decoded, external data checked) before it is handed out.
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
    let dir = target_dir.join(format!(".acnet-onnx-{}-{}", std::process::id(), unique()));
    std::fs::create_dir(&dir).map_err(|e| Error::io(path, format!("cannot write in {}: {e}", target_dir.display())))?;
    let mut staged = Staged { dir, name, data_name: None, target_dir, committed: false };
    let model_file = staged.model_path();

    if !external {
        let proto = if model.has_external_data() { std::borrow::Cow::Owned(model.to_inline()?) } else { std::borrow::Cow::Borrowed(&model.proto) };
        let len = proto.encoded_len();
        if len > PROTOBUF_LIMIT {
            return Err(Error::Usage(format!(
                "{}: the model is {len} bytes inline, over protobuf's 2 GiB limit; save with external data",
                path.display()
            )));
        }
        // streamed: the encoding is never held in memory, untouched tensors go file to file
        write_synced(&model_file, |file| {
            let mut sink = Sink::new(file, &model.sources);
            proto.encode(&mut sink).map_err(std::io::Error::other)?;
            sink.finish()
        })?;
    } else {
        let data_name = format!("{}.data", staged.name.to_string_lossy());
        let data_file = staged.dir.join(&data_name);
        let mut proto = model.proto.clone();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut offset = 0usize;
        for_each_model_tensor_mut(&mut proto, &mut |t| {
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
        write_synced(&data_file, |file| crate::sink::write_all(file, &model.sources, &chunks))?;
        staged.data_name = Some(data_name);
        let buf = proto.encode_to_vec();
        if buf.len() > PROTOBUF_LIMIT {
            return Err(Error::Usage(format!(
                "{}: the model's graph alone is {} bytes, over protobuf's 2 GiB limit",
                path.display(),
                buf.len()
            )));
        }
        write_synced(&model_file, |mut file| file.write_all(&buf))?;
    }
    // read back what was written: a save that cannot be loaded is never moved into place
    Model::load(&model_file).map_err(|e| Error::io(path, format!("the staged model does not read back: {e}")))?;
    Ok(staged)
}

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(k.to_string()), value: Some(v.to_string()) }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0);
    (t << 16) ^ N.fetch_add(1, Ordering::Relaxed)
}

/// Save `model` to `path` atomically (staged, then renamed).
pub fn save(model: &Model, path: &Path, mode: DataMode) -> Result<Saved> {
    stage(model, path, mode)?.commit()
}
