//! The general path: a region between a tensor x and a sum y in which every operator is affine
//! in x with constant parameters (Conv, BatchNormalization, Add/Sub/Mul/Div by constants, Pad,
//! AveragePool, Slice, ScatterND, Transpose, Reshape, Where with constant conditions, shape
//! arithmetic …) is replaced by one Conv when, as a whole, it is one.
//!
//! This is what catches Diverse Branch Block's BN-and-pad, which exporters render as Pad →
//! Transpose → ScatterND chains (dynamo) or hundreds of Shape/Range/Where/ScatterND nodes
//! (TorchScript). The region is cut out as a small model and evaluated in tract at the model's
//! own input size: the bias is its response to zero, the kernel its response to impulses, with
//! the geometry (kernel size, stride, padding, groups) of the largest Conv reading x. The
//! candidate Conv is then checked against the region on random inputs, borders included; a
//! region that does not match is left untouched and reported. Evaluation runs in float32 (tract),
//! so weights found this way carry float32 rounding (~1e-7 relative), unlike the exact f64 rules.

use super::common::{graph, is_op, read_conv};
use super::{Ctx, Outcome, Patch, Refusal, Rewrite};
use crate::graph::{attr_int, default_opset, GraphIndex};
use crate::io::Model;
use crate::kernel::AffineConv;
use crate::proto::{tensor_proto::DataType, type_proto, GraphProto, ModelProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto};
use ndarray::{Array1, ArrayD, IxDyn};
use std::collections::{HashMap, HashSet};
use tract_onnx::prelude::*;

const RULE: &str = "affine_region";

/// Operators whose value depends only on shapes.
fn shape_only(op: &str) -> bool {
    matches!(op, "Shape" | "Size")
}

/// Which inputs of an operator may depend on x for the output to stay affine in x.
fn affine_inputs(n: &NodeProto) -> Option<Vec<usize>> {
    let all = (0..n.input.len()).collect::<Vec<_>>();
    Some(match n.op_type() {
        "Conv" | "BatchNormalization" | "Pad" | "Slice" | "Reshape" | "Transpose" | "Identity" | "Unsqueeze" | "Squeeze"
        | "AveragePool" | "Expand" | "Gather" | "Neg" | "Div" | "Tile" => vec![0],
        "Add" | "Sub" | "Sum" | "Concat" => all,
        "Mul" => all, // at most one of them (checked by the caller)
        "ScatterND" | "ScatterElements" => vec![0, 2],
        "Where" => vec![1, 2],
        "Cast" => {
            let to = attr_int(n, "to", 0);
            if [DataType::Float as i64, DataType::Double as i64, DataType::Float16 as i64, DataType::Bfloat16 as i64].contains(&to) {
                vec![0]
            } else {
                return None;
            }
        }
        _ => return None,
    })
}

struct Region {
    x: String,
    /// nodes whose values depend on x (removed by the rewrite)
    dep: Vec<usize>,
    /// nodes the region needs that do not depend on x (constants, shape arithmetic)
    stat: Vec<usize>,
}

const RANDOM: &[&str] = &["RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"];

/// Whether a tensor's value is fixed once the input shapes are (constants, Shape of anything,
/// and deterministic operators of those).
fn is_static(g: &GraphProto, ix: &GraphIndex, t: &str, memo: &mut HashMap<String, bool>, depth: usize) -> bool {
    if t.is_empty() || ix.constant(g, t).is_some() {
        return true;
    }
    if let Some(&v) = memo.get(t) {
        return v;
    }
    let v = match ix.producer.get(t) {
        None => false,
        Some(&(p, _)) => {
            let n = &g.node[p];
            let sub = n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty());
            if depth > 2000 || sub || !crate::graph::is_default_domain(n) || RANDOM.contains(&n.op_type()) {
                false
            } else if shape_only(n.op_type()) {
                true
            } else {
                n.input.iter().all(|i| is_static(g, ix, i, memo, depth + 1))
            }
        }
    };
    memo.insert(t.to_string(), v);
    v
}

/// Walk back from `y`; `None` when there is no single-input affine region worth taking.
fn find_region(m: &Model, ix: &GraphIndex, y: &str) -> Result<Option<Region>, String> {
    let g = graph(m);
    let mut memo = HashMap::new();
    let mut dep: HashSet<usize> = HashSet::new();
    let mut frontier: HashSet<String> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut stack = vec![y.to_string()];
    while let Some(t) = stack.pop() {
        if !seen.insert(t.clone()) || is_static(g, ix, &t, &mut memo, 0) {
            continue;
        }
        let Some(&(p, _)) = ix.producer.get(&t) else {
            frontier.insert(t);
            continue;
        };
        let n = &g.node[p];
        let ok = affine_inputs(n).is_some_and(|ok| {
            let dep_ins: Vec<usize> = (0..n.input.len()).filter(|&k| !is_static(g, ix, &n.input[k], &mut memo, 0)).collect();
            dep_ins.iter().all(|k| ok.contains(k)) && !(n.op_type() == "Mul" && dep_ins.len() > 1) && n.output.len() == 1 && crate::graph::is_default_domain(n)
        });
        if !ok || frontier.len() > 1 {
            frontier.insert(t);
            continue;
        }
        dep.insert(p);
        stack.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
    }
    if frontier.len() != 1 || !dep.iter().any(|&p| g.node[p].output[0] == y) {
        return Ok(None);
    }
    let x = frontier.into_iter().next().unwrap();
    // tract mis-evaluates (and can corrupt memory on) Pad with negative amounts: refuse them
    for &p in &dep {
        let n = &g.node[p];
        if n.op_type() == "Pad" {
            let pads = match n.input.get(1) {
                Some(t) if !t.is_empty() => super::common::const_i64(m, ix, t).ok(),
                _ => crate::graph::attr_ints(n, "pads"),
            };
            // computed amounts (TorchScript's shape arithmetic) are caught once typed, in `plan`
            if pads.is_some_and(|v| v.iter().any(|&a| a < 0)) {
                return Err(format!("Pad '{}' has negative amounts", n.name()));
            }
        }
    }
    // worth it only when the structural rules cannot do it: something besides Conv/Add/BN/Mul
    if dep.iter().all(|&p| matches!(g.node[p].op_type(), "Conv" | "Add" | "Sum" | "BatchNormalization" | "Mul")) {
        return Ok(None);
    }
    // the static cone the region needs; Shape nodes may read x-dependent tensors that only feed
    // shapes (TorchScript's slice assignment does this): those nodes come along and go too
    let mut stat: HashSet<usize> = HashSet::new();
    let mut stack: Vec<String> = dep.iter().flat_map(|&p| g.node[p].input.iter().cloned()).collect();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(t) = stack.pop() {
        if t.is_empty() || !seen.insert(t.clone()) || t == x {
            continue;
        }
        let Some(&(p, _)) = ix.producer.get(&t) else { continue };
        if dep.contains(&p) || stat.contains(&p) {
            continue;
        }
        if !is_static(g, ix, &t, &mut memo, 0) {
            // an x-dependent tensor outside the region: allowed only as a shape source
            dep.insert(p);
        } else {
            stat.insert(p);
        }
        stack.extend(g.node[p].input.iter().cloned());
    }
    // nothing removed may be read from outside the region
    let inside: HashSet<usize> = dep.union(&stat).copied().collect();
    for &p in &dep {
        for o in &g.node[p].output {
            if o == y {
                continue;
            }
            if ix.outputs.contains(o) || ix.consumers_of(o).iter().any(|c| !inside.contains(c)) {
                return Err(format!("'{o}' inside the region is also used outside it"));
            }
        }
        if g.node[p].input.iter().any(|i| !i.is_empty() && i != &x && ix.producer.get(i).is_none() && ix.constant(g, i).is_none()) {
            return Ok(None);
        }
    }
    let mut dep: Vec<usize> = dep.into_iter().collect();
    dep.sort_unstable();
    let mut stat: Vec<usize> = stat.into_iter().collect();
    stat.sort_unstable();
    Ok(Some(Region { x, dep, stat }))
}

/// Concrete shape of a tensor: from value_info / graph inputs, else from tract's analysis of
/// the whole model (cached). A symbolic batch dim counts as 1.
fn shape_of(m: &Model, ctx: &Ctx, name: &str) -> Result<Vec<usize>, String> {
    let g = graph(m);
    let from_vi = g.value_info.iter().chain(&g.input).find(|v| v.name() == name).and_then(|v| {
        let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
        let dims = &t.shape.as_ref()?.dim;
        dims.iter()
            .enumerate()
            .map(|(i, d)| match &d.value {
                Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => Some(*v as usize),
                _ if i == 0 => Some(1),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
    });
    if let Some(s) = from_vi {
        return Ok(s);
    }
    let mut cache = ctx.shapes.borrow_mut();
    if cache.is_none() {
        *cache = Some(guarded(|| analyse_shapes(m)).unwrap_or_default());
    }
    cache.as_ref().unwrap().get(name).cloned().ok_or_else(|| format!("the size of '{name}' is unknown"))
}

fn analyse_shapes(m: &Model) -> Result<HashMap<String, Vec<usize>>, String> {
    use prost::Message;
    let bytes = m.to_inline().map_err(|e| e.to_string())?.encode_to_vec();
    let onnx = tract_onnx::onnx();
    let mut model = onnx.model_for_read(&mut &bytes[..]).map_err(|e| e.to_string())?;
    let g = graph(m);
    for (k, _) in model.input_outlets().map_err(|e| e.to_string())?.to_vec().iter().enumerate() {
        let v = &g.input.iter().filter(|v| !g.initializer.iter().any(|t| t.name() == v.name())).nth(k);
        let Some(v) = v else { continue };
        let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else { continue };
        let Some(shape) = t.shape.as_ref() else { continue };
        let dims: Vec<usize> = shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => *v as usize,
                _ => 1,
            })
            .collect();
        model = model.with_input_fact(k, f32::fact(&dims).into()).map_err(|e| e.to_string())?;
    }
    let _ = model.analyse(false);
    let mut out = HashMap::new();
    for node in model.nodes() {
        for slot in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, slot);
            if let (Some(label), Ok(fact)) = (model.outlet_label(outlet), model.outlet_fact(outlet)) {
                if let Ok(Some(d)) = fact.shape.as_concrete_finite() {
                    out.insert(label.to_string(), d.to_vec());
                }
            }
        }
    }
    Ok(out)
}

/// The region as a model of its own: input x (concrete shape), output y.
fn submodel(m: &Model, r: &Region, y: &str, shape: &[usize]) -> Result<Vec<u8>, String> {
    use prost::Message;
    let g = graph(m);
    let mut nodes: Vec<usize> = r.dep.iter().chain(&r.stat).copied().collect();
    nodes.sort_unstable();
    let needed: HashSet<&str> = nodes.iter().flat_map(|&p| g.node[p].input.iter().map(|s| s.as_str())).collect();
    let mut inits = Vec::new();
    for t in &g.initializer {
        if needed.contains(t.name()) {
            let mut t = t.clone();
            if crate::io::is_external(&t) {
                t.raw_data = m.raw_bytes(&t).map_err(|e| e.to_string())?;
                t.external_data.clear();
                t.data_location = None;
            }
            inits.push(t);
        }
    }
    let tensor_type = |dims: Option<&[usize]>| TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(DataType::Float as i32),
            shape: dims.map(|d| TensorShapeProto {
                dim: d
                    .iter()
                    .map(|&v| crate::proto::tensor_shape_proto::Dimension {
                        value: Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v as i64)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    };
    let sub = ModelProto {
        ir_version: m.proto.ir_version,
        opset_import: m.proto.opset_import.clone(),
        graph: Some(GraphProto {
            name: Some("region".into()),
            node: nodes.iter().map(|&p| g.node[p].clone()).collect(),
            initializer: inits,
            input: vec![ValueInfoProto { name: Some(r.x.clone()), r#type: Some(tensor_type(Some(shape))), ..Default::default() }],
            output: vec![ValueInfoProto { name: Some(y.to_string()), r#type: Some(tensor_type(None)), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(sub.encode_to_vec())
}

type Plan = TypedRunnableModel;

/// Run tract, turning its panics (it has some on malformed graphs) into errors.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err("tract failed on the region".into()))
}

/// `out` is the number of elements the region's output must have (the Conv's output).
fn plan(bytes: &[u8], shape: &[usize], out: usize) -> Result<std::sync::Arc<Plan>, String> {
    guarded(|| plan_inner(bytes, shape, out))
}

/// No tensor inside a region may hold more than this many times the elements of the region's
/// input or of the Conv's output (or of 64 Ki, whichever is largest): a block's intermediate
/// tensors are a few times those at most, and a Pad or Resize with absurd sizes would otherwise
/// allocate without bound when the region is evaluated.
const GROWTH_LIMIT: usize = 64;

fn plan_inner(bytes: &[u8], shape: &[usize], out: usize) -> Result<std::sync::Arc<Plan>, String> {
    let e = |e: TractError| format!("{e:#}").replace('\n', " ");
    let m = tract_onnx::onnx().model_for_read(&mut &bytes[..]).map_err(e)?;
    let m = m.with_input_fact(0, f32::fact(shape).into()).map_err(e)?.into_typed().map_err(e)?;
    check_sizes(&m, shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)).max(out))?;
    Ok(m.into_optimized().map_err(e)?.into_runnable().map_err(e)?)
}

/// Refuse a region whose tensors are not all of known size, grow past [`GROWTH_LIMIT`] times
/// `size`, or that tract cannot run (see [`crate::verify::unrunnable`]).
fn check_sizes(m: &TypedModel, size: usize) -> Result<(), String> {
    if let Some(node) = m.nodes().iter().find(|n| n.outputs.iter().any(|o| o.fact.shape.as_concrete().is_none())) {
        return Err(format!("the size of '{}' inside the region is not known", node.name));
    }
    let limit = size.max(1 << 16).saturating_mul(GROWTH_LIMIT);
    match crate::verify::unrunnable(m, limit as u128) {
        Some(why) => Err(format!("inside the region: {why}")),
        None => Ok(()),
    }
}

fn eval(p: &std::sync::Arc<Plan>, x: &ArrayD<f32>) -> Result<ArrayD<f64>, String> {
    guarded(|| eval_inner(p, x))
}

fn eval_inner(p: &std::sync::Arc<Plan>, x: &ArrayD<f32>) -> Result<ArrayD<f64>, String> {
    let e = |e: TractError| format!("{e:#}").replace('\n', " ");
    let out = p.run(tvec!(Tensor::from(x.clone()).into())).map_err(e)?;
    let t = out[0].clone().into_tensor();
    let v = t.try_as_plain_ram().map_err(e)?.as_slice::<f32>().map_err(e)?.iter().map(|&v| v as f64).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).map_err(|e| e.to_string())
}

fn recover(m: &Model, ix: &GraphIndex, ctx: &Ctx, r: &Region, y: &str) -> Result<(AffineConv, usize), String> {
    let g = graph(m);
    // the geometry: the largest Conv reading x
    let mut base: Option<(usize, AffineConv)> = None;
    for &p in &r.dep {
        let n = &g.node[p];
        if is_op(n, "Conv") && n.input[0] == r.x {
            // a conv whose weight is computed (e.g. DBB's weight + identity) is evaluated, not read
            let Ok((k, _)) = read_conv(m, ix, ctx, n) else { continue };
            let vol: usize = k.kernel().iter().product();
            if base.as_ref().is_none_or(|(_, b)| vol > b.kernel().iter().product()) {
                base = Some((p, k));
            }
        }
    }
    let (bp, b) = base.ok_or("no Conv reads the region's input")?;
    if b.rank() != 2 || b.dilations.iter().any(|&d| d != 1) {
        return Err("the general path handles 2-d, undilated convolutions".into());
    }
    let shape = shape_of(m, ctx, &r.x)?;
    if shape.len() != 4 || shape[1] != b.in_channels() {
        return Err(format!("region input of shape {shape:?}"));
    }
    let shape = vec![1, shape[1], shape[2], shape[3]];
    let (c, h, w) = (shape[1], shape[2] as i64, shape[3] as i64);
    let (kh, kw) = (b.kernel()[0] as i64, b.kernel()[1] as i64);
    let (sh, sw) = (b.strides[0] as i64, b.strides[1] as i64);
    let (ph, pw) = (b.pads_begin[0], b.pads_begin[1]);
    let o = b.out_channels();
    let (ho, wo) = ((h + ph + b.pads_end[0] - kh) / sh + 1, (w + pw + b.pads_end[1] - kw) / sw + 1);
    let out = o.saturating_mul(ho.max(0) as usize).saturating_mul(wo.max(0) as usize);
    let bytes = submodel(m, r, y, &shape)?;
    let plan = plan(&bytes, &shape, out).map_err(|e| format!("the region cannot be evaluated: {e}"))?;
    let y0 = eval(&plan, &ArrayD::zeros(IxDyn(&shape)))?;
    if y0.shape() != [1, o, ho as usize, wo as usize] {
        return Err(format!("the region's output {:?} is not the Conv's output [1, {o}, {ho}, {wo}]", y0.shape()));
    }
    let mut bias = Array1::zeros(o);
    for oc in 0..o {
        let plane = y0.slice(ndarray::s![0, oc, .., ..]);
        let v = plane[[0usize, 0usize]];
        if plane.iter().any(|&u| (u - v).abs() > 1e-5 * v.abs().max(1.0)) {
            return Err("the region's response to zero is not constant per channel (borders differ)".into());
        }
        bias[oc] = v;
    }
    // impulses: one per input channel and stride phase, at the centre
    let mut weight = ArrayD::zeros(IxDyn(&[o, c, kh as usize, kw as usize]));
    let (yh, yw) = (ho / 2, wo / 2);
    for ci in 0..c {
        for a in 0..sh {
            for bb in 0..sw {
                let (qh, qw) = (yh * sh - ph + a, yw * sw - pw + bb);
                if qh < 0 || qh >= h || qw < 0 || qw >= w {
                    return Err("the input is too small to probe the kernel".into());
                }
                let mut x = ArrayD::zeros(IxDyn(&shape));
                x[[0, ci, qh as usize, qw as usize]] = 1.0f32;
                let resp = eval(&plan, &x)? - &y0;
                for oh in 0..ho {
                    for ow in 0..wo {
                        let (i, j) = (qh - oh * sh + ph, qw - ow * sw + pw);
                        for oc in 0..o {
                            let v = resp[[0, oc, oh as usize, ow as usize]];
                            if i >= 0 && i < kh && j >= 0 && j < kw {
                                weight[[oc, ci, i as usize, j as usize]] = v;
                            } else if v.abs() > 1e-5 {
                                return Err("the region reads outside the Conv's window".into());
                            }
                        }
                    }
                }
            }
        }
    }
    // grouped when the dense kernel is block-diagonal with the base's groups
    let gr = b.groups;
    let (og, cg) = (o / gr, c / gr);
    let block = (0..o).all(|oc| (0..c).all(|ci| ci / cg == oc / og || weight.slice(ndarray::s![oc, ci, .., ..]).iter().all(|&v| v == 0.0)));
    let (weight, groups) = if gr > 1 && block {
        let mut gw = ArrayD::zeros(IxDyn(&[o, cg, kh as usize, kw as usize]));
        for oc in 0..o {
            let g0 = (oc / og) * cg;
            gw.slice_mut(ndarray::s![oc, .., .., ..]).assign(&weight.slice(ndarray::s![oc, g0..g0 + cg, .., ..]));
        }
        (gw, gr)
    } else {
        (weight, 1)
    };
    let conv = AffineConv::new(weight, Some(bias), groups, b.strides.clone(), b.dilations.clone(), b.pads_begin.clone(), b.pads_end.clone());
    // check on random inputs (borders included) against the region itself
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2 {
        let x: ArrayD<f32> = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.random_range(-1.0f32..1.0));
        let want = eval(&plan, &x)?;
        let got = conv.apply(&x.mapv(|v| v as f64));
        let mag = want.iter().fold(1f64, |a, v| a.max(v.abs()));
        let diff = want.iter().zip(got.iter()).fold(0f64, |a, (p, q)| a.max((p - q).abs()));
        if diff > 1e-4 * mag {
            return Err(format!("the region is not the recovered convolution (max diff {diff:.3e} on random inputs)"));
        }
    }
    Ok((conv, bp))
}

pub fn rule(m: &Model, ix: &GraphIndex, ctx: &Ctx, i: usize) -> Option<Outcome> {
    let g = graph(m);
    let root = &g.node[i];
    let opset = default_opset(&m.proto);
    let is_sum = (is_op(root, "Add") && opset >= 7) || is_op(root, "Sum");
    if !is_sum || root.output.len() != 1 {
        return None;
    }
    let y = &root.output[0];
    // only at the top of a sum tree
    if ix.uses(y) == 1 && !ix.outputs.contains(y) {
        if let Some(&c) = ix.consumers_of(y).first() {
            let cn = &g.node[c];
            if is_op(cn, "Add") || is_op(cn, "Sum") {
                return None;
            }
        }
    }
    let refuse = |reason: String| Some(Outcome { patch: None, refusals: vec![Refusal { rule: RULE, node: root.name().to_string(), reason }] });
    let region = match find_region(m, ix, y) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => return refuse(e),
    };
    let (conv, bp) = match recover(m, ix, ctx, &region, y) {
        Ok(v) => v,
        Err(e) => return refuse(e),
    };
    let bnode = &g.node[bp];
    let ft = match super::common::const_f64(m, ix, ctx, &bnode.input[1]) {
        Ok((_, ft)) => ft,
        Err(e) => return refuse(e),
    };
    let mut taken = HashSet::new();
    let wname = super::common::fresh_name(g, &mut taken, &format!("{}_region", bnode.input[1]));
    let bname = super::common::fresh_name(g, &mut taken, &format!("{wname}_bias"));
    let mut node = super::common::rewired_conv(bnode, &region.x, &wname, &bname, y);
    node.attribute.retain(|a| a.name() != "group");
    node.attribute.push(crate::proto::AttributeProto {
        name: Some("group".into()),
        i: Some(conv.groups as i64),
        r#type: Some(crate::proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    });
    let detail = format!("{} nodes between '{}' and '{}' into Conv '{}' {}", region.dep.len(), region.x, y, bnode.name(), super::common::kernel_str(conv.kernel()));
    Some(Outcome {
        patch: Some(Patch {
            at: i,
            remove: region.dep.clone(),
            insert: vec![node],
            initializers: vec![(wname, conv.weight.clone(), ft), (bname, conv.bias.clone().into_dyn(), ft)],
            log: Rewrite { rule: RULE, node: bnode.name().to_string(), detail },
        }),
        refusals: vec![],
    })
}
