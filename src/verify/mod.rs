//! The equivalence check: runs a reference and a candidate ONNX model in tract on identical
//! inputs ([`inputs`]), compares every output ([`compare`]) and judges it ([`Criterion`]) into a
//! report ([`report`]); when the check fails, it names the first tensor that diverges.
//!
//! Models run as *typed but not decluttered / optimised* plans
//! ([`PlanKind::Reference`](crate::tract::PlanKind)): tract's optimiser folds BatchNormalization
//! into convolutions and merges identical siblings, which could hide the very mistakes this check
//! is meant to find.
//!
//! # The criterion
//!
//! A fused model is not bit-identical to its original: weights are merged and rounded once, sums
//! are taken in another order. How far that moves an output depends on the model (its depth, its
//! scale, cancellation between branches) and on its precision: no fixed tolerance is right for
//! every model. So the default criterion ([`Criterion::Noise`]) measures the reference's own
//! rounding noise: the reference is run again with every weight moved by one unit in the last
//! place of the type it is stored in (up or down at random, a fresh draw for each sample, or one
//! for all of them when they run stacked (see [Memory](#memory)); more draws when an output has
//! few elements, see [`NOISE_OBSERVATIONS`]), and the candidate passes
//! when its error statistic (the largest |reference − candidate| by default) is at most
//! [`VerifyOptions::noise_factor`] times the largest such movement (and never less than one
//! rounding of the output's precision at its scale, `unit · max|reference|`). The bound is
//! scale-free (it grows with the outputs), precision-aware (float16 weights move by float16's
//! unit) and insensitive to elements near zero (no elementwise relative error). A wrong fusion,
//! one weight off by much more than its rounding, lands hundreds of times the noise away.
//!
//! [`Criterion::Tolerance`] keeps elementwise bounds: an element passes when
//! `|a − b| ≤ atol + rtol·|a|` (per-output values allowed), or, with another
//! [`Stat`](VerifyOptions::stat), an output passes when the statistic of |a − b| is at most atol
//! or that of |a − b|/|a| at most rtol (as Polygraphy's `--check-error-stat`).
//!
//! Either way, NaN and infinite values pass only where both models agree (both NaN, or the same
//! infinity), and shapes must match.
//!
//! # Precision
//!
//! tract cannot run bfloat16 at all, nor every operator in float16: models that store or compute
//! anything in half precision are evaluated as their exact float32 upcast (the same weights,
//! activations not rounded to half precision), and judged by the noise of their stored precision.
//! The report's `evaluation` says so.
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
//! # Memory
//!
//! One model's weights are in memory at a time: the candidate's signature is read without its
//! weights (tract parses its graph with every large tensor a scalar); the reference is loaded (each weight copied once, see [`crate::tract::load`]), run on
//! every sample, perturbed in place draw after draw (each draw undoes the one before: a move by
//! one unit in the last place is exactly reversible, see [`crate::tract::perturb`]) and let go;
//! then the candidate is loaded again and run. Free memory is returned to the system between
//! these phases. Samples run in rounds of one per core; a last round of fewer samples than
//! cores (and a noise draw's single sample) spreads each run's matrix products over the cores
//! left over.
//!
//! The samples run **stacked**, as one batch on axis 0, when both models declare the same
//! symbolic first dimension on every input (a batch axis: the model takes any batch) and the
//! reference's weights are at least [`STACK_WHEN`] times the elements a run computes: tract's
//! un-optimised plan copies and packs every weight on every run, so a model made mostly of
//! weights (a wide network at a small input) runs its samples in one run per model and per noise
//! draw (whose one perturbation then serves every sample) instead of one per sample. A model
//! that does not type with the stacked inputs, or whose outputs do not split back into the
//! samples' shapes, runs them one by one (the notes say so). Each sample's outputs are compared
//! as if it had run alone. A model with a fixed batch is never stacked: overriding a dimension
//! it declares would check a function it was not exported to compute.
//!
//! # Shapes
//!
//! The inputs' declared dtypes and shapes are taken from the ONNX graphs. A dimension given by
//! `--input-shape` or by an input file wins (a declared fixed dimension that is overridden this
//! way is reported in `notes`); a dimension left symbolic (or unknown) in both models defaults to 1
//! and `notes` says so. Symbols are also substituted in the models' other declared facts
//! (`value_info`).

pub(crate) mod compare;
pub(crate) mod inputs;
mod noise;
pub(crate) mod report;

pub use inputs::MAX_INPUT_ELEMENTS;
pub use report::{Divergence, InputSpec, OutputReport, VerifyReport};

use crate::error::Error;
use crate::graph::Label;
use crate::model::save::TempModel;
use crate::model::tensor::FloatType;
use crate::model::transform::{eval_mode, freeze_initializers, has_half, training_mode, upcast_half};
use crate::model::Model;
use crate::tract::{
    load, on_threads, output_shapes, perturb_in_place, prepare, run, signature_without_weights, weigh, DeclDim, Draws,
    InputFact, Loaded, PlanKind, PlanSpec, Signature,
};
use compare::{finish, Acc, Judge};
use inputs::{read_npz_array, resolve_inputs, sample, write_npz};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tract_onnx::prelude::Tensor;

/// How outputs are judged (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Criterion {
    /// No further from the reference than [`VerifyOptions::noise_factor`] times the reference's
    /// own rounding noise.
    #[default]
    Noise,
    /// Within `atol` and `rtol`.
    Tolerance,
}

impl std::str::FromStr for Criterion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "noise" => Ok(Criterion::Noise),
            "tolerance" => Ok(Criterion::Tolerance),
            _ => Err(format!("criterion {s:?}: expected noise or tolerance")),
        }
    }
}

impl std::fmt::Display for Criterion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Criterion::Noise => "noise",
            Criterion::Tolerance => "tolerance",
        })
    }
}

/// The error statistic an output is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Stat {
    /// Tolerances: every element within `atol + rtol·|a|`. Noise: the largest error.
    #[default]
    Elementwise,
    Max,
    Mean,
    Median,
    /// The `q` quantile (0 ≤ q ≤ 1).
    Quantile(f64),
}

impl std::str::FromStr for Stat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "elementwise" | "elemwise" => Stat::Elementwise,
            "max" => Stat::Max,
            "mean" => Stat::Mean,
            "median" => Stat::Median,
            _ => match s.strip_prefix("quantile:").map(str::parse::<f64>) {
                Some(Ok(q)) if (0.0..=1.0).contains(&q) => Stat::Quantile(q),
                _ => {
                    return Err(format!(
                        "statistic {s:?}: expected elementwise, max, mean, median or quantile:Q with 0 <= Q <= 1"
                    ))
                }
            },
        })
    }
}

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stat::Elementwise => f.write_str("elementwise"),
            Stat::Max => f.write_str("max"),
            Stat::Mean => f.write_str("mean"),
            Stat::Median => f.write_str("median"),
            Stat::Quantile(q) => write!(f, "quantile:{q}"),
        }
    }
}

/// The default of [`VerifyOptions::noise_factor`].
pub const NOISE_FACTOR: f64 = 10.0;

/// Options of [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyOptions {
    /// Seed of the random inputs (default 0).
    pub seed: u64,
    /// Number of random input sets (default 3); one when every input comes from a file.
    pub samples: usize,
    /// How outputs are judged (default [`Criterion::Noise`]).
    pub criterion: Criterion,
    /// Noise criterion: how many times the reference's rounding noise an output may be off
    /// (default [`NOISE_FACTOR`]).
    pub noise_factor: f64,
    /// Tolerance criterion: absolute tolerance (default 1e-4), per-output values in `output_atol`.
    pub atol: f64,
    /// Tolerance criterion: relative tolerance (default 1e-4), per-output values in `output_rtol`.
    pub rtol: f64,
    pub output_atol: Vec<(String, f64)>,
    pub output_rtol: Vec<(String, f64)>,
    /// The error statistic (default [`Stat::Elementwise`]).
    pub stat: Stat,
    /// `--input-shape name:1,3,224,224`: concrete shapes of inputs.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// `--input name=file.npy`: real input data.
    pub input_files: Vec<(String, PathBuf)>,
    /// `--inputs file.npz`: real input data, arrays named like the graph inputs.
    pub inputs_npz: Option<PathBuf>,
    /// Write the inputs and the reference's outputs of the first sample to this .npz.
    pub save_outputs: Option<PathBuf>,
    /// Compare the candidate with these outputs (an .npz, arrays named like the outputs, made
    /// elsewhere from the same inputs, e.g. by PyTorch) instead of the reference's.
    pub load_outputs: Option<PathBuf>,
    /// Run training-mode BatchNormalization and Dropout in their inference forms.
    pub eval_bn: bool,
    /// Treat initializers listed as graph inputs as constants.
    pub freeze_initializers: bool,
    /// Print `verify: ...` progress lines on stderr once the check has run for more than 1 s.
    pub progress: bool,
}

impl VerifyOptions {
    /// Check the options make sense; the message names the option (as `samples`, `atol` ...).
    pub fn validate(&self) -> Result<(), String> {
        if self.samples == 0 {
            return Err("samples must be at least 1".into());
        }
        let atols = self.output_atol.iter().map(|(n, v)| (format!("atol {n}:"), *v));
        let rtols = self.output_rtol.iter().map(|(n, v)| (format!("rtol {n}:"), *v));
        for (what, v) in
            [("atol".to_string(), self.atol), ("rtol".to_string(), self.rtol)].into_iter().chain(atols).chain(rtols)
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{what} must be a finite number >= 0, got {v}"));
            }
        }
        if !(self.noise_factor >= 1.0 && self.noise_factor.is_finite()) {
            return Err(format!("noise-factor must be a finite number >= 1, got {}", self.noise_factor));
        }
        if let Stat::Quantile(q) = self.stat {
            if !(0.0..=1.0).contains(&q) {
                return Err(format!("stat quantile must be from 0 to 1, got {q}"));
            }
        }
        Ok(())
    }

    fn atol_of(&self, output: &str) -> f64 {
        self.output_atol.iter().rev().find(|(n, _)| n == output).map_or(self.atol, |(_, v)| *v)
    }

    fn rtol_of(&self, output: &str) -> f64 {
        self.output_rtol.iter().rev().find(|(n, _)| n == output).map_or(self.rtol, |(_, v)| *v)
    }
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            seed: 0,
            samples: 3,
            criterion: Criterion::Noise,
            noise_factor: NOISE_FACTOR,
            atol: 1e-4,
            rtol: 1e-4,
            output_atol: vec![],
            output_rtol: vec![],
            stat: Stat::Elementwise,
            input_shapes: vec![],
            input_files: vec![],
            inputs_npz: None,
            save_outputs: None,
            load_outputs: None,
            eval_bn: false,
            freeze_initializers: false,
            progress: false,
        }
    }
}

/// Both models must have the same input and output names.
pub(crate) fn check_signature(r: &Signature, c: &Signature) -> Result<(), Error> {
    fn same_set(a: &[String], b: &[String]) -> bool {
        let sa: HashSet<&String> = a.iter().collect();
        let sb: HashSet<&String> = b.iter().collect();
        a.len() == b.len() && sa == sb && sa.len() == a.len()
    }
    let list = |v: &[String]| format!("[{}]", v.join(", "));
    if !same_set(&r.inputs, &c.inputs) {
        return Err(Error::Signature(format!(
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
        return Err(Error::Signature(format!(
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
        if !force && self.last.get().is_some_and(|t| t.elapsed().as_secs_f64() < 1.0) {
            return;
        }
        self.last.set(Some(Instant::now()));
        eprintln!("verify: {} ({:.1}s)", msg(), self.start.elapsed().as_secs_f64());
    }
}

/// A model as the check runs it: read with this crate's loader, edited as the options ask
/// (inference forms, frozen initializers, float32 upcast), and loaded into tract (from a
/// temporary copy when edited).
struct Prepared {
    model: Model,
    /// tract's model, while it is held (see [`Prepared::tract`] and [`Prepared::let_go`])
    loaded: Option<Loaded>,
    /// the file tract reads (a temporary copy when edited) and the name it has in messages
    file: PathBuf,
    shown: PathBuf,
    /// the weights and the type each is stored in (before any upcast)
    weights: HashMap<String, FloatType>,
    /// the inputs of a half-precision type, when the model runs upcast
    half_inputs: HashMap<String, FloatType>,
    _temp: Option<TempModel>,
}

/// Our loader's errors on a file the check reads are load errors, as tract's are.
fn load_error(path: &Path, e: Error) -> Error {
    match e {
        Error::Io { msg, .. } | Error::Format { msg, .. } => Error::Load { path: path.to_path_buf(), msg },
        Error::ExternalData { msg, .. } => {
            Error::Load { path: path.to_path_buf(), msg: format!("external data: {msg}") }
        }
        e => e,
    }
}

fn prepare_model(path: &Path, opts: &VerifyOptions, upcast: bool, notes: &mut Vec<String>) -> Result<Prepared, Error> {
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
    let weights = noise::weights(&model);
    let mut half_inputs = HashMap::new();
    if upcast {
        for v in &model.graph().input {
            if let Some(crate::proto::type_proto::Value::TensorType(t)) =
                v.r#type.as_ref().and_then(|t| t.value.as_ref())
            {
                if let Some(ft @ (FloatType::F16 | FloatType::BF16)) = t.elem_type.and_then(FloatType::from_onnx) {
                    half_inputs.insert(v.name().to_string(), ft);
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
    Ok(Prepared { model, loaded: None, file, shown: path.to_path_buf(), weights, half_inputs, _temp: temp })
}

impl Prepared {
    /// tract's model, loaded again if it was let go.
    fn tract(&mut self) -> Result<&mut Loaded, Error> {
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
    fn signature(&mut self) -> Result<Signature, Error> {
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
    fn let_go(&mut self) {
        self.loaded = None;
        give_back();
    }
}

/// Return the allocator's free memory to the system: the phases of the check free one model's
/// weights before the next is loaded, and what they freed must not stay counted in the
/// process's memory (glibc keeps freed memory of each thread's arena otherwise).
fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the system
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The noise criterion sees at least this many perturbed output elements per output: an output
/// with fewer elements than that over all samples gets more draws per sample (at most
/// [`MAX_DRAWS`]). One draw of one element is one random sum of the weights' movements, which
/// cancels to nearly nothing often enough to fail a correct model (below a tenth of its standard
/// deviation one time in 12, for a normal sum); the largest of 64 independent such sums is about
/// 2.4 standard deviations.
pub const NOISE_OBSERVATIONS: usize = 64;
/// The most draws of the noise per sample (samples that run stacked share their draws: at most
/// this many per sample of the batch).
pub const MAX_DRAWS: usize = 16;

/// The seed of draw `k` of sample `s`.
fn draw_seed(seed: u64, s: usize, k: usize) -> u64 {
    seed ^ (0x9e37_79b9 + s as u64) ^ ((k as u64) << 40)
}

/// Whether every input of a model declares the same symbolic dimension first: a batch axis the
/// model takes at any size, along which the samples can run stacked.
fn batch_axis(sig: &Signature) -> bool {
    let mut symbol = None;
    sig.inputs.iter().all(|name| match sig.input_decl(name).1.as_deref() {
        Some([DeclDim::Symbol(s), ..]) => symbol.get_or_insert_with(|| s.clone()) == s,
        _ => false,
    })
}

/// An error about a temporary copy, told about the user's file.
fn shown_as(e: Error, temp: &Path, path: &Path) -> Error {
    let fix = |m: String| m.replace(&temp.display().to_string(), &path.display().to_string());
    match e {
        Error::Load { msg, .. } => Error::Load { path: path.to_path_buf(), msg: fix(msg) },
        Error::Unsupported { op, .. } => Error::Unsupported { path: path.to_path_buf(), op },
        Error::Run { msg, .. } => Error::Run { path: path.to_path_buf(), msg: fix(msg) },
        e => e,
    }
}

/// The unit roundoff of an output's precision.
fn unit_of(model: &Model, output: &str) -> f64 {
    let g = model.graph();
    let dt = g.output.iter().find(|o| o.name() == output).and_then(|o| match o.r#type.as_ref()?.value.as_ref()? {
        crate::proto::type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    });
    match dt.and_then(FloatType::from_onnx) {
        Some(FloatType::F16) => f64::powi(2.0, -11),
        Some(FloatType::BF16) => f64::powi(2.0, -8),
        Some(FloatType::F64) => f64::powi(2.0, -53),
        _ => f64::powi(2.0, -24),
    }
}

/// The number of nodes on the longest path from the graph's inputs to `output`: the roundings
/// the reference's own arithmetic makes on the way, which weight perturbation does not show.
fn depth_of(model: &Model, output: &str) -> usize {
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for n in &model.graph().node {
        let d = 1 + n.input.iter().filter_map(|i| depth.get(i.as_str())).copied().max().unwrap_or(0);
        for o in &n.output {
            depth.insert(o, d);
        }
    }
    depth.get(output).copied().unwrap_or(1)
}

/// Checks that `candidate` computes the same function as `reference` (see the module docs).
///
/// `Ok(report)` whenever both models ran; `report.passed` tells whether they agree.
/// `Err(_)` when the check could not be made.
pub fn verify(reference: &Path, candidate: &Path, opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    let progress = Progress { on: opts.progress, start: Instant::now(), last: std::cell::Cell::new(None) };
    opts.validate().map_err(Error::Input)?;
    let mut notes = vec![];
    let half = |p: &Path| Model::load(p).map(|m| has_half(&m)).map_err(|e| load_error(p, e));
    let upcast = half(reference)? || half(candidate)?;
    let mut r = prepare_model(reference, opts, upcast, &mut notes)?;
    let mut c = prepare_model(candidate, opts, upcast, &mut notes)?;
    // the candidate's signature first (read without its weights); its weights wait for its turn
    let csig = match c.signature() {
        Ok(s) => s,
        Err(e) => {
            // what is wrong with both models is told of the reference (the user's own file)
            r.tract()?.signature()?;
            return Err(e);
        }
    };
    let rsig = r.tract()?.signature()?;
    check_signature(&rsig, &csig)?;
    let mut inputs = resolve_inputs(&rsig, &csig, opts, &mut notes)?;
    for i in &mut inputs {
        i.stored = r.half_inputs.get(&i.name).copied();
    }
    progress.say(true, || "models loaded".into());
    let facts: Vec<InputFact> = inputs.iter().map(|i| i.fact()).collect();
    let all_files = inputs.iter().all(|i| i.data.is_some());
    let samples = if all_files { 1 } else { opts.samples };
    if all_files && opts.samples != 1 {
        notes.push("every input comes from a file: one sample".into());
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let data: Vec<HashMap<String, Tensor>> =
        (0..samples).map(|_| sample(&inputs, &mut rng)).collect::<Result<_, _>>()?;
    // the reference on every sample (stacked into one batch when both models declare one
    // symbolic batch axis and the weights outweigh what a run computes)
    let reference_plan = PlanSpec::of(PlanKind::Reference);
    let stacking =
        if samples > 1 && batch_axis(&rsig) && batch_axis(&csig) { Stacking::Weigh } else { Stacking::Rounds };
    let Runs { outs: ro, outputs: rout, inputs: rin, notes: rnotes, stacked, weighed, unstacked } =
        run_all(r.tract()?, &facts, reference_plan, &data, &stacking)?;
    notes.extend(rnotes);
    if let (true, Some((weights, activations))) = (stacked, weighed) {
        notes.push(format!(
            "the {samples} samples ran stacked on the batch axis, one run per model and noise draw (the weights \
             are {:.0}x the elements a run computes)",
            weights as f64 / activations.max(1) as f64
        ));
    }
    if let Some(why) = unstacked {
        notes.push(format!("the samples ran one by one: {why}"));
    }
    // the noise draws and the candidate run as the reference did
    let stacking = if stacked {
        Stacking::Stacked(ro[0].iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect())
    } else {
        Stacking::Rounds
    };
    progress.say(true, || format!("{samples} sample(s) run on the reference"));
    let golden: Option<HashMap<String, Tensor>> = match &opts.load_outputs {
        None => None,
        Some(_) if !all_files => {
            return Err(Error::Input(
                "--load-outputs compares one sample: give the inputs the golden outputs were made from (--inputs or --input)".into(),
            ))
        }
        Some(p) => Some(
            rout.iter()
                .map(|n| {
                    read_npz_array(p, n)
                        .map(|t| (n.clone(), t))
                        .map_err(|e| Error::Input(format!("cannot read {}[{n}]: {e}", p.display())))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let mut accs: Vec<Acc> = rout.iter().map(|_| Acc::default()).collect();
    if opts.criterion == Criterion::Noise {
        if r.weights.is_empty() {
            notes.push(
                "the reference has no weights to measure its noise by: one rounding of the output is the bound".into(),
            );
        } else {
            // the reference perturbed in place, one draw at a time, each run on its sample; or,
            // stacked, each draw run on every sample: then as many draws as give the observations
            // on their own (samples under one draw are not independent), at most as many as rounds
            let per_sample = ro[0].values().map(|t| t.len()).min().unwrap_or(0).max(1);
            let (fewest, draws) = if stacked {
                (per_sample, NOISE_OBSERVATIONS.div_ceil(per_sample).clamp(1, MAX_DRAWS * data.len()))
            } else {
                let fewest = per_sample * data.len();
                (fewest, NOISE_OBSERVATIONS.div_ceil(fewest).clamp(1, MAX_DRAWS))
            };
            let parts: Vec<(usize, &[HashMap<String, Tensor>])> =
                if stacked { vec![(0, &data[..])] } else { (0..data.len()).map(|s| (s, &data[s..s + 1])).collect() };
            let mut state = Draws::default();
            for (first, part) in parts {
                for k in 0..draws {
                    let loaded = r.loaded.as_mut().expect("the reference is held");
                    perturb_in_place(loaded, &r.weights, draw_seed(opts.seed, first, k), &mut state)?;
                    give_back();
                    let po = run_all(loaded, &facts, reference_plan, part, &stacking)?;
                    notes.extend(po.notes);
                    if let Some(why) = po.unstacked {
                        notes.push(format!("the noise draws ran one sample at a time: {why}"));
                    }
                    for (s, po) in (first..).zip(&po.outs) {
                        for (acc, name) in accs.iter_mut().zip(&rout) {
                            acc.noise(s, &ro[s][name], &po[name], opts.stat);
                        }
                    }
                    give_back();
                }
            }
            if draws > 1 && stacked {
                notes.push(format!(
                    "an output has {fewest} element(s) per sample: {draws} draws of the noise, each for all samples (they run stacked)"
                ));
            } else if draws > 1 {
                notes.push(format!(
                    "an output has {fewest} element(s) over all samples: {draws} draws of the noise per sample"
                ));
            }
            progress.say(true, || "noise measured".into());
        }
    }
    r.let_go();
    // the candidate on every sample
    let Runs { outs: co, notes: cnotes, unstacked, .. } =
        run_all(c.tract()?, &facts, reference_plan, &data, &stacking)?;
    c.let_go();
    notes.extend(cnotes);
    if let Some(why) = unstacked {
        notes.push(format!("the candidate's samples ran one by one: {why}"));
    }
    progress.say(true, || format!("{samples} sample(s) run on the candidate"));
    for (s, (ro, co)) in ro.iter().zip(&co).enumerate() {
        for (acc, name) in accs.iter_mut().zip(&rout) {
            let against = golden.as_ref().map_or(&ro[name], |g| &g[name]);
            acc.compare(s, against, &co[name], opts.atol_of(name), opts.rtol_of(name), opts.stat);
            if let Some(g) = &golden {
                acc.reference_error(&g[name], &ro[name], opts.stat);
            }
        }
    }
    drop(co);
    if let Some(p) = &opts.save_outputs {
        let mut arrays: Vec<(String, Tensor)> = rin.iter().map(|n| (n.clone(), data[0][n].clone())).collect();
        arrays.extend(rout.iter().map(|n| (n.clone(), ro[0][n].clone())));
        write_npz(p, &arrays).map_err(|e| Error::Usage(format!("{}: {e}", p.display())))?;
    }
    let judge = |name: &str| Judge {
        criterion: opts.criterion,
        factor: opts.noise_factor,
        atol: opts.atol_of(name),
        rtol: opts.rtol_of(name),
        stat: opts.stat,
        // one rounding of the output per step of the reference's arithmetic, as a random walk
        unit: unit_of(&r.model, name) * (depth_of(&r.model, name) as f64).sqrt(),
    };
    let outputs: Vec<OutputReport> = rout.iter().zip(accs).map(|(n, acc)| finish(n, acc, &judge(n))).collect();
    let passed = outputs.iter().all(|o| o.passed);
    let divergence = if passed {
        None
    } else {
        let worst = outputs.iter().filter(|o| !o.passed).map(|o| o.worst_sample).next().unwrap_or(0);
        localise(&mut r, &mut c, &facts, &data[worst.min(data.len() - 1)], worst, opts, &mut notes).unwrap_or(None)
    };
    let mut seen = HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    Ok(VerifyReport {
        passed,
        criterion: opts.criterion.to_string(),
        noise_factor: opts.noise_factor,
        stat: opts.stat.to_string(),
        atol: opts.atol,
        rtol: opts.rtol,
        evaluation: if upcast { "float32 upcast".into() } else { "native".into() },
        golden: opts.load_outputs.as_ref().map(|p| p.display().to_string()),
        divergence,
        samples,
        seed: opts.seed,
        inputs: inputs.iter().map(|i| i.spec()).collect(),
        outputs,
        notes,
        reference: reference.display().to_string(),
        candidate: candidate.display().to_string(),
    })
}

/// How [`run_all`] runs the samples of a model.
#[derive(Clone, Debug, PartialEq)]
enum Stacking {
    /// One run per sample, in rounds of one per core.
    Rounds,
    /// Weigh the model first: one run of every sample stacked on axis 0 when its weights are at
    /// least [`STACK_WHEN`] times what a run computes, rounds otherwise.
    Weigh,
    /// One run of every sample stacked on axis 0, whose outputs split into these per-sample
    /// shapes (by output name); rounds when the model does not type or split so.
    Stacked(HashMap<String, Vec<usize>>),
}

/// The samples run stacked, as one batch, when the weights are at least this many times the
/// elements a run computes (inputs and activations): a run of tract's un-optimised plan copies
/// and packs every weight, so one run of N samples saves N − 1 passes over the weights, but
/// spreads only its matrix products over the cores where rounds keep every core busy. Measured:
/// a ResNet-152 ACNet at 3× width at 64×64 (weights 23× what a run computes) runs its 3 samples
/// stacked in 0.53–0.64× the rounds' time; ResNet-50 and ResNet-152 ACNets at 224×224 (weights
/// 0.56× and 0.63×) in 0.95–1.32× (benches/perf.rs, three runs).
pub(crate) const STACK_WHEN: u64 = 4;

/// One model's outputs on every sample, as [`run_all`] made them.
struct Runs {
    /// per sample, every output by name
    outs: Vec<HashMap<String, Tensor>>,
    /// the output and input names, in model order
    outputs: Vec<String>,
    inputs: Vec<String>,
    /// what the planning noted
    notes: Vec<String>,
    /// the samples ran as one batch
    stacked: bool,
    /// the elements of the weights and of what a run computes, when the model was weighed
    weighed: Option<(u64, u64)>,
    /// why the samples did not run stacked, when they were to
    unstacked: Option<String>,
}

/// Outputs of one model's plan (built as `spec` says) on every sample, run as `stacking` says.
fn run_all(
    m: &Loaded,
    facts: &[InputFact],
    spec: PlanSpec,
    data: &[HashMap<String, Tensor>],
    stacking: &Stacking,
) -> Result<Runs, Error> {
    let mut notes = vec![];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut single, mut weighed, mut unstacked) = (None, None, None);
    let mut per_sample = match stacking {
        Stacking::Stacked(shapes) if data.len() > 1 => Some(shapes.clone()),
        _ => None,
    };
    if data.len() > 1 && *stacking == Stacking::Weigh {
        let (plan, inputs, outputs) = prepare(m, facts, &mut notes, spec)?;
        let (weights, activations) = weigh(&plan);
        if weights >= STACK_WHEN.saturating_mul(activations) {
            per_sample = outputs.iter().zip(output_shapes(&plan)).map(|(n, s)| Some((n.clone(), s?))).collect();
        }
        weighed = Some((weights, activations));
        single = Some((plan, inputs, outputs));
    }
    if let Some(shapes) = per_sample {
        let tried = single.take();
        match run_stacked(m, facts, spec, data, &shapes, cores) {
            Ok((outs, inputs, outputs, mut planned)) => {
                notes.append(&mut planned);
                return Ok(Runs { outs, outputs, inputs, notes, stacked: true, weighed, unstacked });
            }
            Err(why) => {
                unstacked = Some(why);
                single = tried;
            }
        }
    }
    let (plan, inputs, outputs) = match single {
        Some(p) => p,
        None => prepare(m, facts, &mut notes, spec)?,
    };
    // the samples in rounds of one per core (a plan runs from several threads); a last round of
    // fewer samples than cores spreads each run over the cores left over (3 samples on 2 cores:
    // two side by side, then the third on both)
    let whole = data.len() / cores * cores;
    let (rounds, last) = data.split_at(whole);
    let mut outs = Vec::with_capacity(data.len());
    for (part, per_run) in [(rounds, 1), (last, cores / last.len().max(1))] {
        if part.is_empty() {
            continue;
        }
        let threads = cores.min(part.len());
        let run_one = |d: &HashMap<String, Tensor>| on_threads(per_run, || run(&m.path, &plan, &inputs, &outputs, d));
        let runs: Vec<Result<Vec<_>, Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = part
                .chunks(part.len().div_ceil(threads))
                .map(|chunk| scope.spawn(move || chunk.iter().map(run_one).collect()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        for r in runs {
            outs.extend(r?);
        }
    }
    Ok(Runs { outs, outputs, inputs, notes, stacked: false, weighed, unstacked })
}

/// Every sample stacked on axis 0 and run once on every core; the outputs split back into the
/// samples' `shapes`. `Err` says why the samples cannot run so (the model does not type with
/// the stacked inputs, an output does not split into the samples' shapes, the run fails).
#[allow(clippy::type_complexity)]
fn run_stacked(
    m: &Loaded,
    facts: &[InputFact],
    spec: PlanSpec,
    data: &[HashMap<String, Tensor>],
    shapes: &HashMap<String, Vec<usize>>,
    cores: usize,
) -> Result<(Vec<HashMap<String, Tensor>>, Vec<String>, Vec<String>, Vec<String>), String> {
    let n = data.len();
    let mut stacked_facts = facts.to_vec();
    for f in &mut stacked_facts {
        match f.shape.first_mut() {
            Some(d) => *d *= n,
            None => return Err(format!("input `{}` is a scalar", f.name)),
        }
    }
    let mut notes = vec![];
    let (plan, inputs, outputs) =
        prepare(m, &stacked_facts, &mut notes, spec).map_err(|e| format!("stacked on axis 0 it does not type: {e}"))?;
    for (name, got) in outputs.iter().zip(output_shapes(&plan)) {
        let splits = match (got, shapes.get(name)) {
            (Some(got), Some(one)) => {
                !one.is_empty() && got.len() == one.len() && got[0] == one[0] * n && got[1..] == one[1..]
            }
            _ => false,
        };
        if !splits {
            return Err(format!("stacked on axis 0, output `{name}` does not split into the samples' outputs"));
        }
    }
    let mut batch = HashMap::new();
    for name in &inputs {
        let parts: Vec<&Tensor> = data.iter().map(|d| &d[name]).collect();
        let t = Tensor::stack_tensors(0, &parts).map_err(|e| format!("cannot stack input `{name}`: {e}"))?;
        batch.insert(name.clone(), t);
    }
    let out = on_threads(cores, || run(&m.path, &plan, &inputs, &outputs, &batch))
        .map_err(|e| format!("the stacked run failed: {e}"))?;
    drop(batch);
    let mut outs: Vec<HashMap<String, Tensor>> = (0..n).map(|_| HashMap::new()).collect();
    for (name, t) in out {
        let b = t.shape()[0] / n;
        for (s, o) in outs.iter_mut().enumerate() {
            let part = t.slice(0, s * b, (s + 1) * b).map_err(|e| format!("cannot split output `{name}`: {e}"))?;
            o.insert(name.clone(), part);
        }
    }
    Ok((outs, inputs, outputs, notes))
}

/// The first tensor, in the candidate's node order, that both models compute under the same name
/// and whose difference is more than the noise factor times the reference's noise there (both
/// measured on one sample, `data`). Best effort: `Ok(None)` when none is found.
fn localise(
    r: &mut Prepared,
    c: &mut Prepared,
    facts: &[InputFact],
    data: &HashMap<String, Tensor>,
    sample: usize,
    opts: &VerifyOptions,
    notes: &mut Vec<String>,
) -> Result<Option<Divergence>, Error> {
    // the reference was perturbed in place: loaded again
    r.let_go();
    r.tract()?;
    c.tract()?;
    let (r, c) = (&*r, &*c);
    let (rt, ct) = (r.loaded.as_ref().expect("loaded"), c.loaded.as_ref().expect("loaded"));
    let inputs: HashSet<&str> = r.model.graph().input.iter().map(|v| v.name()).collect();
    let in_reference: HashSet<&str> =
        r.model.graph().node.iter().flat_map(|n| n.output.iter().map(|s| s.as_str())).collect();
    let mut names: Vec<String> = Vec::new();
    let mut writer: HashMap<String, (String, String)> = HashMap::new();
    for n in &c.model.graph().node {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if in_reference.contains(o.as_str())
                && !inputs.contains(o.as_str())
                && rt.has_tensor(o)
                && ct.has_tensor(o)
                && !names.contains(o)
            {
                names.push(o.clone());
                writer.insert(o.clone(), (n.label().to_string(), n.op_type().to_string()));
            }
        }
    }
    if names.is_empty() {
        return Ok(None);
    }
    let spec = PlanSpec { kind: PlanKind::Reference, perturb: None, outputs: Some(&names) };
    let mut scratch = vec![];
    let (rp, rin, rout) = prepare(rt, facts, &mut scratch, spec)?;
    let ro = run(&rt.path, &rp, &rin, &rout, data)?;
    drop(rp);
    let (cp, cin, cout) = prepare(ct, facts, &mut scratch, spec)?;
    let co = run(&ct.path, &cp, &cin, &cout, data)?;
    drop(cp);
    let po = if r.weights.is_empty() {
        None
    } else {
        let spec = PlanSpec { perturb: Some((&r.weights, opts.seed ^ 0x9e37_79b9)), ..spec };
        let (pp, pin, pout) = prepare(rt, facts, &mut scratch, spec)?;
        Some(run(&rt.path, &pp, &pin, &pout, data)?)
    };
    for (k, name) in names.iter().enumerate() {
        let mut acc = Acc::default();
        acc.compare(sample, &ro[name], &co[name], 0.0, 0.0, Stat::Max);
        if let Some(po) = &po {
            acc.noise(sample, &ro[name], &po[name], Stat::Max);
        }
        let judge = Judge {
            criterion: Criterion::Noise,
            factor: opts.noise_factor,
            atol: 0.0,
            rtol: 0.0,
            stat: Stat::Max,
            unit: f64::powi(2.0, -24),
        };
        let o = finish(name, acc, &judge);
        if !o.passed {
            let (node, op) = writer[name].clone();
            let scale = o.noise.unwrap_or(0.0).max(o.noise_floor.unwrap_or(0.0));
            return Ok(Some(Divergence {
                tensor: name.clone(),
                node,
                op,
                sample,
                error: o.error,
                noise: scale,
                ratio: o.ratio.unwrap_or(f64::INFINITY),
                compared: k + 1,
            }));
        }
    }
    notes.push(format!("no tensor the two models share diverges ({} compared); the outputs do", names.len()));
    Ok(None)
}
