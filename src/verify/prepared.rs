//! A model as the check runs it: read with this crate's loader, edited as the options ask, and
//! loaded into tract when its turn comes.

use super::VerifyOptions;
use crate::error::Error;
use crate::model::save::TempModel;
use crate::model::tensor::FloatType;
use crate::model::transform::{eval_mode, freeze_initializers, training_mode, upcast_half};
use crate::model::Model;
use crate::tract::{load, signature_without_weights, Loaded, Signature};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A model as the check runs it: read with this crate's loader, edited as the options ask
/// (inference forms, frozen initializers, float32 upcast), and loaded into tract (from a
/// temporary copy when edited).
pub(crate) struct Prepared {
    pub(crate) model: Model,
    /// tract's model, while it is held (see [`Prepared::tract`] and [`Prepared::let_go`])
    pub(crate) loaded: Option<Loaded>,
    /// the file tract reads (a temporary copy when edited) and the name it has in messages
    file: PathBuf,
    pub(crate) shown: PathBuf,
    /// the weights and the type each is stored in (before any upcast)
    pub(crate) weights: HashMap<String, FloatType>,
    /// the tensors declared (graph inputs and outputs, value_info) in a half-precision type,
    /// when the model runs upcast
    pub(crate) half: HashMap<String, FloatType>,
    _temp: Option<TempModel>,
}

/// Our loader's errors on a file the check reads are load errors, as tract's are.
pub(crate) fn load_error(path: &Path, e: Error) -> Error {
    match e {
        Error::Io { msg, .. } | Error::Format { msg, .. } => Error::Load { path: path.to_path_buf(), msg },
        Error::ExternalData { msg, .. } => {
            Error::Load { path: path.to_path_buf(), msg: format!("external data: {msg}") }
        }
        e => e,
    }
}

pub(crate) fn prepare_model(
    path: &Path,
    opts: &VerifyOptions,
    upcast: bool,
    notes: &mut Vec<String>,
) -> Result<Prepared, Error> {
    let mut model = Model::load(path).map_err(|e| load_error(path, e))?;
    let mut edited = false;
    if opts.eval_bn {
        let n = eval_mode(&mut model).map_err(|m| Error::Usage(format!("{}: {m}", path.display())))?;
        edited |= n > 0;
    } else if let Some(msg) = training_mode(&model) {
        return Err(Error::Usage(format!("{}: {msg}", path.display())));
    }
    if opts.freeze_initializers {
        edited |= freeze_initializers(&mut model) > 0;
    }
    let expanded = crate::tract::compat::expand_einsum_broadcasts(&mut model);
    if !expanded.is_empty() {
        edited = true;
        notes.push(format!(
            "{}: Einsum {} run with their size-1 axes expanded (tract does not broadcast them)",
            path.display(),
            expanded.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
        ));
    }
    let weights = super::noise::weights(&model);
    let mut half = HashMap::new();
    if upcast {
        let g = model.graph();
        for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
            if let Some(crate::proto::type_proto::Value::TensorType(t)) =
                v.r#type.as_ref().and_then(|t| t.value.as_ref())
            {
                if let Some(ft @ (FloatType::F16 | FloatType::BF16)) = t.elem_type.and_then(FloatType::from_onnx) {
                    half.insert(v.name().to_string(), ft);
                }
            }
        }
        model = upcast_half(&model)?;
        edited = true;
        notes.push(
            "half precision is evaluated as the exact float32 upcast of both models (tract cannot run all of it as stored); judged by the noise of the stored precision".into(),
        );
    }
    let temp = if edited {
        let name = path.file_name().unwrap_or(std::ffi::OsStr::new("model.onnx"));
        Some(TempModel::write(&model, name)?)
    } else {
        None
    };
    let file = temp.as_ref().map_or(path.to_path_buf(), |t| t.path.clone());
    Ok(Prepared { model, loaded: None, file, shown: path.to_path_buf(), weights, half, _temp: temp })
}

impl Prepared {
    /// `model`, a part of the prepared model `whole` (see [`super::cut`]), as the check runs it:
    /// from a temporary file, named like `whole` in messages, with the weights of `whole` it
    /// holds.
    pub(crate) fn part(model: Model, whole: &Prepared) -> Result<Prepared, Error> {
        let g = model.graph();
        let mut held: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
        for n in g.node.iter().filter(|n| n.op_type() == "Constant") {
            held.insert(n.name());
            held.extend(n.output.first().map(|o| o.as_str()));
        }
        let weights = whole.weights.iter().filter(|(k, _)| held.contains(k.as_str())).map(|(k, v)| (k.clone(), *v));
        let weights = weights.collect();
        let name = whole.shown.file_name().unwrap_or(std::ffi::OsStr::new("model.onnx"));
        let temp = TempModel::write(&model, name)?;
        Ok(Prepared {
            model,
            loaded: None,
            file: temp.path.clone(),
            shown: whole.shown.clone(),
            weights,
            half: whole.half.clone(),
            _temp: Some(temp),
        })
    }

    /// tract's model, loaded again if it was let go.
    pub(crate) fn tract(&mut self) -> Result<&mut Loaded, Error> {
        if self.loaded.is_none() {
            let loaded = if self.file == self.shown {
                load(&self.file)?
            } else {
                load(&self.file).map_err(|e| shown_as(e, &self.file, &self.shown))?.shown_as(&self.shown)
            };
            self.loaded = Some(loaded);
            give_back();
        }
        Ok(self.loaded.as_mut().expect("loaded above"))
    }

    /// What the model shows the outside: read without its weights when tract takes that (see
    /// [`signature_without_weights`]), else from the model loaded (and let go again).
    pub(crate) fn signature(&mut self) -> Result<Signature, Error> {
        if let Some(l) = &self.loaded {
            return l.signature();
        }
        if let Some(mut s) = signature_without_weights(&self.model, &self.file) {
            s.path = self.shown.clone();
            return Ok(s);
        }
        let s = self.tract()?.signature();
        self.let_go();
        s
    }

    /// Let go of tract's model (its weights) until it is needed again.
    pub(crate) fn let_go(&mut self) {
        self.loaded = None;
        give_back();
    }
}

/// Return the allocator's free memory to the system: the phases of the check free one model's
/// weights before the next is loaded, and what they freed must not stay counted in the
/// process's memory (glibc keeps freed memory of each thread's arena otherwise).
pub(crate) fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the system
    unsafe {
        libc::malloc_trim(0);
    }
}

/// An error about a temporary copy, told about the user's file.
fn shown_as(e: Error, temp: &Path, path: &Path) -> Error {
    let fix = |m: String| m.replace(&temp.display().to_string(), &path.display().to_string());
    match e {
        Error::Load { msg, .. } => Error::Load { path: path.to_path_buf(), msg: fix(msg) },
        Error::Unsupported { op, .. } => Error::Unsupported { path: path.to_path_buf(), op },
        Error::Run { msg, .. } => Error::Run { path: path.to_path_buf(), msg: fix(msg) },
        Error::Refused { node, msg, .. } => Error::Refused { path: path.to_path_buf(), node, msg: fix(msg) },
        e => e,
    }
}
