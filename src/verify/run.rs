//! Running one model's plan on every sample: in rounds of one sample per core, or every sample
//! stacked into one batch (see [Memory](super#memory)).

use crate::error::Error;
use crate::tract::{on_threads, output_shapes, prepare, run, weigh, InputFact, Loaded, PlanSpec};
use std::collections::HashMap;
use tract_onnx::prelude::Tensor;

/// How [`run_all`] runs the samples of a model.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Stacking {
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
pub(crate) struct Runs {
    /// per sample, every output by name
    pub(crate) outs: Vec<HashMap<String, Tensor>>,
    /// the output and input names, in model order
    pub(crate) outputs: Vec<String>,
    pub(crate) inputs: Vec<String>,
    /// what the planning noted
    pub(crate) notes: Vec<String>,
    /// the samples ran as one batch
    pub(crate) stacked: bool,
    /// the elements of the weights and of what a run computes, when the model was weighed
    pub(crate) weighed: Option<(u64, u64)>,
    /// why the samples did not run stacked, when they were to
    pub(crate) unstacked: Option<String>,
}

/// Outputs of one model's plan (built as `spec` says) on every sample, run as `stacking` says.
pub(crate) fn run_all(
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
