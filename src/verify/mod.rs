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
//! few non-zero elements, see [`NOISE_OBSERVATIONS`]), and the candidate passes
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
//! reference's weights are at least [`STACK_WHEN`](run::STACK_WHEN) times the elements a run computes: tract's
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
//!
//! # Cuts
//!
//! A node tract cannot run — of a domain tract does not implement (whatever its name: tract
//! looks operators up by name alone), of an operator it has no implementation of, one whose
//! builder refuses it, or one it refuses to type for the inputs it gets ([`Error::Refused`]) —
//! does not stop the check: both models are cut at it ([`cut`]). Its inputs become compared
//! outputs, its outputs inputs of the parts after it, and every part between the cuts is checked
//! as a model of its own ([`parts`]), with the criterion above. The cut nodes pair by the
//! tensor they write first (the rewrite keeps tensor names), and each must be the same in both
//! models — operator, domain, attributes, the tensors it reads and writes, its constant
//! inputs' values — or the check fails saying how it differs: the check cannot run it.
//!
//! A part reads the graph inputs (the values the whole check would draw) and its *cut tensors*:
//! the outputs of cut nodes and the tensors earlier parts compute for it, random values drawn
//! as graph inputs are (seeded with the seed and the part's number, sample after sample, in
//! the part's input order), the same for both models. Their type and shape: a tensor an earlier
//! part computed, as it computed it; a cut node's output, as a model declares it (`value_info`,
//! the reference's first), a symbolic dim named like a symbolic dim of a graph input taking the
//! value chosen for that, and what tract's analysis of the part fixes from the operators that
//! read it (a Conv its channels). A part whose cut tensor's size is still not known cannot run:
//! when the models' parts are the same nodes with the same weights, nothing is lost; otherwise
//! the report's `checked` is false, and `passed` too unless [`VerifyOptions::allow_unchecked`].
//! Constants stay constants in every part that reads them.

pub(crate) mod check;
pub(crate) mod compare;
mod cut;
pub(crate) mod inputs;
mod noise;
mod options;
mod parts;
mod prepared;
pub(crate) mod report;
mod run;

pub(crate) use check::check_signature;
pub use check::{MAX_DRAWS, NOISE_OBSERVATIONS};
pub use inputs::MAX_INPUT_ELEMENTS;
pub use options::{Criterion, Stat, VerifyOptions, NOISE_FACTOR};
pub use report::{CutNode, Divergence, InputSpec, OutputReport, PartReport, VerifyReport};

use crate::error::Error;
use crate::model::transform::has_half;
use crate::model::Model;
use crate::tract::{unknown_nodes, unrunnable_nodes, InputFact};
use check::{batch_axis, check, Checked, Progress};
use inputs::{draw_inputs, write_npz, Drawn};
use parts::{verify_cut, Unrunnable};
use prepared::{load_error, prepare_model, Prepared};
use std::collections::HashSet;
use std::path::Path;
use tract_onnx::prelude::Tensor;

/// The most nodes the check cuts at because tract refuses them for their inputs (each is found
/// by typing the models again): past that, the check is not made.
const MAX_REFUSED: usize = 64;

/// Checks that `candidate` computes the same function as `reference` (see the module docs).
///
/// `Ok(report)` whenever both models ran (whole, or in parts around the nodes tract cannot
/// run); `report.passed` tells whether they agree, [`VerifyReport::exit_code`] what a command
/// line says. `Err(_)` when the check could not be made.
pub fn verify(reference: &Path, candidate: &Path, opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    let progress = Progress::new(opts.progress);
    opts.validate().map_err(Error::Input)?;
    let mut notes = vec![];
    let half = |p: &Path| Model::load(p).map(|m| has_half(&m)).map_err(|e| load_error(p, e));
    let upcast = half(reference)? || half(candidate)?;
    let mut r = prepare_model(reference, opts, upcast, &mut notes)?;
    let mut c = prepare_model(candidate, opts, upcast, &mut notes)?;
    let mut cut = Unrunnable { r: unknown_nodes(&r.model), c: unknown_nodes(&c.model) };
    if cut.is_empty() {
        // tract runs both models whole, unless its builder of an operator refuses a node (found
        // by parsing the models) or it refuses a node for the inputs it gets
        match whole(&mut r, &mut c, reference, candidate, upcast, opts, notes.clone(), &progress) {
            Err(Error::Refused { node, msg, .. }) if cut.add_refused(&r.model, &c.model, &node, &msg) => {}
            Err(e @ Error::Unsupported { .. }) => {
                cut = Unrunnable { r: unrunnable_nodes(&r.model), c: unrunnable_nodes(&c.model) };
                if cut.is_empty() {
                    return Err(e);
                }
            }
            done => return done,
        }
        r.let_go();
        c.let_go();
    } else {
        cut = Unrunnable { r: unrunnable_nodes(&r.model), c: unrunnable_nodes(&c.model) };
    }
    for _ in 0..MAX_REFUSED {
        match verify_cut(&r, &c, &cut, reference, candidate, upcast, opts, notes.clone(), &progress) {
            Err(Error::Refused { node, msg, .. }) if cut.add_refused(&r.model, &c.model, &node, &msg) => {}
            done => return done,
        }
    }
    Err(Error::Run {
        path: reference.to_path_buf(),
        msg: format!("tract refuses more than {MAX_REFUSED} of its nodes for their inputs: not checked"),
    })
}

/// The check of two models tract runs whole.
#[allow(clippy::too_many_arguments)]
fn whole(
    r: &mut Prepared,
    c: &mut Prepared,
    reference: &Path,
    candidate: &Path,
    upcast: bool,
    opts: &VerifyOptions,
    mut notes: Vec<String>,
    progress: &Progress,
) -> Result<VerifyReport, Error> {
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
    let Drawn { inputs, all_files, data } = draw_inputs(r, &rsig, &csig, opts, &mut notes)?;
    progress.say(true, || "models loaded".into());
    let facts: Vec<InputFact> = inputs.iter().map(|i| i.fact()).collect();
    let stack = batch_axis(&rsig) && batch_axis(&csig);
    let Checked { outputs, divergence, first } =
        check(r, c, &facts, &data, stack, all_files, opts, &mut notes, progress)?;
    if let Some(p) = &opts.save_outputs {
        let mut arrays: Vec<(String, Tensor)> = rsig.inputs.iter().map(|n| (n.clone(), data[0][n].clone())).collect();
        arrays.extend(rsig.outputs.iter().map(|n| (n.clone(), first[n].clone())));
        write_npz(p, &arrays).map_err(|e| Error::Usage(format!("{}: {e}", p.display())))?;
    }
    let passed = outputs.iter().all(|o| o.passed);
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
        samples: data.len(),
        seed: opts.seed,
        inputs: inputs.iter().map(|i| i.spec()).collect(),
        outputs,
        notes,
        reference: reference.display().to_string(),
        candidate: candidate.display().to_string(),
        checked: true,
        cuts: None,
        parts: None,
    })
}
