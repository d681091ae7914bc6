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

pub(crate) mod check;
pub(crate) mod compare;
pub(crate) mod inputs;
mod noise;
mod options;
mod prepared;
pub(crate) mod report;
mod run;

pub(crate) use check::check_signature;
pub use check::{verify, MAX_DRAWS, NOISE_OBSERVATIONS};
pub use inputs::MAX_INPUT_ELEMENTS;
pub use options::{Criterion, Stat, VerifyOptions, NOISE_FACTOR};
pub use report::{Divergence, InputSpec, OutputReport, VerifyReport};
