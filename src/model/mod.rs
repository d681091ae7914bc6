//! Loading and saving ONNX models, with their external data.
//!
//! A model is decoded straight from a memory map: `raw_data` fields are `bytes::Bytes` slices of
//! the map, so weights are never copied on load. External data is resolved against the model's
//! folder and memory-mapped too ([`external`]). Saving ([`save`]) streams into a staging folder
//! beside the target, then renames, so an interrupted or failed save never leaves a half-written
//! model.

pub(crate) mod external;
pub(crate) mod save;
pub(crate) mod sink;
pub mod tensor;
pub mod transform;
pub(crate) mod walk;

use crate::error::{Error, Result};
use crate::proto::{GraphProto, ModelProto, TensorProto};
use bytes::Bytes;
use external::{is_external, ExternalFiles};
use prost::Message;
use sink::Source;
use std::fs::File;
use std::path::{Path, PathBuf};
use tensor::{checked_numel, dtype_name, raw_len, typed_len};
use walk::{for_each_tensor, for_each_tensor_mut};

/// Protobuf's hard limit on a message: a model whose inline encoding would pass it must be
/// saved with external data.
pub const PROTOBUF_LIMIT: usize = (1usize << 31) - 1;

/// A decoded model plus what is needed to read its weights. It always has a graph.
#[derive(Clone, Debug)]
pub struct Model {
    pub proto: ModelProto,
    /// The file it was loaded from, if any.
    pub path: Option<PathBuf>,
    /// Memory maps of the external data files.
    external: ExternalFiles,
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
    Ok((map.clone(), Some(Source { map, file: std::sync::Arc::new(file), path: path.to_path_buf() })))
}

/// What makes a `ModelProto` a model: a graph, an ir_version, an opset import.
fn check_envelope(proto: &ModelProto, path: &Path) -> Result<()> {
    if proto.graph.is_none() {
        return Err(Error::format(path, "not an ONNX model: no graph"));
    }
    if proto.ir_version.is_none() {
        return Err(Error::format(path, "not an ONNX model (or a truncated one): no ir_version"));
    }
    if proto.opset_import.is_empty() {
        return Err(Error::format(path, "not an ONNX model (or a truncated one): no opset_import"));
    }
    Ok(())
}

impl Model {
    /// Wrap a model built in memory (no file behind it). It must have a graph.
    pub fn from_proto(proto: ModelProto) -> Result<Model> {
        if proto.graph.is_none() {
            return Err(Error::Invalid("not an ONNX model: no graph".into()));
        }
        Ok(Model { proto, path: None, external: ExternalFiles::default(), sources: Vec::new() })
    }

    /// Load a model from a file, memory-mapped; resolve and check its external data.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let (bytes, source) = map_file(path, true)?;
        let mut model = Self::decode(bytes, path)?;
        model.sources.extend(source);
        Ok(model)
    }

    /// Decode a model from bytes; `path` names the file (and its folder holds external data).
    /// Everything that could later make a reader index out of bounds or allocate more than the
    /// input holds is checked here: tensor sizes against dims and data type, external data
    /// references against their files, the inputs of the operators the rules read.
    pub fn decode(bytes: Bytes, path: &Path) -> Result<Model> {
        if bytes.is_empty() {
            return Err(Error::format(path, "empty file, not an ONNX model"));
        }
        let proto = ModelProto::decode(bytes).map_err(|e| {
            Error::format(path, format!("not an ONNX model, or a truncated or damaged one (protobuf: {e})"))
        })?;
        check_envelope(&proto, path)?;
        let opset = crate::graph::default_opset(&proto);
        crate::graph::check_arity(proto.graph.as_ref().expect("checked above"), opset).map_err(|e| match e {
            Error::Invalid(msg) => Error::format(path, msg),
            e => e,
        })?;
        let mut model =
            Model { proto, path: Some(path.to_path_buf()), external: ExternalFiles::default(), sources: Vec::new() };
        let (external, sources) = ExternalFiles::resolve(&model.proto, &model.dir(), &model.display_path())?;
        model.external = external;
        model.sources = sources;
        model.check_tensors()?;
        Ok(model)
    }

    /// The main graph.
    pub fn graph(&self) -> &GraphProto {
        self.proto.graph.as_ref().expect("a Model has a graph: checked when it is made")
    }

    /// The main graph, to edit.
    pub fn graph_mut(&mut self) -> &mut GraphProto {
        self.proto.graph.as_mut().expect("a Model has a graph: checked when it is made")
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

    /// Check every stored tensor's size against its dims and type, so later code can trust them
    /// (and never allocates by a declared size the data does not back).
    fn check_tensors(&self) -> Result<()> {
        let path = self.display_path();
        for_each_tensor(&self.proto, &mut |t| {
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
            return self.external.bytes_of(t, &self.display_path()).map(Some);
        }
        Ok(t.raw_data.clone())
    }

    /// Let go of this process's memory pages of bytes read from the model's files (see
    /// [`sink::release`]); bytes held in memory are left alone.
    pub(crate) fn release(&self, bytes: &Bytes) {
        sink::release(&self.sources, bytes);
    }

    /// The memory-mapped files the model's bytes come from.
    pub(crate) fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Whether any tensor of the model is stored externally.
    pub fn has_external_data(&self) -> bool {
        let mut any = false;
        let _ = for_each_tensor(&self.proto, &mut |t| {
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
        v.extend(self.external.locations().into_iter().map(|l| dir.join(l)));
        v
    }

    /// The model with every large stored weight replaced by a reference to the bytes it already
    /// has in a file (ONNX external data: a location relative to [`Model::dir`], an offset and a
    /// length): inline `raw_data` that is a slice of the model's own file points into that
    /// file; external tensors stay as they are. A reader that resolves external data one tensor
    /// at a time (tract) then copies each weight once, instead of decoding the whole file and
    /// then copying every weight out of it. Only the graph's initializers and the values of
    /// its Constant nodes (what readers resolve as tensors) of at least `min_bytes` bytes are
    /// replaced. `None` when nothing would be.
    pub fn with_file_references(&self, min_bytes: usize) -> Option<ModelProto> {
        use crate::model::external::kv;
        let dir = self.dir();
        let reference = |t: &TensorProto| -> Option<Vec<crate::proto::StringStringEntryProto>> {
            let raw = t.raw_data.as_ref().filter(|r| r.len() >= min_bytes && !is_external(t))?;
            self.sources.iter().find_map(|src| {
                let offset = src.offset_of(raw)?;
                let loc = src.path.strip_prefix(&dir).ok().or_else(|| {
                    // a model loaded as `model.onnx` has the folder "."
                    (dir == Path::new(".")).then_some(src.path.as_path())
                })?;
                let loc = loc.to_str().filter(|l| !l.is_empty())?;
                Some(vec![kv("location", loc), kv("offset", &offset.to_string()), kv("length", &raw.len().to_string())])
            })
        };
        let mut proto = self.proto.clone();
        let mut any = false;
        let mut refer = |t: &mut TensorProto| {
            if let Some(entries) = reference(t) {
                t.raw_data = None;
                t.external_data = entries;
                t.data_location = Some(crate::proto::tensor_proto::DataLocation::External as i32);
                any = true;
            }
        };
        let g = proto.graph.as_mut().expect("a Model has a graph: checked when it is made");
        g.initializer.iter_mut().for_each(&mut refer);
        for n in g.node.iter_mut().filter(|n| n.op_type() == "Constant" && crate::graph::is_default_domain(n)) {
            for a in n.attribute.iter_mut().filter(|a| a.name() == "value") {
                a.t.iter_mut().for_each(&mut refer);
            }
        }
        any.then_some(proto)
    }

    /// The model with every large stored weight — an initializer or a Constant node's value of
    /// at least `min_bytes` bytes, or stored externally — replaced by a scalar zero of its type:
    /// the graph as it is, for a reader that needs its structure only (tract's parser, for a
    /// model's inputs and outputs). Tensors of a type without a fixed size stay.
    pub fn without_weights(&self, min_bytes: usize) -> ModelProto {
        let shrink = |t: &mut TensorProto| {
            let Some(size) = t.data_type.and_then(crate::model::tensor::elem_size) else { return };
            let bytes = t.raw_data.as_ref().map_or(0, |r| r.len());
            let elems = t.dims.iter().try_fold(1i64, |a, &d| a.checked_mul(d.max(0)));
            let stored = elems.map_or(usize::MAX, |n| (n as u128 * size as u128).min(usize::MAX as u128) as usize);
            if is_external(t) || bytes >= min_bytes || stored >= min_bytes {
                let data_type = t.data_type;
                *t = TensorProto {
                    name: t.name.clone(),
                    data_type,
                    raw_data: Some(vec![0u8; size].into()),
                    ..Default::default()
                };
            }
        };
        let mut proto = self.proto.clone();
        let g = proto.graph.as_mut().expect("a Model has a graph: checked when it is made");
        g.initializer.iter_mut().for_each(shrink);
        for n in g.node.iter_mut().filter(|n| n.op_type() == "Constant" && crate::graph::is_default_domain(n)) {
            for a in n.attribute.iter_mut().filter(|a| a.name() == "value") {
                a.t.iter_mut().for_each(shrink);
            }
        }
        proto
    }

    /// The model with every tensor inline: external tensors get their bytes as `raw_data`.
    pub fn to_inline(&self) -> Result<ModelProto> {
        let mut proto = self.proto.clone();
        for_each_tensor_mut(&mut proto, &mut |t| self.inline_tensor(t))?;
        Ok(proto)
    }

    /// Make one tensor inline: an external tensor gets its bytes as `raw_data`.
    pub(crate) fn inline_tensor(&self, t: &mut TensorProto) -> Result<()> {
        if is_external(t) {
            t.raw_data = self.raw_bytes(t)?;
            t.external_data.clear();
            t.data_location = None;
        }
        Ok(())
    }
}
