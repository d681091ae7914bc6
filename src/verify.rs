//! Numerical equivalence checker: runs a reference and a candidate ONNX model with tract on
//! identical inputs and compares every output element-wise.
//!
//! Models are loaded **by path** with `tract_onnx::onnx().model_for_path(..)` (so ONNX external
//! data is resolved relative to the model's folder), their input facts are pinned to concrete
//! shapes, and they are turned into *typed but not decluttered / optimised* plans
//! (`into_typed()` then `into_runnable()`). tract's optimiser folds BatchNormalization into
//! convolutions and merges identical siblings; running the optimised graphs could hide the very
//! mistakes this check is meant to find, so it is deliberately not used.
//!
//! # Inputs
//!
//! * Random (default): a `StdRng` (rand 0.9) seeded with [`VerifyOptions::seed`] produces
//!   `samples` input sets; within a sample the inputs are drawn one after the other in the
//!   reference model's input order, elements in row-major order. Floating-point inputs
//!   (f16 / f32 / f64) are standard normal N(0, 1) samples drawn in f64 with the Box-Muller
//!   transform (`sqrt(-2 ln u1) * cos(2 pi u2)`, then `... * sin(2 pi u2)`, with `u1` in (0, 1],
//!   `u2` in [0, 1)) and rounded to the input's dtype. Integer inputs are uniform in `0..=3`
//!   (small, so they stay valid indices for most gathers), booleans are fair coin flips.
//! * Files: `--input name=file.npy` ([`VerifyOptions::input_files`]) and/or `--inputs file.npz`
//!   ([`VerifyOptions::inputs_npz`], arrays named like the graph inputs; arrays that are no graph
//!   input are ignored with a note). When every input comes from a file there is exactly one
//!   sample. A file of another dtype of the same kind (e.g. float64 for a float32 input) is cast,
//!   with a note; a float/integer mismatch is an error.
//!
//! Both models always get bit-identical inputs.
//!
//! # Shapes
//!
//! The inputs' declared dtypes and shapes are taken from the ONNX graphs. A dimension given by
//! `--input-shape` or by an input file wins (a declared fixed dimension that is overridden this
//! way is reported in `notes`); a dimension left symbolic (or unknown) in both models defaults to 1
//! and `notes` says so. Symbols are also substituted in the models' other declared facts
//! (`value_info`).
//!
//! # Comparison
//!
//! Every output (matched by name) is compared in f64, `a` = reference, `b` = candidate. An element
//! passes iff `|a - b| <= atol + rtol * |a|`; an output passes iff all its elements pass, the shapes
//! agree and neither side holds a NaN. Statistics are aggregated over samples (max of maxes, mean
//! of means). Values that are infinite (e.g. `min_rtol` when the reference is 0 where the
//! difference exceeds `atol`) serialise to JSON `null`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, ShapeFactoid};
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

/// The denominator floor of relative differences: `|a - b| / max(|a|, TINY)`
/// (the smallest positive normal f32, numpy's `finfo(float32).tiny`).
pub const REL_TINY: f64 = f32::MIN_POSITIVE as f64;

/// Longest error message kept (in characters); errors always display on one line.
const MAX_MSG: usize = 600;

/// One resolved model input: what was fed, and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputSpec {
    /// Graph input name.
    pub name: String,
    /// Concrete shape fed to both models.
    pub shape: Vec<usize>,
    /// Element type, numpy spelling (`float32`, `int64`, ...).
    pub dtype: String,
    /// `random normal (seed S)`, `random integers 0..=3 (seed S)`, `file <path>`,
    /// `npz <path>[<array>]`.
    pub source: String,
}

/// Options of [`verify_paths`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyOptions {
    /// Seed of the random inputs (default 0).
    pub seed: u64,
    /// Number of random input sets (default 3); one when every input comes from a file.
    pub samples: usize,
    /// Absolute tolerance (default 1e-4).
    pub atol: f64,
    /// Relative tolerance, relative to the reference value (default 1e-4).
    pub rtol: f64,
    /// `--input-shape name:1,3,224,224`: concrete shapes of inputs.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// `--input name=file.npy`: real input data.
    pub input_files: Vec<(String, PathBuf)>,
    /// `--inputs file.npz`: real input data, arrays named like the graph inputs.
    pub inputs_npz: Option<PathBuf>,
    /// Print `verify: ...` progress lines on stderr once the check has run for more than 1 s.
    pub progress: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            seed: 0,
            samples: 3,
            atol: 1e-4,
            rtol: 1e-4,
            input_shapes: vec![],
            input_files: vec![],
            inputs_npz: None,
            progress: false,
        }
    }
}

/// Comparison of one output, aggregated over all samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputReport {
    /// Graph output name.
    pub name: String,
    /// Shape of the reference output (of the last sample).
    pub shape: Vec<usize>,
    /// Reference output dtype (numpy spelling).
    pub dtype: String,
    /// max |a - b| over all elements and samples (NaN elements excluded).
    pub max_abs_diff: f64,
    /// max |a - b| / max(|a|, [`REL_TINY`]).
    pub max_rel_diff: f64,
    /// Mean over samples of the mean |a - b|.
    pub mean_abs_diff: f64,
    /// Multi-index of the element with the largest |a - b|.
    pub worst_index: Vec<usize>,
    /// Sample (0-based) holding that element.
    pub worst_sample: usize,
    /// Reference and candidate values at the worst element.
    pub worst_reference: f64,
    pub worst_candidate: f64,
    /// max |a| (magnitude of the reference output).
    pub max_abs_reference: f64,
    /// Smallest atol that passes with rtol = 0 (= `max_abs_diff`).
    pub min_atol: f64,
    /// Smallest rtol that passes with the run's atol (0 if atol alone passes; infinite if
    /// some failing element has a zero reference).
    pub min_rtol: f64,
    /// Number of NaN elements in the reference / candidate outputs (all samples).
    pub nan_reference: usize,
    pub nan_candidate: usize,
    /// Number of elements failing `|a - b| <= atol + rtol * |a|` (all samples).
    pub failing_elements: usize,
    /// Why the output cannot pass independently of tolerances (NaN, shape mismatch), if so.
    pub problem: Option<String>,
    pub passed: bool,
}

/// Result of [`verify_paths`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub passed: bool,
    pub atol: f64,
    pub rtol: f64,
    /// Number of input sets actually run.
    pub samples: usize,
    pub seed: u64,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputReport>,
    pub notes: Vec<String>,
    /// Path of the reference model.
    pub reference: String,
    /// Path of the candidate model.
    pub candidate: String,
}

/// Why a check could not be done. All of these mean "could not check" (exit code 2); a check
/// that ran and found a difference is a [`VerifyReport`] with `passed == false` (exit code 1).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    /// The model file cannot be read or parsed.
    #[error("cannot load {}: {msg}", path.display())]
    Load { path: PathBuf, msg: String },
    /// The model uses an ONNX operator (op type) that tract cannot run.
    #[error("cannot run {}: tract does not support ONNX operator {op}", path.display())]
    Unsupported { path: PathBuf, op: String },
    /// The two models' inputs/outputs differ (names, count, dtypes, fixed dims).
    #[error("model signatures differ: {0}")]
    Signature(String),
    /// Bad input specification or file.
    #[error("bad input: {0}")]
    Input(String),
    /// tract failed to type-check or run the model.
    #[error("running {} failed: {msg}", path.display())]
    Run { path: PathBuf, msg: String },
}

impl VerifyError {
    /// Process exit code for this error: always 2 ("could not check").
    pub fn exit_code(&self) -> i32 {
        2
    }
}

impl VerifyReport {
    /// Process exit code for this report: 0 when passed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.passed {
            0
        } else {
            1
        }
    }

    /// A fixed-width table, one row per output, then the verdict line.
    pub fn table(&self) -> String {
        let headers = [
            "output",
            "shape",
            "max abs",
            "max rel",
            "mean abs",
            "worst index",
            "max|ref|",
            "min atol",
            "min rtol",
            "result",
        ];
        let mut rows: Vec<Vec<String>> = vec![];
        for o in &self.outputs {
            rows.push(vec![
                o.name.clone(),
                fmt_dims(&o.shape),
                fmt_num(o.max_abs_diff),
                fmt_num(o.max_rel_diff),
                fmt_num(o.mean_abs_diff),
                fmt_dims(&o.worst_index),
                fmt_num(o.max_abs_reference),
                fmt_num(o.min_atol),
                fmt_num(o.min_rtol),
                if o.passed {
                    "PASS".into()
                } else {
                    "FAIL".into()
                },
            ]);
        }
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    l.push_str("  ");
                }
                // names and shapes left-aligned, numbers right-aligned
                if i <= 1 || i == 5 {
                    let _ = write!(l, "{c:<w$}");
                } else {
                    let _ = write!(l, "{c:>w$}");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(
            &headers.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &mut out,
        );
        line(
            &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
            &mut out,
        );
        for r in &rows {
            line(r, &mut out);
        }
        for o in &self.outputs {
            if let Some(p) = &o.problem {
                let _ = writeln!(out, "{}: {}", o.name, p);
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let failed = self.outputs.iter().filter(|o| !o.passed).count();
        let _ = writeln!(
            out,
            "{}: {} of {} output(s) within atol={} rtol={} over {} sample(s) ({} vs {})",
            if self.passed {
                "EQUIVALENT"
            } else {
                "NOT EQUIVALENT"
            },
            self.outputs.len() - failed,
            self.outputs.len(),
            self.atol,
            self.rtol,
            self.samples,
            self.reference,
            self.candidate,
        );
        out
    }
}

fn fmt_dims(d: &[usize]) -> String {
    format!(
        "[{}]",
        d.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        "inf".into()
    } else if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.3e}")
    }
}

/// Collapses a message to one line and bounds its length.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_MSG + 3));
    let mut last_space = false;
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        out.push(c);
    }
    let out = out.trim().to_string();
    if out.chars().count() > MAX_MSG {
        let mut t: String = out.chars().take(MAX_MSG).collect();
        t.push_str("...");
        t
    } else {
        out
    }
}

/// The whole anyhow chain of a tract error, `outer: inner: root`, on one line.
pub(crate) fn chain_msg(e: &TractError) -> String {
    let parts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    one_line(&parts.join(": "))
}

pub(crate) fn panic_msg(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("tract panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("tract panicked: {s}")
    } else {
        "tract panicked".into()
    }
}

/// numpy spelling of a tract datum type.
pub(crate) fn dt_name(dt: DatumType) -> String {
    match dt {
        DatumType::Bool => "bool".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::U16 => "uint16".into(),
        DatumType::U32 => "uint32".into(),
        DatumType::U64 => "uint64".into(),
        DatumType::I8 => "int8".into(),
        DatumType::I16 => "int16".into(),
        DatumType::I32 => "int32".into(),
        DatumType::I64 => "int64".into(),
        DatumType::F16 => "float16".into(),
        DatumType::F32 => "float32".into(),
        DatumType::F64 => "float64".into(),
        other => format!("{other:?}"),
    }
}

fn is_float(dt: DatumType) -> bool {
    matches!(dt, DatumType::F16 | DatumType::F32 | DatumType::F64)
}

fn is_int(dt: DatumType) -> bool {
    matches!(
        dt,
        DatumType::U8
            | DatumType::U16
            | DatumType::U32
            | DatumType::U64
            | DatumType::I8
            | DatumType::I16
            | DatumType::I32
            | DatumType::I64
    )
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// A parsed model plus what we need to talk about it.
pub(crate) struct Loaded {
    path: PathBuf,
    model: InferenceModel,
    /// Input names, in model order.
    inputs: Vec<String>,
    /// Output names, in model order.
    outputs: Vec<String>,
}

pub(crate) fn load(path: &Path) -> Result<Loaded, VerifyError> {
    let load_err = |msg: String| VerifyError::Load {
        path: path.to_path_buf(),
        msg,
    };
    match std::fs::metadata(path) {
        Err(e) => return Err(load_err(one_line(&e.to_string()))),
        Ok(m) if m.is_dir() => return Err(load_err("is a directory, not an ONNX file".into())),
        Ok(_) => {}
    }
    let res = catch_unwind(AssertUnwindSafe(|| tract_onnx::onnx().model_for_path(path)));
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
                            return Err(VerifyError::Unsupported {
                                path: path.to_path_buf(),
                                op,
                            });
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
    let order = match catch_unwind(AssertUnwindSafe(|| model.eval_order())) {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(load_err(chain_msg(&e))),
        Err(p) => return Err(load_err(panic_msg(p))),
    };
    let mut missing: Vec<String> = vec![];
    for &id in &order {
        let node = model.node(id);
        if let Some(op) = node.op_as::<UnimplementedOp>() {
            let name = op.name().to_string();
            let name = name
                .strip_prefix("Unimplemented(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or(&name)
                .to_string();
            if !missing.contains(&name) {
                missing.push(name);
            }
        }
    }
    if !missing.is_empty() {
        return Err(VerifyError::Unsupported {
            path: path.to_path_buf(),
            op: missing.join(", "),
        });
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
        .map(|o| {
            model
                .outlet_label(*o)
                .map(|s| s.to_string())
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();
    Ok(Loaded {
        path: path.to_path_buf(),
        model,
        inputs,
        outputs,
    })
}

pub(crate) fn check_signature(r: &Loaded, c: &Loaded) -> Result<(), VerifyError> {
    fn same_set(a: &[String], b: &[String]) -> bool {
        let sa: HashSet<&String> = a.iter().collect();
        let sb: HashSet<&String> = b.iter().collect();
        a.len() == b.len() && sa == sb && sa.len() == a.len()
    }
    let list = |v: &[String]| format!("[{}]", v.join(", "));
    if !same_set(&r.inputs, &c.inputs) {
        return Err(VerifyError::Signature(format!(
            "inputs differ: reference {} has {} {}, candidate {} has {} {}",
            r.path.display(),
            r.inputs.len(),
            list(&r.inputs),
            c.path.display(),
            c.inputs.len(),
            list(&c.inputs)
        )));
    }
    if !same_set(&r.outputs, &c.outputs) {
        return Err(VerifyError::Signature(format!(
            "outputs differ: reference {} has {} {}, candidate {} has {} {}",
            r.path.display(),
            r.outputs.len(),
            list(&r.outputs),
            c.path.display(),
            c.outputs.len(),
            list(&c.outputs)
        )));
    }
    Ok(())
}

/// What a model declares about one dimension.
#[derive(Clone, Debug)]
enum DeclDim {
    Fixed(usize),
    Symbol(String),
    Unknown,
}

fn decl_dims(shape: &ShapeFactoid) -> Option<Vec<DeclDim>> {
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

// ---------------------------------------------------------------------------------------------
// Input files
// ---------------------------------------------------------------------------------------------

/// Decodes raw little/big-endian npy data of descriptor `descr` into a tensor.
fn tensor_from_npy_bytes(descr: &str, shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
    let (order, kind) = descr.split_at(1.min(descr.len()));
    let big = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(format!("unsupported npy dtype descriptor '{descr}'")),
    };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("npy shape {shape:?} has too many elements"))?;
    macro_rules! decode {
        ($t:ty, $size:expr, $conv:expr) => {{
            if n.checked_mul($size) != Some(bytes.len()) {
                return Err(format!(
                    "npy data has {} bytes, expected {} for shape {:?} of '{}'",
                    bytes.len(),
                    n.saturating_mul($size),
                    shape,
                    descr
                ));
            }
            let v: Vec<$t> = bytes
                .chunks_exact($size)
                .map(|c| {
                    let mut a = [0u8; $size];
                    a.copy_from_slice(c);
                    if big {
                        a.reverse();
                    }
                    $conv(a)
                })
                .collect();
            Tensor::from_shape::<$t>(shape, &v).map_err(|e| chain_msg(&e))
        }};
    }
    match kind {
        "f2" => decode!(f16, 2, |a: [u8; 2]| f16::from_bits(u16::from_le_bytes(a))),
        "f4" => decode!(f32, 4, f32::from_le_bytes),
        "f8" => decode!(f64, 8, f64::from_le_bytes),
        "i1" => decode!(i8, 1, i8::from_le_bytes),
        "i2" => decode!(i16, 2, i16::from_le_bytes),
        "i4" => decode!(i32, 4, i32::from_le_bytes),
        "i8" => decode!(i64, 8, i64::from_le_bytes),
        "u1" => decode!(u8, 1, u8::from_le_bytes),
        "u2" => decode!(u16, 2, u16::from_le_bytes),
        "u4" => decode!(u32, 4, u32::from_le_bytes),
        "u8" => decode!(u64, 8, u64::from_le_bytes),
        "b1" => decode!(bool, 1, |a: [u8; 1]| a[0] != 0),
        _ => Err(format!("unsupported npy dtype descriptor '{descr}'")),
    }
}

fn read_npy_file(path: &Path) -> Result<Tensor, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let header = ndarray_npy::npy::header::Header::from_reader(&mut f)
        .map_err(|e| format!("not a valid .npy file: {e}"))?;
    let descr = header.type_descriptor.as_string().cloned().ok_or_else(|| {
        format!(
            "unsupported npy dtype (structured): {}",
            header.type_descriptor
        )
    })?;
    let mut bytes = vec![];
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if header.layout.is_fortran() {
        let rev: Vec<usize> = header.shape.iter().rev().copied().collect();
        let t = tensor_from_npy_bytes(&descr, &rev, &bytes)?;
        let axes: Vec<usize> = (0..rev.len()).rev().collect();
        t.permute_axes(&axes).map_err(|e| chain_msg(&e))
    } else {
        tensor_from_npy_bytes(&descr, &header.shape, &bytes)
    }
}

fn read_npz_array(path: &Path, name: &str) -> Result<Tensor, String> {
    use ndarray::ArrayD;
    use ndarray_npy::{NpzReader, ReadNpyError, ReadNpzError};
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut npz = NpzReader::new(f).map_err(|e| format!("not a valid .npz file: {e}"))?;
    // NpzReader needs the element type up front: read as f32 first, and on a descriptor
    // mismatch retry with the type the descriptor names.
    let mut descr = "<f4".to_string();
    for _attempt in 0..2 {
        macro_rules! try_read {
            ($t:ty) => {
                match npz.by_name::<ndarray::OwnedRepr<$t>, ndarray::IxDyn>(name) {
                    Ok(a) => {
                        let a: ArrayD<$t> = a;
                        return Ok(Tensor::from(a));
                    }
                    Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(v))) => {
                        match v.as_string() {
                            Some(s) if *s != descr => {
                                descr = s.clone();
                                continue;
                            }
                            _ => return Err(format!("unsupported npz dtype {v} for `{name}`")),
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            };
        }
        let kind = descr.get(1..).unwrap_or("");
        match kind {
            "f4" => try_read!(f32),
            "f8" => try_read!(f64),
            "i1" => try_read!(i8),
            "i2" => try_read!(i16),
            "i4" => try_read!(i32),
            "i8" => try_read!(i64),
            "u1" => try_read!(u8),
            "u2" => try_read!(u16),
            "u4" => try_read!(u32),
            "u8" => try_read!(u64),
            "b1" => try_read!(bool),
            _ => {
                return Err(format!(
                    "array `{name}` has dtype '{descr}', which .npz inputs do not support \
                     (pass it as a .npy file instead)"
                ))
            }
        }
    }
    Err(format!("cannot read array `{name}`"))
}

fn npz_names(path: &Path) -> Result<Vec<String>, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut npz =
        ndarray_npy::NpzReader::new(f).map_err(|e| format!("not a valid .npz file: {e}"))?;
    npz.names().map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Random inputs
// ---------------------------------------------------------------------------------------------

/// Standard normal samples via Box-Muller, both branches used.
struct Normal {
    spare: Option<f64>,
}

impl Normal {
    fn sample(&mut self, rng: &mut StdRng) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

pub(crate) fn random_tensor(dt: DatumType, shape: &[usize], rng: &mut StdRng) -> Result<Tensor, String> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has too many elements"))?;
    let mut normal = Normal { spare: None };
    macro_rules! floats {
        ($t:ty, $conv:expr) => {{
            let v: Vec<$t> = (0..n).map(|_| $conv(normal.sample(rng))).collect();
            Tensor::from_shape::<$t>(shape, &v)
        }};
    }
    macro_rules! ints {
        ($t:ty) => {{
            let v: Vec<$t> = (0..n).map(|_| rng.random_range(0..=3u8) as $t).collect();
            Tensor::from_shape::<$t>(shape, &v)
        }};
    }
    let t = match dt {
        DatumType::F32 => floats!(f32, |x: f64| x as f32),
        DatumType::F64 => floats!(f64, |x: f64| x),
        DatumType::F16 => floats!(f16, |x: f64| f16::from_f64(x)),
        DatumType::I8 => ints!(i8),
        DatumType::I16 => ints!(i16),
        DatumType::I32 => ints!(i32),
        DatumType::I64 => ints!(i64),
        DatumType::U8 => ints!(u8),
        DatumType::U16 => ints!(u16),
        DatumType::U32 => ints!(u32),
        DatumType::U64 => ints!(u64),
        DatumType::Bool => {
            let v: Vec<bool> = (0..n).map(|_| rng.random::<bool>()).collect();
            Tensor::from_shape::<bool>(shape, &v)
        }
        other => {
            return Err(format!(
                "cannot generate random inputs of type {}",
                dt_name(other)
            ))
        }
    };
    t.map_err(|e| chain_msg(&e))
}

// ---------------------------------------------------------------------------------------------
// Input resolution
// ---------------------------------------------------------------------------------------------

pub(crate) struct ResolvedInput {
    pub(crate) name: String,
    pub(crate) dt: DatumType,
    pub(crate) shape: Vec<usize>,
    /// Real data, if it comes from a file.
    pub(crate) data: Option<Tensor>,
    pub(crate) source: String,
}

pub(crate) fn resolve_inputs(
    r: &Loaded,
    c: &Loaded,
    opts: &VerifyOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<ResolvedInput>, VerifyError> {
    let input_err = |s: String| VerifyError::Input(one_line(&s));
    // --input-shape
    let mut shapes: HashMap<&str, &Vec<usize>> = HashMap::new();
    for (name, shape) in &opts.input_shapes {
        if !r.inputs.contains(name) {
            return Err(input_err(format!(
                "--input-shape names `{name}`, which is not an input of the models (inputs: {})",
                r.inputs.join(", ")
            )));
        }
        if shapes.insert(name, shape).is_some() {
            return Err(input_err(format!("--input-shape given twice for `{name}`")));
        }
    }
    // files: --input name=file.npy first, then --inputs file.npz
    let mut files: HashMap<String, (Tensor, String)> = HashMap::new();
    for (name, path) in &opts.input_files {
        if !r.inputs.contains(name) {
            return Err(input_err(format!(
                "--input names `{name}`, which is not an input of the models (inputs: {})",
                r.inputs.join(", ")
            )));
        }
        if files.contains_key(name) {
            return Err(input_err(format!("--input given twice for `{name}`")));
        }
        let t = read_npy_file(path)
            .map_err(|e| input_err(format!("cannot read {}: {e}", path.display())))?;
        files.insert(name.clone(), (t, format!("file {}", path.display())));
    }
    if let Some(npz) = &opts.inputs_npz {
        let names =
            npz_names(npz).map_err(|e| input_err(format!("cannot read {}: {e}", npz.display())))?;
        let mut used = 0;
        let mut ignored = vec![];
        for a in &names {
            if !r.inputs.contains(a) {
                ignored.push(a.clone());
                continue;
            }
            if files.contains_key(a) {
                notes.push(format!(
                    "input `{a}` taken from --input; the array of the same name in {} is ignored",
                    npz.display()
                ));
                continue;
            }
            let t = read_npz_array(npz, a)
                .map_err(|e| input_err(format!("cannot read {}[{a}]: {e}", npz.display())))?;
            files.insert(a.clone(), (t, format!("npz {}[{a}]", npz.display())));
            used += 1;
        }
        if used == 0 && !names.iter().any(|a| files.contains_key(a)) {
            return Err(input_err(format!(
                "{} holds no array named like a model input (inputs: {}; arrays: {})",
                npz.display(),
                r.inputs.join(", "),
                names.join(", ")
            )));
        }
        if !ignored.is_empty() {
            notes.push(format!(
                "arrays of {} that are no model input were ignored: {}",
                npz.display(),
                ignored.join(", ")
            ));
        }
    }

    let fact_of = |m: &Loaded, name: &str| -> Result<InferenceFact, VerifyError> {
        let ix = m.inputs.iter().position(|n| n == name).unwrap();
        m.model
            .input_fact(ix)
            .cloned()
            .map_err(|e| VerifyError::Load {
                path: m.path.clone(),
                msg: chain_msg(&e),
            })
    };

    let mut resolved = vec![];
    for name in &r.inputs {
        let rf = fact_of(r, name)?;
        let cf = fact_of(c, name)?;
        let (rdt, cdt) = (rf.datum_type.concretize(), cf.datum_type.concretize());
        let file = files.remove(name);
        let dt = match (rdt, cdt) {
            (Some(a), Some(b)) if a != b => {
                return Err(VerifyError::Signature(format!(
                    "input `{name}` is {} in the reference but {} in the candidate",
                    dt_name(a),
                    dt_name(b)
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => match &file {
                Some((t, _)) => t.datum_type(),
                None => {
                    notes.push(format!(
                        "input `{name}` has no declared type; using float32"
                    ));
                    DatumType::F32
                }
            },
        };
        let rdims = decl_dims(&rf.shape);
        let cdims = decl_dims(&cf.shape);
        if let (Some(a), Some(b)) = (&rdims, &cdims) {
            if a.len() != b.len() {
                return Err(VerifyError::Signature(format!(
                    "input `{name}` has rank {} in the reference but {} in the candidate",
                    a.len(),
                    b.len()
                )));
            }
        }
        // the shape the user asked for, from --input-shape and/or the file
        let mut user: Option<(Vec<usize>, &str)> = shapes
            .get(name.as_str())
            .map(|s| ((*s).clone(), "--input-shape"));
        let mut data = None;
        let mut source = String::new();
        if let Some((t, src)) = file {
            let fshape = t.shape().to_vec();
            if let Some((s, _)) = &user {
                if *s != fshape {
                    return Err(input_err(format!(
                        "--input-shape {name}:{} disagrees with the shape {:?} of {}",
                        s.iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        fshape,
                        src.trim_start_matches("file ").trim_start_matches("npz ")
                    )));
                }
            }
            let t = if t.datum_type() == dt {
                t
            } else if (is_float(t.datum_type()) && is_float(dt))
                || (is_int(t.datum_type()) && is_int(dt))
            {
                notes.push(format!(
                    "input `{name}`: {} is {}, cast to the model's {}",
                    src,
                    dt_name(t.datum_type()),
                    dt_name(dt)
                ));
                t.cast_to_dt(dt)
                    .map_err(|e| input_err(chain_msg(&e)))?
                    .into_owned()
            } else {
                return Err(input_err(format!(
                    "input `{name}`: {} holds {} data but the model expects {}",
                    src,
                    dt_name(t.datum_type()),
                    dt_name(dt)
                )));
            };
            user = Some((fshape, "the input file"));
            data = Some(t);
            source = src;
        }
        let decl: Vec<DeclDim> = match (&rdims, &cdims, &user) {
            (Some(a), _, _) => a.clone(),
            (None, Some(b), _) => b.clone(),
            (None, None, Some((s, _))) => vec![DeclDim::Unknown; s.len()],
            (None, None, None) => return Err(input_err(format!(
                "input `{name}` has no declared shape; give it with --input-shape {name}:d0,d1,..."
            ))),
        };
        let other: Vec<DeclDim> = match (&rdims, &cdims) {
            (Some(_), Some(b)) => b.clone(),
            _ => decl.clone(),
        };
        if let Some((s, from)) = &user {
            if s.len() != decl.len() {
                return Err(input_err(format!(
                    "input `{name}` has rank {} but {from} gives shape {:?} (rank {})",
                    decl.len(),
                    s,
                    s.len()
                )));
            }
        }
        let mut shape = vec![];
        for (ix, (a, b)) in decl.iter().zip(other.iter()).enumerate() {
            let d = if let Some((s, from)) = &user {
                let want = s[ix];
                let fixed = |d: &DeclDim| match d {
                    DeclDim::Fixed(v) if *v != want => Some(*v),
                    _ => None,
                };
                let which = match (fixed(a), fixed(b)) {
                    (Some(x), Some(y)) if x == y => Some(format!("both models declare {x}")),
                    (Some(x), Some(y)) => Some(format!("reference declares {x}, candidate {y}")),
                    (Some(x), None) => Some(format!("reference declares {x}")),
                    (None, Some(y)) => Some(format!("candidate declares {y}")),
                    (None, None) => None,
                };
                if let Some(which) = which {
                    notes.push(format!(
                        "input `{name}` dim {ix}: {which}, overridden to {want} by {from}"
                    ));
                }
                want
            } else {
                match (a, b) {
                    (DeclDim::Fixed(x), DeclDim::Fixed(y)) if x != y => {
                        return Err(VerifyError::Signature(format!(
                            "input `{name}` dim {ix} is {x} in the reference but {y} in the candidate \
                             (choose one with --input-shape)"
                        )))
                    }
                    (DeclDim::Fixed(x), DeclDim::Fixed(_)) => *x,
                    (DeclDim::Fixed(x), other) | (other, DeclDim::Fixed(x)) => {
                        let (sym_side, fixed_side) = if matches!(a, DeclDim::Fixed(_)) {
                            ("candidate", "reference")
                        } else {
                            ("reference", "candidate")
                        };
                        let what = match other {
                            DeclDim::Symbol(s) => format!("symbolic (`{s}`)"),
                            _ => "unknown".to_string(),
                        };
                        notes.push(format!(
                            "input `{name}` dim {ix} is {what} in the {sym_side}; using {x} as \
                             declared by the {fixed_side} (set it with --input-shape {name}:...)"
                        ));
                        *x
                    }
                    (a, b) => {
                        let sym = match (a, b) {
                            (DeclDim::Symbol(s), _) | (_, DeclDim::Symbol(s)) => format!(" (`{s}`)"),
                            _ => String::new(),
                        };
                        notes.push(format!(
                            "input `{name}` dim {ix}{sym} is symbolic; defaulting to 1 \
                             (set it with --input-shape {name}:...)"
                        ));
                        1
                    }
                }
            };
            shape.push(d);
        }
        if data.is_none() {
            source = if is_float(dt) {
                format!("random normal (seed {})", opts.seed)
            } else if dt == DatumType::Bool {
                format!("random bool (seed {})", opts.seed)
            } else {
                format!("random integers 0..=3 (seed {})", opts.seed)
            };
        }
        resolved.push(ResolvedInput {
            name: name.clone(),
            dt,
            shape,
            data,
            source,
        });
    }
    Ok(resolved)
}

// ---------------------------------------------------------------------------------------------
// Typing and running
// ---------------------------------------------------------------------------------------------

pub(crate) type Plan = Arc<TypedSimplePlan>;

/// ONNX op type of a tract node name (tract names nodes after the ONNX node name, or its
/// first output; expansions append `.suffix`).
fn onnx_op_of(path: &Path, node_name: &str) -> Option<(String, String)> {
    let proto = tract_onnx::onnx().proto_model_for_path(path).ok()?;
    let graph = proto.graph.as_ref()?;
    let mut by_name: HashMap<&str, &str> = HashMap::new();
    for n in &graph.node {
        if !n.name.is_empty() {
            by_name.insert(&n.name, &n.op_type);
        }
        if let Some(o) = n.output.first() {
            by_name.entry(o.as_str()).or_insert(&n.op_type);
        }
    }
    let mut name = node_name;
    loop {
        if let Some(op) = by_name.get(name) {
            return Some((name.to_string(), op.to_string()));
        }
        match name.rfind('.') {
            Some(i) => name = &name[..i],
            None => return None,
        }
    }
}

/// Names the ONNX node an error is about, from tract's `#12 "name" Op` node display.
pub(crate) fn describe_failure(path: &Path, e: &TractError) -> (Option<String>, String) {
    let mut op = None;
    let mut node = None;
    for c in e.chain() {
        let s = c.to_string();
        if let Some(i) = s.find("Unimplemented(") {
            let rest = &s[i + "Unimplemented(".len()..];
            if let Some(j) = rest.find(')') {
                op = Some(rest[..j].to_string());
            }
        }
        if node.is_none() {
            if let Some(i) = s.find(" \"") {
                if s[..i]
                    .rsplit(' ')
                    .next()
                    .is_some_and(|t| t.starts_with('#'))
                {
                    let rest = &s[i + 2..];
                    if let Some(j) = rest.find('"') {
                        node = Some(rest[..j].to_string());
                    }
                }
            }
        }
    }
    let mut msg = chain_msg(e);
    if let Some(n) = &node {
        if let Some((onnx_node, op_type)) = onnx_op_of(path, n) {
            msg = one_line(&format!("at ONNX node `{onnx_node}` ({op_type}): {msg}"));
        }
    }
    (op, msg)
}

/// The runnable plan of `m` with its inputs pinned to `inputs`' shapes, and its input and output
/// names. `optimised`: tract's decluttered and optimised plan (what a deployment runs; used by
/// `bench`), otherwise the typed, un-optimised plan the equivalence check needs (module docs).
pub(crate) fn prepare(
    m: Loaded,
    inputs: &[ResolvedInput],
    notes: &mut Vec<String>,
    optimised: bool,
) -> Result<(Plan, Vec<String>, Vec<String>), VerifyError> {
    let Loaded {
        path,
        mut model,
        inputs: in_names,
        outputs: out_names,
    } = m;
    let run_err = |msg: String| VerifyError::Run {
        path: path.clone(),
        msg,
    };
    // A fixed input dim overridden by the user (e.g. batch 1 -> 2) contradicts the shapes the
    // exporter wrote in `value_info`; reload without them (tract infers shapes by itself).
    let mut overridden = false;
    for (ix, name) in in_names.iter().enumerate() {
        let ri = inputs
            .iter()
            .find(|i| &i.name == name)
            .expect("resolved input");
        let fact = model.input_fact(ix).map_err(|e| run_err(chain_msg(&e)))?;
        if let Some(dims) = decl_dims(&fact.shape) {
            overridden |= dims
                .iter()
                .zip(&ri.shape)
                .any(|(d, v)| matches!(d, DeclDim::Fixed(x) if x != v));
        }
    }
    if overridden {
        let res = catch_unwind(AssertUnwindSafe(|| {
            tract_onnx::onnx()
                .with_ignore_value_info(true)
                .model_for_path(&path)
        }));
        model = match res {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return Err(VerifyError::Load {
                    path: path.clone(),
                    msg: chain_msg(&e),
                })
            }
            Err(p) => {
                return Err(VerifyError::Load {
                    path: path.clone(),
                    msg: panic_msg(p),
                })
            }
        };
        notes.push(format!(
            "{}: value_info shapes ignored (a fixed input dim was overridden)",
            path.display()
        ));
    }
    // substitute the symbols of the declared input dims by the chosen values everywhere
    let mut subs: HashMap<Symbol, TDim> = HashMap::new();
    for (ix, name) in in_names.iter().enumerate() {
        let ri = inputs
            .iter()
            .find(|i| &i.name == name)
            .expect("resolved input");
        let fact = model
            .input_fact(ix)
            .map_err(|e| run_err(chain_msg(&e)))?
            .clone();
        if !fact.shape.is_open() {
            for (d, v) in fact.shape.dims().zip(&ri.shape) {
                if let GenericFactoid::Only(TDim::Sym(s)) = d {
                    subs.insert(s.clone(), (*v as i64).to_dim());
                }
            }
        }
    }
    let typed = catch_unwind(AssertUnwindSafe(|| -> TractResult<TypedModel> {
        if !subs.is_empty() {
            model.set_symbols(&subs)?;
        }
        for (ix, name) in in_names.iter().enumerate() {
            let ri = inputs
                .iter()
                .find(|i| &i.name == name)
                .expect("resolved input");
            model.set_input_fact(ix, InferenceFact::dt_shape(ri.dt, ri.shape.iter().copied()))?;
        }
        model.into_typed()
    }));
    // refuse before running what tract would crash on
    if let Ok(Ok(typed)) = &typed {
        if let Some(msg) = unrunnable(typed, MAX_TENSOR_ELEMENTS) {
            return Err(run_err(msg));
        }
    }
    let res = typed.map(|t| {
        t.and_then(|typed| {
            catch_unwind(AssertUnwindSafe(|| -> TractResult<Plan> {
                if optimised {
                    // for latency only (`bench`), never for the equivalence check
                    return typed.into_optimized()?.into_runnable();
                }
                // typed, NOT decluttered / optimised: see the module documentation
                typed.into_runnable()
            }))
            .unwrap_or_else(|p| Err(anyhow::anyhow!("{}", panic_msg(p))))
        })
    });
    match res {
        Err(p) => Err(run_err(panic_msg(p))),
        Ok(Err(e)) => {
            let (op, msg) = describe_failure(&path, &e);
            match op {
                Some(op) => Err(VerifyError::Unsupported { path, op }),
                None if overridden => Err(run_err(one_line(&format!(
                    "cannot type the model with the requested input shape (it overrides a fixed \
                     dim the model declares; the model may not support it): {msg}"
                )))),
                None => Err(run_err(format!("cannot type the model: {msg}"))),
            }
        }
        Ok(Ok(plan)) => Ok((plan, in_names, out_names)),
    }
}

/// At most this many elements in any one tensor the check computes (4 GiB of float32).
pub const MAX_TENSOR_ELEMENTS: u128 = 1 << 30;

/// Why tract must not run a typed model: a Pad with negative amounts (tract-onnx casts them to
/// `usize`, and tract then writes out of bounds), or a tensor of more than `limit` elements
/// (a Pad or Resize with absurd sizes, say: an allocation failure aborts the process).
pub(crate) fn unrunnable(m: &TypedModel, limit: u128) -> Option<String> {
    for node in m.nodes() {
        if let Some(pad) = node.op_as::<tract_onnx::tract_core::ops::array::Pad>() {
            if pad.pads.iter().any(|&(a, b)| a.max(b) > isize::MAX as usize) {
                return Some(format!("Pad '{}' has negative amounts, which tract cannot run", node.name));
            }
        }
        for o in &node.outputs {
            let Some(dims) = o.fact.shape.as_concrete() else { continue };
            let n = dims.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
            if n > limit {
                return Some(format!("'{}' would be a tensor of shape {dims:?} ({n} elements), too big to run (at most {limit})", node.name));
            }
        }
    }
    None
}

fn run_plan(
    path: &Path,
    plan: &Plan,
    in_names: &[String],
    out_names: &[String],
    data: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, VerifyError> {
    let run_err = |msg: String| VerifyError::Run {
        path: path.to_path_buf(),
        msg,
    };
    let inputs: TVec<TValue> = in_names
        .iter()
        .map(|n| data[n].clone().into_tvalue())
        .collect();
    let res = catch_unwind(AssertUnwindSafe(|| plan.run(inputs)));
    let outs = match res {
        Err(p) => return Err(run_err(panic_msg(p))),
        Ok(Err(e)) => return Err(run_err(describe_failure(path, &e).1)),
        Ok(Ok(o)) => o,
    };
    if outs.len() != out_names.len() {
        return Err(run_err(format!(
            "model produced {} outputs, expected {}",
            outs.len(),
            out_names.len()
        )));
    }
    Ok(out_names
        .iter()
        .cloned()
        .zip(outs.into_iter().map(|v| v.into_tensor()))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Acc {
    shape: Vec<usize>,
    dtype: String,
    max_abs: f64,
    max_rel: f64,
    sum_means: f64,
    n_means: usize,
    worst: Option<(usize, Vec<usize>, f64, f64)>,
    max_ref: f64,
    min_rtol: f64,
    nan_a: usize,
    nan_b: usize,
    failing: usize,
    problems: Vec<String>,
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    let c = t.cast_to::<f64>().map_err(|e| chain_msg(&e))?;
    let v = c.try_as_plain_ram().map_err(|e| chain_msg(&e))?;
    Ok(v.as_slice::<f64>().map_err(|e| chain_msg(&e))?.to_vec())
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, d) in shape.iter().enumerate().rev() {
        if *d > 0 {
            idx[i] = flat % d;
            flat /= d;
        }
    }
    idx
}

fn compare_into(acc: &mut Acc, sample: usize, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    acc.shape = a.shape().to_vec();
    acc.dtype = dt_name(a.datum_type());
    if a.shape() != b.shape() {
        acc.problems.push(format!(
            "shape mismatch in sample {sample}: reference {:?}, candidate {:?}",
            a.shape(),
            b.shape()
        ));
        acc.max_abs = f64::INFINITY;
        acc.max_rel = f64::INFINITY;
        acc.min_rtol = f64::INFINITY;
        return;
    }
    if a.datum_type() != b.datum_type() {
        let p = format!(
            "dtype differs: reference {}, candidate {} (compared in float64)",
            dt_name(a.datum_type()),
            dt_name(b.datum_type())
        );
        if !acc.problems.contains(&p) {
            acc.problems.push(p);
        }
    }
    let (va, vb) = match (to_f64(a), to_f64(b)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            acc.problems.push(format!("cannot compare as numbers: {e}"));
            acc.max_abs = f64::NAN;
            return;
        }
    };
    let mut sum = 0.0;
    let mut count = 0usize;
    for (i, (&x, &y)) in va.iter().zip(&vb).enumerate() {
        let (xn, yn) = (x.is_nan(), y.is_nan());
        if xn || yn {
            acc.nan_a += xn as usize;
            acc.nan_b += yn as usize;
            acc.failing += 1;
            continue;
        }
        let diff = if x == y { 0.0 } else { (x - y).abs() }; // equal infinities: 0
        let ax = x.abs();
        if ax.is_finite() {
            acc.max_ref = acc.max_ref.max(ax);
        } else {
            acc.max_ref = f64::INFINITY;
        }
        sum += diff;
        count += 1;
        let rel = if diff.is_infinite() {
            f64::INFINITY
        } else {
            diff / ax.max(REL_TINY)
        };
        if rel > acc.max_rel || rel.is_nan() {
            acc.max_rel = rel;
        }
        if acc.worst.is_none() || diff > acc.max_abs {
            acc.max_abs = diff;
            acc.worst = Some((sample, unravel(i, a.shape()), x, y));
        }
        // (diff == 0 first: equal infinities with rtol = 0 would give 0 <= NaN)
        let within = diff == 0.0 || diff <= atol + rtol * ax;
        if !within {
            acc.failing += 1;
        }
        if diff > atol {
            let need = if ax > 0.0 && diff.is_finite() {
                (diff - atol) / ax
            } else {
                f64::INFINITY
            };
            if need > acc.min_rtol || need.is_nan() {
                acc.min_rtol = need;
            }
        }
    }
    acc.sum_means += if count > 0 { sum / count as f64 } else { 0.0 };
    acc.n_means += 1;
}

fn finish(name: &str, acc: Acc) -> OutputReport {
    let mut problems = acc.problems;
    if acc.nan_a > 0 || acc.nan_b > 0 {
        problems.insert(
            0,
            format!(
                "NaN values: {} in the reference, {} in the candidate",
                acc.nan_a, acc.nan_b
            ),
        );
    }
    let hard_fail = acc.nan_a > 0
        || acc.nan_b > 0
        || problems
            .iter()
            .any(|p| p.starts_with("shape mismatch") || p.starts_with("cannot compare"));
    let (worst_sample, worst_index, wa, wb) = acc.worst.unwrap_or((0, vec![], f64::NAN, f64::NAN));
    OutputReport {
        name: name.to_string(),
        shape: acc.shape,
        dtype: acc.dtype,
        max_abs_diff: acc.max_abs,
        max_rel_diff: acc.max_rel,
        mean_abs_diff: if acc.n_means > 0 {
            acc.sum_means / acc.n_means as f64
        } else {
            f64::NAN
        },
        worst_index,
        worst_sample,
        worst_reference: wa,
        worst_candidate: wb,
        max_abs_reference: acc.max_ref,
        min_atol: acc.max_abs,
        min_rtol: acc.min_rtol,
        nan_reference: acc.nan_a,
        nan_candidate: acc.nan_b,
        failing_elements: acc.failing,
        passed: !hard_fail && acc.failing == 0,
        problem: if problems.is_empty() {
            None
        } else {
            Some(problems.join("; "))
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// `verify: ...` lines on stderr, once the check has run for more than 1 s, at most about one
/// per second (`force` lines, e.g. the last sample, always print past that first second).
struct Progress {
    on: bool,
    start: Instant,
    last: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn say(&self, force: bool, msg: impl FnOnce() -> String) {
        if !self.on || self.start.elapsed().as_secs_f64() <= 1.0 {
            return;
        }
        if !force
            && self
                .last
                .get()
                .is_some_and(|t| t.elapsed().as_secs_f64() < 1.0)
        {
            return;
        }
        self.last.set(Some(Instant::now()));
        eprintln!(
            "verify: {} ({:.1}s)",
            msg(),
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Checks that `candidate` computes the same function as `reference` (see the module docs).
///
/// `Ok(report)` whenever both models ran; `report.passed` tells whether they agree.
/// `Err(_)` when the check could not be made.
pub fn verify_paths(
    reference: &Path,
    candidate: &Path,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let progress = Progress {
        on: opts.progress,
        start: Instant::now(),
        last: std::cell::Cell::new(None),
    };
    if opts.samples == 0 {
        return Err(VerifyError::Input("samples must be at least 1".into()));
    }
    for (what, v) in [("atol", opts.atol), ("rtol", opts.rtol)] {
        if v.is_nan() || v < 0.0 || v.is_infinite() {
            return Err(VerifyError::Input(format!(
                "{what} must be a finite number >= 0, got {v}"
            )));
        }
    }
    let r = load(reference)?;
    let c = load(candidate)?;
    check_signature(&r, &c)?;
    let mut notes = vec![];
    let inputs = resolve_inputs(&r, &c, opts, &mut notes)?;
    progress.say(true, || "models loaded".into());
    let (rplan, rin, rout) = prepare(r, &inputs, &mut notes, false)?;
    let (cplan, cin, cout) = prepare(c, &inputs, &mut notes, false)?;
    progress.say(true, || "models typed".into());

    let all_files = inputs.iter().all(|i| i.data.is_some());
    let samples = if all_files { 1 } else { opts.samples };
    if all_files && opts.samples != 1 {
        notes.push("every input comes from a file: one sample".into());
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut accs: Vec<Acc> = rout.iter().map(|_| Acc::default()).collect();
    for s in 0..samples {
        let mut data = HashMap::new();
        for i in &inputs {
            let t = match &i.data {
                Some(t) => t.clone(),
                None => random_tensor(i.dt, &i.shape, &mut rng).map_err(VerifyError::Input)?,
            };
            data.insert(i.name.clone(), t);
        }
        let ro = run_plan(reference, &rplan, &rin, &rout, &data)?;
        let co = run_plan(candidate, &cplan, &cin, &cout, &data)?;
        for (acc, name) in accs.iter_mut().zip(&rout) {
            compare_into(acc, s, &ro[name], &co[name], opts.atol, opts.rtol);
        }
        progress.say(s + 1 == samples, || {
            format!("sample {}/{} done", s + 1, samples)
        });
    }
    let outputs: Vec<OutputReport> = rout
        .iter()
        .zip(accs)
        .map(|(n, acc)| finish(n, acc))
        .collect();
    let mut seen = HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    Ok(VerifyReport {
        passed: outputs.iter().all(|o| o.passed),
        atol: opts.atol,
        rtol: opts.rtol,
        samples,
        seed: opts.seed,
        inputs: inputs
            .iter()
            .map(|i| InputSpec {
                name: i.name.clone(),
                shape: i.shape.clone(),
                dtype: dt_name(i.dt),
                source: i.source.clone(),
            })
            .collect(),
        outputs,
        notes,
        reference: reference.display().to_string(),
        candidate: candidate.display().to_string(),
    })
}
