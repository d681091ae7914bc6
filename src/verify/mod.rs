//! The equivalence check: runs a reference and a candidate ONNX model in tract on identical
//! inputs ([`inputs`]) and compares every output element-wise ([`compare`]) into a report
//! ([`report`]).
//!
//! Models are loaded **by path** (tract resolves ONNX external data relative to the model's
//! folder), their input facts are pinned to concrete shapes, and they run as *typed but not
//! decluttered / optimised* plans ([`PlanKind::Reference`](crate::tract::PlanKind)): tract's
//! optimiser folds BatchNormalization into convolutions and merges identical siblings, which
//! could hide the very mistakes this check is meant to find.
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

pub(crate) mod compare;
pub(crate) mod inputs;
pub(crate) mod report;

pub use inputs::MAX_INPUT_ELEMENTS;
pub use report::{InputSpec, OutputReport, VerifyReport};

use crate::error::Error;
use crate::tract::{load, prepare, run, Loaded, PlanKind};
use compare::{compare_into, finish, Acc};
use inputs::{resolve_inputs, sample};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of [`verify`].
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

impl VerifyOptions {
    /// Check the options make sense; the message names the option (as `samples`, `atol` ...).
    pub fn validate(&self) -> Result<(), String> {
        if self.samples == 0 {
            return Err("samples must be at least 1".into());
        }
        for (what, v) in [("atol", self.atol), ("rtol", self.rtol)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{what} must be a finite number >= 0, got {v}"));
            }
        }
        Ok(())
    }
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

/// Both models must have the same input and output names.
pub(crate) fn check_signature(r: &Loaded, c: &Loaded) -> Result<(), Error> {
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

/// Checks that `candidate` computes the same function as `reference` (see the module docs).
///
/// `Ok(report)` whenever both models ran; `report.passed` tells whether they agree.
/// `Err(_)` when the check could not be made.
pub fn verify(reference: &Path, candidate: &Path, opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    let progress = Progress { on: opts.progress, start: Instant::now(), last: std::cell::Cell::new(None) };
    opts.validate().map_err(Error::Input)?;
    let r = load(reference)?;
    let c = load(candidate)?;
    check_signature(&r, &c)?;
    let mut notes = vec![];
    let inputs = resolve_inputs(&r, &c, opts, &mut notes)?;
    progress.say(true, || "models loaded".into());
    let facts: Vec<_> = inputs.iter().map(|i| i.fact()).collect();
    let (rplan, rin, rout) = prepare(r, &facts, &mut notes, PlanKind::Reference)?;
    let (cplan, cin, cout) = prepare(c, &facts, &mut notes, PlanKind::Reference)?;
    progress.say(true, || "models typed".into());

    let all_files = inputs.iter().all(|i| i.data.is_some());
    let samples = if all_files { 1 } else { opts.samples };
    if all_files && opts.samples != 1 {
        notes.push("every input comes from a file: one sample".into());
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut accs: Vec<Acc> = rout.iter().map(|_| Acc::default()).collect();
    for s in 0..samples {
        let data = sample(&inputs, &mut rng)?;
        let ro = run(reference, &rplan, &rin, &rout, &data)?;
        let co = run(candidate, &cplan, &cin, &cout, &data)?;
        for (acc, name) in accs.iter_mut().zip(&rout) {
            compare_into(acc, s, &ro[name], &co[name], opts.atol, opts.rtol);
        }
        progress.say(s + 1 == samples, || format!("sample {}/{} done", s + 1, samples));
    }
    let outputs: Vec<OutputReport> = rout.iter().zip(accs).map(|(n, acc)| finish(n, acc)).collect();
    let mut seen = HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    Ok(VerifyReport {
        passed: outputs.iter().all(|o| o.passed),
        atol: opts.atol,
        rtol: opts.rtol,
        samples,
        seed: opts.seed,
        inputs: inputs.iter().map(|i| i.spec()).collect(),
        outputs,
        notes,
        reference: reference.display().to_string(),
        candidate: candidate.display().to_string(),
    })
}
