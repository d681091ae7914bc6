//! Plans: a loaded model typed at concrete input shapes, as the check runs it (typed, not
//! decluttered or optimised) or as a deployment runs it (optimised); and running one.

use super::errors::{chain_msg, describe_failure, panic_msg, summarize};
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

/// `v` (stored as `ft`) moved by its rounding: when the evaluation type is wider than the stored
/// one (half precision upcast to float32), by a uniform random fraction of half a unit in the
/// last place of `ft`, as rounding to `ft` would; otherwise (the stored type is the evaluation
/// type) by one whole unit up or down, the least that type can move. Zero stays zero.
fn rounding_step(v: f64, ft: FloatType, wider: bool, rng: &mut impl rand::Rng) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let up: bool = rng.random();
    let next = |v: f64| -> f64 {
        let toward = if up == (v > 0.0) { 1i64 } else { -1i64 };
        match ft {
            FloatType::F64 => f64::from_bits((v.to_bits() as i64 + toward) as u64),
            FloatType::F32 => f32::from_bits(((v as f32).to_bits() as i64 + toward) as u32) as f64,
            FloatType::F16 => half::f16::from_bits((half::f16::from_f64(v).to_bits() as i64 + toward) as u16).to_f64(),
            FloatType::BF16 => {
                half::bf16::from_bits((half::bf16::from_f64(v).to_bits() as i64 + toward) as u16).to_f64()
            }
        }
    };
    if wider {
        v + (next(v) - v) * 0.5 * rng.random::<f64>()
    } else {
        next(v)
    }
}

/// `t` with every element moved one unit in the last place of `ft`, in random directions.
fn perturbed(t: &Tensor, ft: FloatType, rng: &mut impl rand::Rng) -> TractResult<Tensor> {
    let view = t.try_as_plain_ram()?;
    match t.datum_type() {
        DatumType::F32 => {
            let wider = matches!(ft, FloatType::F16 | FloatType::BF16);
            let v: Vec<f32> =
                view.as_slice::<f32>()?.iter().map(|&v| rounding_step(v as f64, ft, wider, rng) as f32).collect();
            Tensor::from_shape(t.shape(), &v)
        }
        DatumType::F64 => {
            let wider = ft != FloatType::F64;
            let v: Vec<f64> = view.as_slice::<f64>()?.iter().map(|&v| rounding_step(v, ft, wider, rng)).collect();
            Tensor::from_shape(t.shape(), &v)
        }
        DatumType::F16 => {
            let v: Vec<f16> = view
                .as_slice::<f16>()?
                .iter()
                .map(|v| f16::from_f64(rounding_step(v.to_f64(), ft, false, rng)))
                .collect();
            Tensor::from_shape(t.shape(), &v)
        }
        _ => Ok(t.clone()),
    }
}

/// Perturb the listed constants of `model` (see [`PlanSpec::perturb`]).
fn perturb(model: &mut InferenceModel, which: &HashMap<String, FloatType>, seed: u64) -> TractResult<()> {
    use rand::SeedableRng;
    use tract_onnx::tract_core::ops::konst::Const;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids: Vec<(String, usize)> = model
        .nodes()
        .iter()
        .filter(|n| n.op_as::<Const>().is_some() && which.contains_key(&n.name))
        .map(|n| (n.name.clone(), n.id))
        .collect();
    ids.sort();
    for (name, id) in ids {
        let node = model.node_mut(id);
        let t = node.op_as::<Const>().expect("a Const").val().clone();
        let p = perturbed(&t, which[&name], &mut rng)?.into_arc_tensor();
        node.outputs[0].fact = InferenceFact::from(TypedFact::try_from(p.clone())?);
        node.op = Box::new(Const::new(p)?);
    }
    Ok(())
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
        let res = catch(|| tract_onnx::onnx().with_ignore_value_info(true).model_for_path(&m.file));
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
        if let Some((which, seed)) = spec.perturb {
            perturb(&mut model, which, seed)?;
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
