//! Plans: a loaded model typed at concrete input shapes, as the check runs it (typed, not
//! decluttered or optimised) or as a deployment runs it (optimised); and running one.

use super::errors::{chain_msg, describe_failure, panic_msg, summarize};
use super::load::{decl_dims, DeclDim, Loaded};
use super::safety::{unrunnable, MAX_TENSOR_ELEMENTS};
use crate::error::{catch, Error};
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

/// The runnable plan of `m` with its inputs pinned to `inputs`' types and shapes, and its input
/// and output names.
pub(crate) fn prepare(
    m: Loaded,
    inputs: &[InputFact],
    notes: &mut Vec<String>,
    kind: PlanKind,
) -> Result<(Plan, Vec<String>, Vec<String>), Error> {
    let Loaded { path, mut model, inputs: in_names, outputs: out_names } = m;
    let run_err = |msg: String| Error::Run { path: path.clone(), msg };
    // A fixed input dim overridden by the user (e.g. batch 1 -> 2) contradicts the shapes the
    // exporter wrote in `value_info`; reload without them (tract infers shapes by itself).
    let mut overridden = false;
    for (ix, name) in in_names.iter().enumerate() {
        let ri = inputs.iter().find(|i| &i.name == name).expect("resolved input");
        let fact = model.input_fact(ix).map_err(|e| run_err(chain_msg(&e)))?;
        if let Some(dims) = decl_dims(&fact.shape) {
            overridden |= dims.iter().zip(&ri.shape).any(|(d, v)| matches!(d, DeclDim::Fixed(x) if x != v));
        }
    }
    if overridden {
        let res = catch(|| tract_onnx::onnx().with_ignore_value_info(true).model_for_path(&path));
        model = match res {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(Error::Load { path: path.clone(), msg: chain_msg(&e) }),
            Err(p) => return Err(Error::Load { path: path.clone(), msg: panic_msg(p) }),
        };
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
                match kind {
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
            let (op, msg) = describe_failure(&path, &e);
            match op {
                Some(op) => Err(Error::Unsupported { path, op }),
                None if overridden => Err(run_err(summarize(&format!(
                    "cannot type the model with the requested input shape (it overrides a fixed \
                     dim the model declares; the model may not support it): {msg}"
                )))),
                None => Err(run_err(format!("cannot type the model: {msg}"))),
            }
        }
        Ok(Ok(plan)) => Ok((plan, in_names, out_names)),
    }
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
