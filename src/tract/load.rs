//! Loading a model file into tract (by path: tract resolves external data itself), and what it
//! declares about its inputs.

use super::errors::{chain_msg, panic_msg, summarize};
use crate::error::{catch, Error};
use crate::model::Model;
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::{collections::HashMap, sync::Arc};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, ShapeFactoid};
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

/// A parsed model plus what we need to talk about it.
pub(crate) struct Loaded {
    /// The model's name in messages (the user's file).
    pub(crate) path: PathBuf,
    pub(crate) model: InferenceModel,
    /// Input names, in model order.
    pub(crate) inputs: Vec<String>,
    /// Output names, in model order.
    pub(crate) outputs: Vec<String>,
}

pub(crate) fn load(path: &Path) -> Result<Loaded, Error> {
    let load_err = |msg: String| Error::Load { path: path.to_path_buf(), msg };
    match std::fs::metadata(path) {
        Err(e) => return Err(load_err(summarize(&e.to_string()))),
        Ok(m) if m.is_dir() => return Err(load_err("is a directory, not an ONNX file".into())),
        Ok(_) => {}
    }
    from_parsed(path, catch(|| parse_file(tract_onnx::onnx(), path)))
}

/// What `model` (read from `path`) shows the outside, read without its weights: tract parses a
/// copy whose large tensors are scalars ([`Model::without_weights`]). Parsing analyses nothing,
/// so the inputs, outputs and operators tract reports are those of the whole model. `None` when
/// tract does not take the copy: the caller loads the model itself (for its error).
pub(crate) fn signature_without_weights(model: &Model, path: &Path) -> Option<Signature> {
    use prost::Message;
    let bytes = model.without_weights(REFERENCE_BYTES).encode_to_vec();
    let onnx = tract_onnx::onnx();
    let dir = model.dir().to_str()?.to_string();
    let res = catch(|| {
        let parsed = onnx.proto_model_for_read(&mut bytes.as_slice()).and_then(|pb| onnx.parse(&pb, Some(&dir)))?;
        anyhow::ensure!(parsed.unresolved_inputs.is_empty(), "unresolved inputs");
        Ok(parsed.model)
    });
    from_parsed(path, res).ok()?.signature().ok()
}

/// What `model` (read from `path`) declares about its graph inputs, as tract reads it, and its
/// outputs' names, whatever its nodes are (tract parses a copy without nodes or weights): the
/// signature of a model that holds nodes tract cannot run.
pub(crate) fn declared_signature(model: &Model, path: &Path) -> Result<Signature, Error> {
    use prost::Message;
    let mut proto = model.without_weights(REFERENCE_BYTES);
    let g = proto.graph.as_mut().expect("a Model has a graph");
    g.node.clear();
    g.output.clear();
    g.value_info.clear();
    let outputs: Vec<String> = model.graph().output.iter().map(|o| o.name().to_string()).collect();
    let bytes = proto.encode_to_vec();
    let onnx = tract_onnx::onnx();
    let res = catch(|| {
        onnx.proto_model_for_read(&mut bytes.as_slice()).and_then(|pb| onnx.parse(&pb, None)).map(|p| p.model)
    });
    let mut loaded = from_parsed(path, res)?;
    loaded.outputs = outputs;
    loaded.signature()
}

/// A model tract parsed (or failed to), checked for operators tract cannot run.
fn from_parsed(path: &Path, res: Result<TractResult<InferenceModel>, crate::error::Panic>) -> Result<Loaded, Error> {
    let load_err = |msg: String| Error::Load { path: path.to_path_buf(), msg };
    let model = match res {
        Err(p) => return Err(load_err(panic_msg(p))),
        Ok(Err(e)) => {
            // an op whose builder refused the node (attribute or opset it does not support)
            for c in e.chain() {
                let s = c.to_string();
                if let Some(rest) = s.strip_prefix("Building node ") {
                    if let (Some(open), true) = (rest.rfind('('), rest.ends_with(')')) {
                        let op = rest[open + 1..rest.len() - 1].to_string();
                        if !op.is_empty() {
                            return Err(Error::Unsupported { path: path.to_path_buf(), op });
                        }
                    }
                }
            }
            return Err(load_err(chain_msg(&e)));
        }
        Ok(Ok(m)) => m,
    };
    // operators tract has no implementation for are parsed as UnimplementedOp placeholders
    // (only the nodes the outputs depend on: tract never evaluates the others)
    let order = match catch(|| model.eval_order()) {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(load_err(chain_msg(&e))),
        Err(p) => return Err(load_err(panic_msg(p))),
    };
    let mut missing: Vec<String> = vec![];
    for &id in &order {
        let node = model.node(id);
        if let Some(op) = node.op_as::<UnimplementedOp>() {
            let name = op.name().to_string();
            let name =
                name.strip_prefix("Unimplemented(").and_then(|s| s.strip_suffix(')')).unwrap_or(&name).to_string();
            if !missing.contains(&name) {
                missing.push(name);
            }
        }
    }
    if !missing.is_empty() {
        return Err(Error::Unsupported { path: path.to_path_buf(), op: missing.join(", ") });
    }
    let inputs: Vec<String> = model
        .input_outlets()
        .map_err(|e| load_err(chain_msg(&e)))?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let outputs: Vec<String> = model
        .output_outlets()
        .map_err(|e| load_err(chain_msg(&e)))?
        .iter()
        .map(|o| model.outlet_label(*o).map(|s| s.to_string()).unwrap_or_else(|| model.node(o.node).name.clone()))
        .collect();
    Ok(Loaded { path: path.to_path_buf(), model, inputs, outputs })
}

/// Weights smaller than this stay inline when tract is pointed at the model's file (see
/// [`parse_file`]).
pub(crate) const REFERENCE_BYTES: usize = 4096;

/// tract's model of the ONNX file at `path`, each weight copied once.
///
/// tract's own loader decodes the whole file into its protobuf types (a copy of every weight)
/// and then copies every weight into a tensor, holding both: twice the model at the peak. We
/// decode the file ourselves (a memory map; no copy), hand tract the model with every large
/// weight replaced by an external-data reference to where its bytes already are in the file,
/// and tract copies each one straight into its tensor. A file our loader refuses, or one tract
/// cannot read that way (a model file that is a link to another folder: tract keeps external
/// data inside the model's folder), goes to tract's own loader as it is.
pub(crate) fn parse_file(onnx: tract_onnx::model::Onnx, path: &Path) -> TractResult<InferenceModel> {
    use prost::Message;
    use tract_onnx::tract_hir::prelude::Framework;
    let ours = Model::load(path).ok();
    if let Some(why) = ours.as_ref().and_then(|m| super::safety::grows_too_big(m, super::safety::MAX_TENSOR_ELEMENTS)) {
        anyhow::bail!(why)
    }
    let referenced = ours.and_then(|m| {
        let dir = m.dir().to_str()?.to_string();
        Some((m.with_file_references(REFERENCE_BYTES)?, dir))
    });
    let Some((proto, dir)) = referenced else { return onnx.model_for_path(path) };
    let bytes = proto.encode_to_vec();
    drop(proto);
    let parsed = onnx.proto_model_for_read(&mut bytes.as_slice()).and_then(|pb| {
        drop(bytes);
        onnx.parse(&pb, Some(&dir))
    });
    match parsed {
        Ok(p) if p.unresolved_inputs.is_empty() => Ok(p.model),
        _ => onnx.model_for_path(path),
    }
}

/// What a model declares about one dimension.
#[derive(Clone, Debug)]
pub(crate) enum DeclDim {
    Fixed(usize),
    Symbol(String),
    Unknown,
}

pub(crate) fn decl_dims(shape: &ShapeFactoid) -> Option<Vec<DeclDim>> {
    if shape.is_open() {
        return None;
    }
    Some(
        shape
            .dims()
            .map(|d| match d {
                GenericFactoid::Only(td) => match td.to_i64() {
                    Ok(v) if v >= 0 => DeclDim::Fixed(v as usize),
                    Ok(_) => DeclDim::Unknown,
                    Err(_) => DeclDim::Symbol(td.to_string()),
                },
                GenericFactoid::Any => DeclDim::Unknown,
            })
            .collect(),
    )
}

impl Loaded {
    /// The same model, named `path` in messages.
    pub(crate) fn shown_as(mut self, path: &Path) -> Loaded {
        self.path = path.to_path_buf();
        self
    }

    /// Whether the model computes a tensor of that name (tract can make it an output).
    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.model.find_outlet_label(name).is_some()
    }

    /// What the model shows the outside (see [`Signature`]).
    pub(crate) fn signature(&self) -> Result<Signature, Error> {
        let decls = (0..self.inputs.len())
            .map(|ix| {
                let fact = self
                    .model
                    .input_fact(ix)
                    .map_err(|e| Error::Load { path: self.path.clone(), msg: chain_msg(&e) })?;
                Ok((fact.datum_type.concretize(), decl_dims(&fact.shape)))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Signature { path: self.path.clone(), inputs: self.inputs.clone(), outputs: self.outputs.clone(), decls })
    }
}

/// What a loaded model shows the outside: its input and output names and what it declares about
/// its inputs; small, so that it outlives the model it was read from.
#[derive(Clone, Debug)]
pub(crate) struct Signature {
    /// The model's name in messages (the user's file).
    pub(crate) path: PathBuf,
    /// Input names, in model order.
    pub(crate) inputs: Vec<String>,
    /// Output names, in model order.
    pub(crate) outputs: Vec<String>,
    /// per input: its element type and dims, each `None` when not declared
    decls: Vec<(Option<DatumType>, Option<Vec<DeclDim>>)>,
}

impl Signature {
    /// What the model declares about its input `name`: its element type and dims, each `None`
    /// when not declared.
    pub(crate) fn input_decl(&self, name: &str) -> (Option<DatumType>, Option<Vec<DeclDim>>) {
        let ix = self.inputs.iter().position(|n| n == name).expect("an input of the model");
        self.decls[ix].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::konst::Const;

    /// Every constant of tract's model, by node name.
    fn consts(m: &InferenceModel) -> HashMap<String, Arc<Tensor>> {
        m.nodes().iter().filter_map(|n| n.op_as::<Const>().map(|c| (n.name.clone(), c.val().clone()))).collect()
    }

    #[cfg(unix)]
    #[test]
    fn a_model_file_linked_from_another_folder_loads() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/resnet20/ts_fold.onnx");
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("linked.onnx");
        std::os::unix::fs::symlink(&fixture, &link).unwrap();
        let a = consts(&parse_file(tract_onnx::onnx(), &link).unwrap());
        let b = consts(&tract_onnx::onnx().model_for_path(&fixture).unwrap());
        assert_eq!(a, b);
    }

    /// Every `.onnx` file under `fixtures/`.
    fn fixture_files() -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()) {
                if e.is_dir() {
                    walk(&e, out);
                } else if e.extension().is_some_and(|x| x == "onnx") {
                    out.push(e);
                }
            }
        }
        let mut out = vec![];
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"), &mut out);
        out.sort();
        out
    }

    #[test]
    fn every_fixture_read_without_its_weights_shows_the_signature_of_the_whole_model() {
        let (mut same, mut refused) = (0, 0);
        for path in fixture_files() {
            let Ok(ours) = Model::load(&path) else { continue };
            let quick = signature_without_weights(&ours, &path);
            match load(&path).and_then(|l| l.signature()) {
                Ok(full) => {
                    let quick = quick.unwrap_or_else(|| panic!("{}: no signature without weights", path.display()));
                    assert_eq!(format!("{quick:?}"), format!("{full:?}"), "{}", path.display());
                    same += 1;
                }
                // what the whole model's load refuses, the weightless read does not let through
                // (the check then loads the model, for the same error)
                Err(_) => {
                    assert!(quick.is_none(), "{}: a signature without weights, an error with them", path.display());
                    refused += 1;
                }
            }
        }
        assert!(same > 150, "{same} fixtures compared ({refused} refused)");
    }

    #[test]
    fn weights_read_through_file_references_are_the_weights_tract_reads_itself() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for f in ["resnet20/ts_fold.onnx", "resnet20/dynamo_inline.onnx", "resnet20/dynamo_ext.onnx"] {
            let path = fixtures.join(f);
            let ours = crate::model::Model::load(&path).unwrap();
            if !f.contains("ext") {
                let referenced = ours.with_file_references(REFERENCE_BYTES).expect("large inline weights");
                let n = referenced.graph.as_ref().unwrap().initializer.iter().filter(|t| t.raw_data.is_none()).count();
                assert!(n > 10, "{f}: {n} weights referenced");
            }
            let a = consts(&parse_file(tract_onnx::onnx(), &path).unwrap());
            let b = consts(&tract_onnx::onnx().model_for_path(&path).unwrap());
            assert_eq!(a.len(), b.len(), "{f}");
            for (name, t) in &b {
                assert_eq!(a[name], *t, "{f}: {name}");
            }
        }
    }
}
