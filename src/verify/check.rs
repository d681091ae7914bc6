//! The check of two models on the same inputs: the reference on every sample, its noise, the
//! candidate, every output judged; where they diverge.

use super::compare::{finish, moving_elements, Acc, Judge};
use super::inputs::read_npz_array;
use super::prepared::{give_back, Prepared};
use super::report::{Divergence, OutputReport};
use super::run::{run_all, Runs, Stacking};
use super::{Criterion, Stat, VerifyOptions};
use crate::error::Error;
use crate::graph::Label;
use crate::model::tensor::FloatType;
use crate::model::Model;
use crate::tract::{perturb_in_place, prepare, run, DeclDim, Draws, InputFact, PlanKind, PlanSpec, Signature};
use std::collections::{HashMap, HashSet};
use std::time::Instant;
use tract_onnx::prelude::Tensor;

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
pub(crate) struct Progress {
    on: bool,
    start: Instant,
    last: std::cell::Cell<Option<Instant>>,
}
impl Progress {
    pub(crate) fn new(on: bool) -> Progress {
        Progress { on, start: Instant::now(), last: std::cell::Cell::new(None) }
    }

    pub(crate) fn say(&self, force: bool, msg: impl FnOnce() -> String) {
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

/// The noise criterion sees at least this many perturbed output elements per output: an output
/// with fewer non-zero elements than that over all samples (zeros, as a Relu leaves them, show
/// no movement) gets more draws per sample (at most
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
pub(crate) fn batch_axis(sig: &Signature) -> bool {
    let mut symbol = None;
    sig.inputs.iter().all(|name| match sig.input_decl(name).1.as_deref() {
        Some([DeclDim::Symbol(s), ..]) => symbol.get_or_insert_with(|| s.clone()) == s,
        _ => false,
    })
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

/// What [`check`] found.
pub(crate) struct Checked {
    /// Every output of the models, judged.
    pub outputs: Vec<OutputReport>,
    /// Where the candidate goes wrong, when an output fails and a tensor was found.
    pub divergence: Option<Divergence>,
    /// The reference's outputs on the first sample.
    pub first: HashMap<String, Tensor>,
}

/// The check of `r` against `c` on `data` (every input by name, per sample; `facts` pins the
/// inputs' types and shapes): the reference on every sample (stacked into one batch when
/// `stack`, both models declaring one symbolic batch axis, and the weights outweigh what a run
/// computes), its noise, the candidate; every output judged, and where they diverge when one
/// fails. `all_files`: every input came from a file (golden outputs need it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    r: &mut Prepared,
    c: &mut Prepared,
    facts: &[InputFact],
    data: &[HashMap<String, Tensor>],
    stack: bool,
    all_files: bool,
    opts: &VerifyOptions,
    notes: &mut Vec<String>,
    progress: &Progress,
) -> Result<Checked, Error> {
    let samples = data.len();
    // the reference on every sample (stacked into one batch when both models declare one
    // symbolic batch axis and the weights outweigh what a run computes)
    let reference_plan = PlanSpec::of(PlanKind::Reference);
    let stacking = if samples > 1 && stack { Stacking::Weigh } else { Stacking::Rounds };
    let Runs { outs: ro, outputs: rout, inputs: rin, notes: rnotes, stacked, weighed, unstacked } =
        run_all(r.tract()?, facts, reference_plan, data, &stacking)?;
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
            // (counting the elements that can move: a Relu's zeros show no weight's movement)
            let per_sample = ro.iter().flat_map(|o| o.values()).map(moving_elements).min().unwrap_or(0).max(1);
            let (fewest, draws) = if stacked {
                (per_sample, NOISE_OBSERVATIONS.div_ceil(per_sample).clamp(1, MAX_DRAWS * data.len()))
            } else {
                let fewest = per_sample * data.len();
                (fewest, NOISE_OBSERVATIONS.div_ceil(fewest).clamp(1, MAX_DRAWS))
            };
            let parts: Vec<(usize, &[HashMap<String, Tensor>])> =
                if stacked { vec![(0, data)] } else { (0..data.len()).map(|s| (s, &data[s..s + 1])).collect() };
            let mut state = Draws::default();
            for (first, part) in parts {
                for k in 0..draws {
                    let loaded = r.loaded.as_mut().expect("the reference is held");
                    perturb_in_place(loaded, &r.weights, draw_seed(opts.seed, first, k), &mut state)?;
                    give_back();
                    let po = run_all(loaded, facts, reference_plan, part, &stacking)?;
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
                    "an output has {fewest} non-zero element(s) per sample: {draws} draws of the noise, each for all samples (they run stacked)"
                ));
            } else if draws > 1 {
                notes.push(format!(
                    "an output has {fewest} non-zero element(s) over all samples: {draws} draws of the noise per sample"
                ));
            }
            progress.say(true, || "noise measured".into());
        }
    }
    r.let_go();
    // the candidate on every sample
    let Runs { outs: co, notes: cnotes, unstacked, .. } = run_all(c.tract()?, facts, reference_plan, data, &stacking)?;
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
    let _ = rin;
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
    let divergence = match outputs.iter().find(|o| !o.passed) {
        None => None,
        Some(o) => {
            let worst = o.worst_sample;
            localise(r, c, facts, &data[worst.min(data.len() - 1)], worst, opts, notes).unwrap_or(None)
        }
    };
    let first = ro.into_iter().next().unwrap_or_default();
    Ok(Checked { outputs, divergence, first })
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
    // a name both models compute means the same value only where they read it alike: a graph
    // output, or an input of a node the same in both (name, operator, tensors). A rewrite may
    // give a tensor of the block it replaced another value: a merged Conv that writes the name
    // of the branch it grew from, the block's sum now an Add of it and a residual.
    fn sig(n: &crate::proto::NodeProto) -> (&str, &str, &str, &[String], &[String]) {
        (n.name(), n.op_type(), n.domain(), &n.input, &n.output)
    }
    let alike: HashSet<_> = r.model.graph().node.iter().map(sig).collect();
    let mut read_alike: HashSet<String> = c.model.graph().output.iter().map(|o| o.name().to_string()).collect();
    for n in c.model.graph().node.iter().filter(|n| alike.contains(&sig(n))) {
        read_alike.extend(crate::graph::node_reads(n));
    }
    let mut names: Vec<String> = Vec::new();
    let mut writer: HashMap<String, (String, String)> = HashMap::new();
    for n in &c.model.graph().node {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if in_reference.contains(o.as_str())
                && read_alike.contains(o)
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
