//! Plans: a loaded model typed at concrete input shapes, as the check runs it (typed, not
//! decluttered or optimised) or as a deployment runs it (optimised); and running one.

use super::errors::{chain_msg, describe_failure, failure, panic_msg, summarize, Failure};
use super::load::{decl_dims, DeclDim, Loaded};
use super::safety::{unrunnable, MAX_TENSOR_ELEMENTS};
use crate::error::{catch, Error};
use crate::model::tensor::FloatType;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::GenericFactoid;

pub(crate) type Plan = Arc<TypedSimplePlan>;

/// Which plan to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlanKind {
    /// Typed, NOT decluttered or optimised: each model computes its own graph as written.
    /// tract's optimiser folds BatchNormalization into convolutions and merges identical
    /// siblings; running optimised graphs could hide the very mistakes the check is meant to
    /// find. What the equivalence check runs.
    Reference,
    /// tract's decluttered and optimised plan: what a deployment runs (latency measurements).
    Optimised,
}

/// One input pinned to a concrete type and shape.
#[derive(Clone, Debug)]
pub(crate) struct InputFact {
    pub name: String,
    pub dt: DatumType,
    pub shape: Vec<usize>,
}

/// What plan to build from a loaded model.
#[derive(Clone, Copy)]
pub(crate) struct PlanSpec<'a> {
    pub kind: PlanKind,
    /// Move every listed constant (by tract node name: the initializer's name, or the Constant
    /// node's) one unit in the last place of its stored type, up or down at random (seeded).
    pub perturb: Option<(&'a HashMap<String, FloatType>, u64)>,
    /// Compute these tensors (by ONNX name) instead of the model's outputs.
    pub outputs: Option<&'a [String]>,
}

impl PlanSpec<'_> {
    pub fn of(kind: PlanKind) -> PlanSpec<'static> {
        PlanSpec { kind, perturb: None, outputs: None }
    }
}

/// The runnable plan of `m` with its inputs pinned to `inputs`' types and shapes, and its input
/// and output names.
pub(crate) fn prepare(
    m: &Loaded,
    inputs: &[InputFact],
    notes: &mut Vec<String>,
    spec: PlanSpec,
) -> Result<(Plan, Vec<String>, Vec<String>), Error> {
    let (path, mut model, in_names) = (m.path.clone(), m.model.clone(), m.inputs.clone());
    let out_names = spec.outputs.map(|o| o.to_vec()).unwrap_or_else(|| m.outputs.clone());
    let run_err = |msg: String| Error::Run { path: path.clone(), msg };
    // A fixed input dim overridden by the user (e.g. batch 1 -> 2) contradicts the shapes the
    // exporter wrote in `value_info`: they are forgotten (tract infers shapes by itself).
    let mut overridden = false;
    for (ix, name) in in_names.iter().enumerate() {
        let ri = inputs.iter().find(|i| &i.name == name).expect("resolved input");
        let fact = model.input_fact(ix).map_err(|e| run_err(chain_msg(&e)))?;
        if let Some(dims) = decl_dims(&fact.shape) {
            overridden |= dims.iter().zip(&ri.shape).any(|(d, v)| matches!(d, DeclDim::Fixed(x) if x != v));
        }
    }
    if overridden {
        forget_declared_facts(&mut model).map_err(|e| run_err(chain_msg(&e)))?;
        notes.push(format!("{}: value_info shapes ignored (a fixed input dim was overridden)", path.display()));
    }
    // substitute the symbols of the declared input dims by the chosen values everywhere
    let mut subs: HashMap<Symbol, TDim> = HashMap::new();
    for (ix, name) in in_names.iter().enumerate() {
        let ri = inputs.iter().find(|i| &i.name == name).expect("resolved input");
        let fact = model.input_fact(ix).map_err(|e| run_err(chain_msg(&e)))?.clone();
        if !fact.shape.is_open() {
            for (d, v) in fact.shape.dims().zip(&ri.shape) {
                if let GenericFactoid::Only(TDim::Sym(s)) = d {
                    subs.insert(s.clone(), (*v as i64).to_dim());
                }
            }
        }
    }
    let typed = catch(|| -> TractResult<TypedModel> {
        if !subs.is_empty() {
            model.set_symbols(&subs)?;
        }
        if let Some((which, seed)) = spec.perturb {
            super::perturb::perturb(&mut model, which, seed)?;
        }
        if let Some(names) = spec.outputs {
            let outlets = names
                .iter()
                .map(|n| model.find_outlet_label(n).ok_or_else(|| anyhow::anyhow!("no tensor '{n}' in the model")))
                .collect::<TractResult<Vec<_>>>()?;
            model.select_output_outlets(&outlets)?;
        }
        for (ix, name) in in_names.iter().enumerate() {
            let ri = inputs.iter().find(|i| &i.name == name).expect("resolved input");
            model.set_input_fact(ix, InferenceFact::dt_shape(ri.dt, ri.shape.iter().copied()))?;
        }
        model.into_typed()
    });
    // refuse before running what tract would crash on
    if let Ok(Ok(typed)) = &typed {
        if let Some(msg) = unrunnable(typed, MAX_TENSOR_ELEMENTS) {
            return Err(run_err(msg));
        }
    }
    let res = typed.map(|t| {
        t.and_then(|typed| {
            catch(|| -> TractResult<Plan> {
                match spec.kind {
                    PlanKind::Optimised => typed.into_optimized()?.into_runnable(),
                    PlanKind::Reference => typed.into_runnable(),
                }
            })
            .unwrap_or_else(|p| Err(anyhow::anyhow!("{}", panic_msg(p))))
        })
    });
    match res {
        Err(p) => Err(run_err(panic_msg(p))),
        Ok(Err(e)) => {
            let Failure { unimplemented, node, msg } = failure(&path, &e);
            match (unimplemented, node) {
                (Some(op), _) => Err(Error::Unsupported { path, op }),
                (None, _) if overridden => Err(run_err(summarize(&format!(
                    "cannot type the model with the requested input shape (it overrides a fixed \
                     dim the model declares; the model may not support it): {msg}"
                )))),
                // a node tract refuses for these inputs: the check can cut the models there
                (None, Some(node)) => Err(Error::Refused { path, node, msg: format!("cannot type the model: {msg}") }),
                (None, None) => Err(run_err(format!("cannot type the model: {msg}"))),
            }
        }
        Ok(Ok(plan)) => Ok((plan, in_names, out_names)),
    }
}

/// Every fact of `model` that its file declared (`value_info`, the outputs' types), forgotten:
/// the model as tract's loader reads it `with_ignore_value_info`, without reading the file again
/// — which would also undo the noise criterion's in-place moves of the weights (see
/// [`super::perturb`]). The inputs' facts are pinned by the caller; the constants keep theirs.
fn forget_declared_facts(model: &mut InferenceModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::konst::Const;
    let inputs: std::collections::HashSet<usize> = model.input_outlets()?.iter().map(|o| o.node).collect();
    for id in 0..model.nodes().len() {
        if inputs.contains(&id) || model.node(id).op_as::<Const>().is_some() {
            continue;
        }
        for slot in 0..model.node(id).outputs.len() {
            model.set_outlet_fact(OutletId::new(id, slot), InferenceFact::default())?;
        }
    }
    Ok(())
}

/// Run `f` with tract's matrix products spread over `threads` threads (a pool kept per count);
/// `threads` ≤ 1 runs it as it is. The check runs a single sample this way on every core.
pub(crate) fn on_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    use std::sync::{Mutex, OnceLock};
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    static POOLS: OnceLock<Mutex<HashMap<usize, Executor>>> = OnceLock::new();
    if threads <= 1 {
        return f();
    }
    let pool = {
        let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        pools.entry(threads).or_insert_with(|| Executor::multithread_with_name(threads, "acnet-onnx-check")).clone()
    };
    multithread_tract_scope(pool, f)
}

/// Run a plan on `data` (by input name); its outputs by name.
pub(crate) fn run(
    path: &Path,
    plan: &Plan,
    in_names: &[String],
    out_names: &[String],
    data: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, Error> {
    let run_err = |msg: String| Error::Run { path: path.to_path_buf(), msg };
    let inputs: TVec<TValue> = in_names.iter().map(|n| data[n].clone().into_tvalue()).collect();
    let res = catch(|| plan.run(inputs));
    let outs = match res {
        Err(p) => return Err(run_err(panic_msg(p))),
        Ok(Err(e)) => return Err(run_err(describe_failure(path, &e).1)),
        Ok(Ok(o)) => o,
    };
    if outs.len() != out_names.len() {
        return Err(run_err(format!("model produced {} outputs, expected {}", outs.len(), out_names.len())));
    }
    Ok(out_names.iter().cloned().zip(outs.into_iter().map(|v| v.into_tensor())).collect())
}

/// What one run of a typed plan handles: the elements of its constants (the weights) and of
/// every tensor its other nodes compute (inputs and activations), as typed.
pub(crate) fn weigh(plan: &Plan) -> (u64, u64) {
    use tract_onnx::tract_core::ops::konst::Const;
    let (mut weights, mut activations) = (0u64, 0u64);
    for node in plan.model().nodes() {
        let size: u64 = node
            .outputs
            .iter()
            .map(|o| o.fact.shape.as_concrete().map_or(0, |s| s.iter().product::<usize>() as u64))
            .sum();
        if node.op_is::<Const>() {
            weights += size;
        } else {
            activations += size;
        }
    }
    (weights, activations)
}

/// The shape of every output of a typed plan, in output order (`None` where it is not concrete).
pub(crate) fn output_shapes(plan: &Plan) -> Vec<Option<Vec<usize>>> {
    let model = plan.model();
    model
        .outputs
        .iter()
        .map(|o| model.outlet_fact(*o).ok().and_then(|f| f.shape.as_concrete().map(|s| s.to_vec())))
        .collect()
}

/// What is known of one input of a model: its type, and its dims (`None` where one is not known;
/// `dims` `None` when not even the rank is).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PartialFact {
    pub name: String,
    pub dt: Option<DatumType>,
    pub dims: Option<Vec<Option<usize>>>,
}

impl PartialFact {
    /// The input pinned to its type and shape, when both are wholly known.
    pub fn concrete(&self) -> Option<InputFact> {
        let shape = self.dims.as_ref()?.iter().copied().collect::<Option<Vec<usize>>>()?;
        Some(InputFact { name: self.name.clone(), dt: self.dt?, shape })
    }
}

/// What tract's analysis of `m` fixes about its inputs once what is `known` of them is pinned
/// (the operators that read an input constrain it: a Conv its channels, a Concat the dims
/// besides its axis, ...): per input of `known`, its type and dims as known after the analysis.
/// Best effort: what the analysis cannot tell (or where it fails) stays as it was known.
pub(crate) fn infer_inputs(m: &Loaded, known: &[PartialFact]) -> Vec<PartialFact> {
    use tract_onnx::tract_hir::infer::{Factoid, ShapeFactoid};
    let mut model = m.model.clone();
    let analysed = catch(|| -> TractResult<()> {
        for (ix, name) in m.inputs.iter().enumerate() {
            let Some(k) = known.iter().find(|k| &k.name == name) else { continue };
            let mut fact = InferenceFact::default();
            if let Some(dt) = k.dt {
                fact = fact.with_datum_type(dt);
            }
            if let Some(dims) = &k.dims {
                let dims = dims.iter().map(|d| match d {
                    Some(v) => GenericFactoid::Only((*v as i64).to_dim()),
                    None => GenericFactoid::Any,
                });
                fact = fact.with_shape(ShapeFactoid::closed(dims.collect()));
            }
            model.set_input_fact(ix, fact)?;
        }
        let _ = model.analyse(true);
        Ok(())
    });
    if !matches!(analysed, Ok(Ok(()))) {
        return known.to_vec();
    }
    known
        .iter()
        .map(|k| {
            let Some(ix) = m.inputs.iter().position(|n| n == &k.name) else { return k.clone() };
            let Ok(fact) = model.input_fact(ix) else { return k.clone() };
            let dt = k.dt.or(fact.datum_type.concretize());
            let dims = match decl_dims(&fact.shape) {
                Some(d) => Some(
                    d.iter()
                        .enumerate()
                        .map(|(i, d)| match d {
                            DeclDim::Fixed(v) => Some(*v),
                            _ => k.dims.as_ref().and_then(|k| k.get(i).copied().flatten()),
                        })
                        .collect(),
                ),
                None => k.dims.clone(),
            };
            PartialFact { name: k.name.clone(), dt, dims }
        })
        .collect()
}
