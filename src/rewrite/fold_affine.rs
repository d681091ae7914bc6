//! A Mul, Div, Add or Sub of a constant that is the same along every axis but one (per channel)
//! or everywhere (a scalar) folds into the linear layer next to it — a Conv, a Gemm, or a MatMul
//! with a constant 2-d weight — when nothing but operators that carry the channels whole lies
//! between and nothing else reads what it maps:
//! - after the layer, into its output channels: `t·(xW + b) + s = x(W·diag(t)) + (b·t + s)`
//!   (tf2onnx writes a Keras BatchNormalization after a Dense as Mul + Add; a layer scale after a
//!   Linear);
//! - before it, into its input channels: `(t·x + s)W = x(diag(t)·W) + s·W` (UniRepLKNet's GRN
//!   `+ β` before its pointwise Linear; a decomposed LayerNorm's affine before a Linear), with the
//!   walk and the algebra of `fold_bn_forward`.
//!
//! - find: the node maps its data operand by a constant that broadcasts per channel (or as a
//!   scalar) without enlarging it. After: walking back from the data operand through Identity,
//!   Reshape, Flatten, Squeeze, Unsqueeze and Transpose (tracking the channel axis) and at most one
//!   Add (or Sub) of a per-channel constant (a bias), a MatMul (channels its last axis), a Gemm (its
//!   columns) or a Conv (axis 1). Not a candidate: an Add or Sub right after a MatMul without a
//!   bias (it is the bias), and an Add or Sub right on a Conv, or a Mul there that feeds a sum
//!   (`merge_branches` folds those with the sum). Before: as `fold_bn_forward`, from the node's output.
//! - check: after, every tensor on the way is read only there (or by Shape / Size) and is not a
//!   graph output; the weights are constants. Before: as `fold_bn_forward` (every reader a layer,
//!   no shift into a zero-padding Conv, at most one MatMul without a bias Add).
//! - rewrite: after, the layer's weight and bias (and the bias Add on the way) are scaled and
//!   shifted, the node is removed and the node before it writes its output; before, as
//!   `fold_bn_forward`.

use super::affine::{
    channel_axis, channel_shaped, const_affine, data_operands, fits_onto, per_channel, shape_readers, sized, value_reads,
    ConstAffine,
};
use super::fold_bn_forward::{self as forward, At, End, Src};
use super::{Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{attr_float, attr_int, attr_ints, is_default_domain, is_op, Exact, Label};
use crate::kernel::read::{read_conv, read_conv_form};
use crate::model::tensor::{FloatType, Scaled};
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use ndarray::{Array1, ArrayD, Axis};
use std::collections::HashMap;

pub(crate) struct FoldAffine;

/// The layer before the map.
#[derive(Clone, Copy, Debug)]
enum Layer {
    MatMul(usize),
    Gemm(usize),
    Conv(usize),
}

impl Layer {
    fn node(self) -> usize {
        match self {
            Layer::MatMul(i) | Layer::Gemm(i) | Layer::Conv(i) => i,
        }
    }
}

/// The way back from the map to the layer before it.
struct Back {
    layer: Layer,
    /// the layer's output channels
    outputs: usize,
    /// an Add (or Sub) of a constant on the way, the layer's bias: node, index of the constant
    /// operand, where the channels are in the tensor it adds to
    bias: Option<(usize, usize, At)>,
}

enum Dir {
    After(Back),
    Before { ends: Vec<End>, readers: Vec<usize>, blocked: Option<(String, String)> },
}

pub(crate) struct Candidate {
    node: usize,
    map: ConstAffine,
    dir: Dir,
}

pub(crate) enum Plan {
    After { nodes: HashMap<usize, NodeProto>, inits: Vec<(String, Exact, FloatType)> },
    Before(forward::Plan),
}

impl Rule for FoldAffine {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::FOLD_AFFINE;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let n = cx.node(at);
        for operands in data_operands(n) {
            // the structure first (shapes may need tract's analysis of the whole model)
            let x = &n.input[operands.0];
            let (after, before) = (layer_behind(cx, x), forward::reaches_a_layer(cx, &n.output[0]));
            if !after && !before {
                continue;
            }
            let Some(map) = const_affine(cx, at, operands) else { continue };
            if let Some(back) = after.then(|| back(cx, &map)).flatten() {
                let direct = cx.producer(&map.x) == Some(back.layer.node());
                if matches!(back.layer, Layer::Conv(_)) && direct && in_a_sum(cx, at) {
                    return None; // merge_branches folds it with the sum
                }
                if map.shifts() && matches!(back.layer, Layer::MatMul(_)) && back.bias.is_none() {
                    return None; // the MatMul's bias (a Linear is MatMul + Add)
                }
                return Some(Candidate { node: at, map, dir: Dir::After(back) });
            }
            if before {
                let (ends, blocked) = forward::walk(cx, &map.y, At { axis: map.axis, shape: map.shape.clone() });
                if !ends.is_empty() {
                    let readers = cx.ix.consumers_of(&map.y).to_vec();
                    return Some(Candidate { node: at, map, dir: Dir::Before { ends, readers, blocked } });
                }
            }
        }
        None
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let n = cx.node(c.node);
        let (op, node) = (n.op_type().to_string(), n.label().to_string());
        let r = match &c.dir {
            Dir::After(back) => after(cx, (&op, &node), &c.map, back).map(|(nodes, inits)| Plan::After { nodes, inits }),
            Dir::Before { blocked: Some((reader, reader_op)), .. } => {
                let (reader, reader_op) = (reader.clone(), reader_op.clone());
                Err(Reason::ForwardBlocked { op, node, reader, reader_op })
            }
            Dir::Before { ends, readers, blocked: None } => {
                let (x, y, t, s) = (c.map.x.clone(), c.map.y.clone(), c.map.t.clone(), c.map.s.clone());
                forward::fold_into(cx, &Src { op, node, x, y, t, s }, ends, readers, true).map(Plan::Before)
            }
        };
        match r {
            Ok(plan) => Checked::Fits(plan),
            Err(reason) => Checked::refuse(reason),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let n = cx.node(c.node);
        let what = format!("{} '{}'", n.op_type(), n.label());
        match (c.dir, plan) {
            (Dir::Before { ends, .. }, Plan::Before(plan)) => {
                let detail = format!("{what} folded forward into");
                forward::patch(cx, Self::ID, c.node, &ends, plan, &detail, n.label().to_string())
            }
            (Dir::After(back), Plan::After { nodes, inits }) => {
                let l = cx.node(back.layer.node());
                Patch {
                    at: c.node,
                    remove: vec![c.node],
                    insert: vec![],
                    replace: nodes.into_iter().collect(),
                    initializers: inits,
                    log: Rewrite {
                        rule: Self::ID,
                        node: l.label().to_string(),
                        detail: format!("{what} folded into {} '{}'", l.op_type(), l.label()),
                        weights: vec![],
                    },
                }
            }
            _ => unreachable!("a plan of the candidate's direction"),
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.node).label().to_string()
    }
}

/// Operators that carry the channels whole (walking back from a map to its layer).
const CARRIERS: &[&str] = &["Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"];

/// Whether a MatMul, Gemm or Conv writes `t`, through carriers, Adds and Subs (by operator only; a
/// bounded look).
fn layer_behind(cx: &Cx, t: &str) -> bool {
    let mut stack = vec![(t.to_string(), 0)];
    let mut budget = 64;
    while let Some((t, depth)) = stack.pop() {
        budget -= 1;
        if budget == 0 {
            return false;
        }
        let Some(n) = cx.producer_node(&t) else { continue };
        if ["MatMul", "Gemm", "Conv"].iter().any(|op| is_op(n, op)) {
            return true;
        }
        if depth < 32 && CARRIERS.iter().any(|op| is_op(n, op)) {
            stack.extend(n.input.first().map(|i| (i.clone(), depth + 1)));
        } else if depth < 32 && (is_op(n, "Add") || is_op(n, "Sub")) {
            stack.extend(n.input.iter().map(|i| (i.clone(), depth + 1)));
        }
    }
    false
}

/// Whether node `i` is a sum, or a Mul that feeds one as its only reader (the sum trees
/// `merge_branches` reads a Conv's scales and constants from).
fn in_a_sum(cx: &Cx, i: usize) -> bool {
    let sum = |n: &NodeProto| ["Add", "Sub", "Sum"].iter().any(|op| is_op(n, op));
    let n = cx.node(i);
    let y = &n.output[0];
    let feeds_a_sum = cx.uses(y) == 1 && !cx.ix.outputs.contains(y) && cx.ix.consumers_of(y).iter().any(|&c| sum(cx.node(c)));
    sum(n) || (is_op(n, "Mul") && feeds_a_sum)
}

/// The way back from `map` to the layer that writes what it maps.
fn back(cx: &Cx, map: &ConstAffine) -> Option<Back> {
    let mut t = map.x.clone();
    let mut at = At { axis: map.axis, shape: map.shape.clone() };
    let mut bias = None;
    for _ in 0..32 {
        // (what is read elsewhere would change: not a candidate)
        if cx.ix.outputs.contains(&t) || value_reads(cx, &t) != 1 {
            return None;
        }
        let p = cx.producer(&t)?;
        let n = cx.node(p);
        if !is_default_domain(n) || n.output.len() != 1 {
            return None;
        }
        let rank = at.shape.len();
        let on = |a: usize| at.axis.is_none_or(|x| x == a);
        let layer = match n.op_type() {
            "MatMul" if rank >= 2 && on(rank - 1) => {
                let (w, _) = cx.consts.f64(n.input.get(1)?).ok().filter(|(w, _)| w.ndim() == 2)?;
                Some((Layer::MatMul(p), w.shape()[1]))
            }
            "Gemm" if rank == 2 && on(1) => {
                cx.consts.f64(n.input.get(1)?).ok().filter(|(b, _)| b.ndim() == 2)?;
                Some((Layer::Gemm(p), at.shape[1]))
            }
            "Conv" if rank >= 3 && on(1) => Some((Layer::Conv(p), at.shape[1])),
            _ => None,
        };
        if let Some((layer, outputs)) = layer {
            // (the map's channels are the layer's outputs)
            if map.axis.is_some() && map.t.len() != outputs {
                return None;
            }
            return Some(Back { layer, outputs, bias });
        }
        match n.op_type() {
            "Add" | "Sub" if bias.is_none() && n.input.len() == 2 && n.input[0] != n.input[1] => {
                // a bias: a constant that broadcasts per channel (or everywhere) here, added (or
                // subtracted)
                let operands: &[usize] = if is_op(n, "Add") { &[1, 0] } else { &[1] };
                let (k, c) = operands.iter().find_map(|&k| cx.consts.f64(&n.input[k]).ok().map(|(c, _)| (k, c)))?;
                let fits = match at.axis {
                    Some(a) => channel_axis(c.shape(), &at.shape).is_some_and(|ax| ax.is_none_or(|ax| ax == a)),
                    None => fits_onto(c.shape(), &at.shape),
                };
                if !fits || shape_of(cx, &n.input[1 - k]).as_deref() != Some(&at.shape[..]) {
                    return None;
                }
                bias = Some((p, k, at.clone()));
                t = n.input[1 - k].clone();
            }
            op if CARRIERS.contains(&op) => {
                at = carried_back(cx, n, &at)?;
                t = n.input[0].clone();
            }
            _ => return None,
        }
    }
    None
}

/// The shape of `t`, or for a tensor a rewrite made (which the shape facts do not know) written
/// by a MatMul of a constant 2-d weight, the shape that MatMul gives.
fn shape_of(cx: &Cx, t: &str) -> Option<Vec<usize>> {
    if let Some(s) = cx.shape_of(t) {
        return Some(s);
    }
    let n = cx.producer_node(t).filter(|n| is_op(n, "MatMul"))?;
    let mut s = cx.shape_of(n.input.first()?)?;
    let (w, _) = cx.consts.f64(n.input.get(1)?).ok().filter(|(w, _)| w.ndim() == 2)?;
    (s.len() >= 2 && s.last() == Some(&w.shape()[0])).then(|| {
        *s.last_mut().expect("rank 2 or more") = w.shape()[1];
        s
    })
}

/// Where the channels at `at` (in the output of carrier `n`) are in its input.
fn carried_back(cx: &Cx, n: &NodeProto, at: &At) -> Option<At> {
    let input = cx.shape_of(n.input.first()?)?;
    if input.iter().product::<usize>() != at.shape.iter().product::<usize>() {
        return None;
    }
    let Some(a) = at.axis else { return Some(At { axis: None, shape: input }) };
    let axis = if is_op(n, "Transpose") {
        let rank = at.shape.len();
        let perm: Vec<usize> = match attr_ints(n, "perm") {
            Some(v) => v.iter().map(|&p| usize::try_from(p).ok().filter(|&p| p < rank)).collect::<Option<_>>()?,
            None => (0..rank).rev().collect(),
        };
        *perm.get(a)?
    } else {
        // the same channels, the same elements after them
        let after: usize = at.shape[a..].iter().product();
        (0..input.len()).find(|&b| input[b] == at.shape[a] && input[b..].iter().product::<usize>() == after)?
    };
    (input.get(axis) == Some(&at.shape[a])).then_some(At { axis: Some(axis), shape: input })
}

/// `w` with its slices along `axis` (a layer's outputs) scaled by `t`.
fn scale_along(w: &ArrayD<f64>, axis: usize, t: &Array1<f64>) -> ArrayD<f64> {
    let mut w = w.clone();
    for (o, mut lane) in w.axis_iter_mut(Axis(axis)).enumerate() {
        lane *= t[o];
    }
    w
}

type AfterPlan = (HashMap<usize, NodeProto>, Vec<(String, Exact, FloatType)>);

/// What `after` writes: the changed nodes, the new initializers, and the names it took.
struct Edits<'a> {
    names: crate::graph::Names<'a>,
    nodes: HashMap<usize, NodeProto>,
    inits: Vec<(String, Exact, FloatType)>,
}

/// The layer's weights and bias (and the bias Add on the way) scaled by t and shifted by s; the
/// node before the map writes its output.
fn after(cx: &Cx, what: (&str, &str), map: &ConstAffine, back: &Back) -> Result<AfterPlan, Reason> {
    let mut p = Edits { names: cx.names(), nodes: HashMap::new(), inits: Vec::new() };
    let o = back.outputs;
    let (t, s) = (sized(&map.t, o).expect("sizes checked by find"), sized(&map.s, o).expect("sizes checked by find"));
    let scales = t.iter().any(|&v| v != 1.0);
    // the shift goes into the bias Add on the way if there is one, else into the layer's bias
    let layer_shift = if back.bias.is_some() { Array1::zeros(o) } else { s.clone() };
    let li = back.layer.node();
    let l = cx.node(li);
    match back.layer {
        Layer::MatMul(_) => {
            if scales {
                let (w, ft) = cx.consts.f64(&l.input[1]).map_err(Reason::Const)?;
                let wname = p.names.own_or_fresh(cx.ix, &l.input[1]);
                p.nodes.entry(li).or_insert_with(|| l.clone()).input[1] = wname.clone();
                p.inits.push((wname, scale_along(&w, 1, &t).into(), ft));
            }
        }
        Layer::Gemm(_) => gemm(cx, what, li, &t, &layer_shift, scales, &mut p)?,
        Layer::Conv(_) => conv(cx, what, li, &t, &layer_shift, scales, &mut p)?,
    }
    if let Some((a, k, at)) = &back.bias {
        // b' = b·t + s, per channel on the bias's axis (elementwise for a scalar map); a Sub's
        // constant is −b
        let an = cx.node(*a);
        let sign = if is_op(an, "Sub") { -1.0 } else { 1.0 };
        let (b, bft) = cx.consts.f64(&an.input[*k]).map_err(Reason::Const)?;
        let b2 = match at.axis {
            None => b.mapv(|v| sign * (sign * v * t[0] + s[0])),
            Some(axis) => {
                let v = per_channel(&b, Some(axis), at.shape.len(), o).expect("a bias checked by find");
                let v2 = (&v * sign * &t + &s) * sign;
                if b.len() == o {
                    v2.into_shape_with_order(ndarray::IxDyn(b.shape())).expect("o values")
                } else {
                    channel_shaped(v2, axis, at.shape.len(), b.shape())
                }
            }
        };
        let bname = p.names.own_or_fresh(cx.ix, &an.input[*k]);
        p.nodes.entry(*a).or_insert_with(|| an.clone()).input[*k] = bname.clone();
        p.inits.push((bname, b2.into(), bft));
    }
    // the node before the map writes its output (and what reads the shape of its input reads it)
    let before = cx.producer(&map.x).expect("a producer on the way");
    let pn = p.nodes.entry(before).or_insert_with(|| cx.node(before).clone());
    pn.output[0] = map.y.clone();
    for r in shape_readers(cx, &map.x) {
        let rn = p.nodes.entry(r).or_insert_with(|| cx.node(r).clone());
        for i in rn.input.iter_mut().filter(|i| **i == map.x) {
            *i = map.y.clone();
        }
    }
    Ok((p.nodes, p.inits))
}

/// t·(α·AB + β·C) + s = α·A(B·t) + β·(C·t + s/β), or a new C = s with β = 1.
fn gemm(
    cx: &Cx,
    map: (&str, &str),
    g: usize,
    t: &Array1<f64>,
    s: &Array1<f64>,
    scales: bool,
    p: &mut Edits<'_>,
) -> Result<(), Reason> {
    let n = cx.node(g);
    let (b, ft) = cx.consts.f64(&n.input[1]).map_err(Reason::Const)?;
    let out_axis = if attr_int(n, "transB", 0) != 0 { 0 } else { 1 };
    if b.ndim() != 2 || b.shape()[out_axis] != t.len() {
        return Err(Reason::Channels {
            op: map.0.to_string(),
            node: map.1.to_string(),
            channels: t.len(),
            layer: n.label().to_string(),
            layer_channels: b.shape().get(out_axis).copied().unwrap_or(0),
        });
    }
    let node = p.nodes.entry(g).or_insert_with(|| n.clone());
    if scales {
        let bname = p.names.own_or_fresh(cx.ix, &n.input[1]);
        node.input[1] = bname.clone();
        p.inits.push((bname, scale_along(&b, out_axis, t).into(), ft));
    }
    let beta = attr_float(n, "beta", 1.0) as f64;
    let shifts = s.iter().any(|&v| v != 0.0);
    let c = match n.input.get(2).filter(|c| !c.is_empty()) {
        Some(name) if beta != 0.0 => Some((name.clone(), cx.consts.f64(name).map_err(Reason::Const)?.0)),
        _ => None,
    };
    match c {
        Some((name, c)) if scales || shifts => {
            let c2 = &c * &t.view().into_dyn() + &s.mapv(|v| v / beta).into_dyn();
            let cname = p.names.own_or_fresh(cx.ix, &name);
            node.input[2] = cname.clone();
            p.inits.push((cname, c2.into(), ft));
        }
        None if shifts => {
            let cname = p.names.fresh(&format!("{}_bias", n.input[1]));
            node.input.truncate(2);
            node.input.push(cname.clone());
            node.attribute.retain(|a| a.name() != "beta");
            node.attribute.push(AttributeProto {
                name: Some("beta".into()),
                f: Some(1.0),
                r#type: Some(AttributeType::Float as i32),
                ..Default::default()
            });
            p.inits.push((cname, s.clone().into_dyn().into(), ft));
        }
        _ => {}
    }
    Ok(())
}

/// Each output channel's weights times t, the bias b·t + s.
fn conv(
    cx: &Cx,
    map: (&str, &str),
    i: usize,
    t: &Array1<f64>,
    s: &Array1<f64>,
    scales: bool,
    p: &mut Edits<'_>,
) -> Result<(), Reason> {
    let n = cx.node(i);
    let refuse = |err| Reason::Conv { conv: n.label().to_string(), err };
    let channels = |layer_channels: usize| Reason::Channels {
        op: map.0.to_string(),
        node: map.1.to_string(),
        channels: t.len(),
        layer: n.label().to_string(),
        layer_channels,
    };
    let stored = n.input.get(1).and_then(|w| cx.stored_weight(w)).filter(|(_, _, dims)| dims[0] == t.len());
    // the weight's values are read only when they are not a stored tensor
    let (weight, bias, ft) = match stored {
        Some((raw, ft, dims)) => {
            let f = read_conv_form(&cx.consts, n, &dims, ft).map_err(refuse)?;
            let bias = f.bias.unwrap_or_else(|| Array1::zeros(dims[0]));
            let w = scales.then(|| Exact::Scaled(Scaled::new(raw, ft, dims, t.to_vec()).expect("sizes checked by stored_weight")));
            (w, bias, ft)
        }
        None => {
            let (k, ft) = read_conv(&cx.consts, n).map_err(refuse)?;
            if k.out_channels() != t.len() {
                return Err(channels(k.out_channels()));
            }
            (scales.then(|| Exact::Values(scale_along(&k.weight, 0, t))), k.bias, ft)
        }
    };
    let bias = &bias * t + s;
    let node = p.nodes.entry(i).or_insert_with(|| n.clone());
    let bname = match weight {
        Some(w) => {
            let (wname, bname) = p.names.conv_params(cx.ix, n);
            node.input[1] = wname.clone();
            p.inits.push((wname, w, ft));
            bname
        }
        None => match n.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => p.names.own_or_fresh(cx.ix, b),
            None => p.names.fresh(&format!("{}_bias", n.input[1])),
        },
    };
    node.input.truncate(2);
    node.input.push(bname.clone());
    p.inits.push((bname, bias.into_dyn().into(), ft));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::driver::at_node;
    use crate::support::{assert_close, attr_int, attr_ints, rand_input, run_f32, tensor_info, Builder, ConvAttrs};
    use ndarray::IxDyn;

    /// A builder whose input x has shape `dims`.
    fn input(dims: &[i64]) -> Builder {
        let mut b = Builder::new(1, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, dims);
        b
    }

    /// Fuse: nothing refused, fold_affine fired, and the model computes what it did (in tract).
    /// The operators left.
    fn folds_and_agrees(b: &Builder, x: &[usize]) -> Vec<String> {
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert!(report.rewrites.iter().any(|r| r.rule == RuleId::FOLD_AFFINE), "{:?}", report.rewrites);
        let x = rand_input(7, x);
        let (want, got) = (run_f32(&original, std::slice::from_ref(&x)), run_f32(&m, &[x]));
        assert_close(&got, &want, 1e-5, "folded vs original");
        m.graph().node.iter().map(|n| n.op_type().to_string()).collect()
    }

    /// The refusals of a fuse, as text.
    fn refusals(b: &Builder) -> Vec<String> {
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        report.refused.iter().map(|r| format!("{} at '{}': {}", r.rule, r.node, r.reason)).collect()
    }

    fn constant(b: &mut Builder, name: &str, shape: &[usize]) -> String {
        let a = b.rand_in(shape, 0.5, 1.5);
        b.initializer(name, &a)
    }

    /// A Linear exported as MatMul [c, o] (with its bias Add when `bias`).
    fn linear(b: &mut Builder, name: &str, x: &str, c: usize, o: usize, bias: bool) -> String {
        let w = b.rand(&[c, o]);
        let w = b.initializer(&format!("{name}.w"), &w);
        let y = b.node("MatMul", name, &[x, &w], &[], vec![]);
        if !bias {
            return y;
        }
        let bb = b.rand(&[o]);
        let bb = b.initializer(&format!("{name}.b"), &bb);
        b.node("Add", &format!("{name}_bias"), &[&y, &bb], &[], vec![])
    }

    #[test]
    fn a_bn_as_mul_and_add_after_a_matmul_becomes_its_weight_and_bias_add() {
        // tf2onnx: Dense without bias + BatchNormalization → MatMul → Mul → Add
        let mut b = input(&[2, 6]);
        let y = linear(&mut b, "fc", "x", 6, 4, false);
        let (t, s) = (constant(&mut b, "t", &[4]), constant(&mut b, "s", &[4]));
        let y = b.node("Mul", "bn_mul", &[&y, &t], &[], vec![]);
        let y = b.node("Add", "bn_add", &[&y, &s], &["y"], vec![]);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[2, 6]), ["MatMul", "Add"]);
    }

    #[test]
    fn a_bn_as_mul_and_add_after_a_gemm_becomes_the_gemm() {
        // the plain net's hidden layer at batch 1: Gemm → Mul → Add → Relu
        let mut b = input(&[1, 6]);
        let (w, c) = (b.rand(&[6, 4]), b.rand(&[4]));
        let (w, c) = (b.initializer("w", &w), b.initializer("c", &c));
        let y = b.node("Gemm", "fc", &["x", &w, &c], &[], vec![crate::support::attr_float("beta", 0.5)]);
        let (t, s) = (constant(&mut b, "t", &[4]), constant(&mut b, "s", &[4]));
        let y = b.node("Mul", "bn_mul", &[&t, &y], &[], vec![]);
        let y = b.node("Add", "bn_add", &[&y, &s], &[], vec![]);
        let y = b.node("Relu", "relu", &[&y], &["y"], vec![]);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[1, 6]), ["Gemm", "Relu"]);
    }

    #[test]
    fn a_gemm_without_bias_gets_the_shift_as_its_c() {
        let mut b = input(&[3, 6]);
        let w = b.rand(&[4, 6]);
        let w = b.initializer("w", &w);
        let y = b.node("Gemm", "fc", &["x", &w], &[], vec![attr_int("transB", 1)]);
        let s = constant(&mut b, "s", &[1, 4]);
        let y = b.node("Sub", "shift", &[&y, &s], &["y"], vec![]);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[3, 6]), ["Gemm"]);
    }

    #[test]
    fn a_scale_and_shift_after_a_biased_matmul_go_into_its_weight_and_bias() {
        // the dynamic-batch Dense with bias: MatMul → Add(b) → Div(t) → Sub(c − ·)
        let mut b = input(&[2, 3, 6]);
        let y = linear(&mut b, "fc", "x", 6, 4, true);
        let (t, c) = (constant(&mut b, "t", &[1, 4]), constant(&mut b, "c", &[4]));
        let y = b.node("Div", "div", &[&y, &t], &[], vec![]);
        let y = b.node("Sub", "sub", &[&c, &y], &["y"], vec![]);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[2, 3, 6]), ["MatMul", "Add"]);
    }

    #[test]
    fn a_layer_scale_after_a_linear_and_a_transpose_folds_into_the_linear() {
        // UniRepLKNet: Linear on NHWC → permute to NCHW → γ.view(1, -1, 1, 1) · y, + residual
        let mut b = input(&[1, 3, 4, 6]);
        let y = linear(&mut b, "pw", "x", 6, 5, true);
        let y = b.node("Transpose", "to_nchw", &[&y], &[], vec![attr_ints("perm", &[0, 3, 1, 2])]);
        let g = constant(&mut b, "gamma", &[1, 5, 1, 1]);
        let y = b.node("Mul", "scale", &[&g, &y], &[], vec![]);
        let r = b.input("r", &[1, 5, 3, 4]);
        let y = b.node("Add", "residual", &[&r, &y], &["y"], vec![]);
        b.output(&y);
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["MatMul", "Add", "Transpose", "Add"]);
        let (x, r) = (rand_input(1, &[1, 3, 4, 6]), rand_input(2, &[1, 5, 3, 4]));
        let want = run_f32(&original, &[x.clone(), r.clone()]);
        assert_close(&run_f32(&m, &[x, r]), &want, 1e-5, "folded vs original");
    }

    #[test]
    fn a_constant_added_before_a_linear_becomes_its_bias() {
        // UniRepLKNet's GRN: (γ·N(x) + 1)·x + β, then its pointwise Linear (no bias: a new Add
        // replaces the one removed)
        let mut b = input(&[1, 3, 4, 6]);
        let sq = b.node("Mul", "sq", &["x", "x"], &[], vec![]);
        let beta = constant(&mut b, "beta", &[1, 1, 1, 6]);
        let y = b.node("Add", "grn_beta", &[&sq, &beta], &[], vec![]);
        let y = linear(&mut b, "pw", &y, 6, 5, false);
        let y = b.node("Transpose", "to_nchw", &[&y], &["y"], vec![attr_ints("perm", &[0, 3, 1, 2])]);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[1, 3, 4, 6]), ["Mul", "MatMul", "Add", "Transpose"]);
    }

    #[test]
    fn a_layer_norms_affine_folds_into_the_linear_after_it() {
        // a decomposed LayerNorm's γ and β, then a Linear with bias; a Shape of the way reads on
        let mut b = input(&[2, 5, 6]);
        let (g, be) = (constant(&mut b, "gamma", &[6]), constant(&mut b, "beta", &[6]));
        let y = b.node("Mul", "ln_scale", &["x", &g], &[], vec![]);
        let y = b.node("Add", "ln_shift", &[&y, &be], &[], vec![]);
        let sh = b.node("Shape", "shape", &[&y], &["sh"], vec![]);
        let y = linear(&mut b, "fc1", &y, 6, 8, true);
        let y = b.node("Relu", "act", &[&y], &["y"], vec![]);
        b.output(&y);
        b.output(&sh);
        assert_eq!(folds_and_agrees(&b, &[2, 5, 6]), ["Shape", "MatMul", "Add", "Relu"]);
    }

    #[test]
    fn a_gelus_half_folds_into_the_layer_after_it() {
        // x·0.5 (the tail of an exported GELU) before a zero-padding Conv: a scale, no shift
        let mut b = Builder::new(3, 5, 5);
        let half = b.initializer("half", &ndarray::arr0(0.5).into_dyn());
        let y = b.node("Mul", "gelu_half", &["x", &half], &[], vec![]);
        let (y, _, _) = b.conv_rand("conv", &y, 4, 3, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[1, 3, 5, 5]), ["Conv"]);
    }

    #[test]
    fn a_scale_after_a_conv_outside_a_sum_folds_into_it() {
        let mut b = Builder::new(3, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 4, 3, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
        let t = constant(&mut b, "t", &[4, 1, 1]);
        let y = b.node("Mul", "scale", &[&y, &t], &[], vec![]);
        let y = b.node("Relu", "relu", &[&y], &["y"], vec![]);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &[1, 3, 5, 5]), ["Conv", "Relu"]);
    }

    #[test]
    fn a_scale_on_a_conv_that_a_sum_reads_is_left_to_merge_branches() {
        // tf2onnx's BN after a biased conv: Conv → Mul → Add (a sum with a constant)
        let mut b = Builder::new(3, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 4, 3, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (t, s) = (constant(&mut b, "t", &[1, 4, 1, 1]), constant(&mut b, "s", &[1, 4, 1, 1]));
        let y = b.node("Mul", "bn_mul", &[&y, &t], &[], vec![]);
        let y = b.node("Add", "bn_add", &[&y, &s], &["y"], vec![]);
        b.output(&y);
        assert!(at_node(&b, "bn_mul", |cx, at| FoldAffine.find(cx, at)).is_none());
        assert!(at_node(&b, "bn_add", |cx, at| FoldAffine.find(cx, at)).is_none());
    }

    #[test]
    fn the_add_after_a_matmul_without_bias_is_its_bias() {
        // MatMul → Add(c) → MatMul: the Add is the first Linear's bias; moving it into the second
        // would change nothing
        let mut b = input(&[2, 6]);
        let y = linear(&mut b, "fc1", "x", 6, 4, true);
        let y = linear(&mut b, "fc2", &y, 4, 3, false);
        b.output(&y);
        assert!(at_node(&b, "fc1_bias", |cx, at| FoldAffine.find(cx, at)).is_none());
    }

    #[test]
    fn a_constant_of_two_axes_is_not_a_candidate() {
        let mut b = input(&[2, 5, 6]);
        let y = linear(&mut b, "fc", "x", 6, 4, false);
        let c = constant(&mut b, "plane", &[5, 4]);
        let y = b.node("Mul", "mul", &[&y, &c], &["y"], vec![]);
        b.output(&y);
        assert!(at_node(&b, "mul", |cx, at| FoldAffine.find(cx, at)).is_none());
    }

    #[test]
    fn a_shift_before_a_zero_padding_conv_is_refused_with_the_conv() {
        let mut b = Builder::new(3, 5, 5);
        let s = constant(&mut b, "s", &[1, 3, 1, 1]);
        let y = b.node("Add", "shift", &["x", &s], &[], vec![]);
        let (y, _, _) = b.conv_rand("conv", &y, 4, 3, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        b.output(&y);
        assert_eq!(
            refusals(&b),
            ["fold_affine at 'shift': Add 'shift' shifts its output, and Conv 'conv' zero-pads it: folded, the border would see the shift; left as it is"]
        );
    }

    #[test]
    fn a_shift_before_two_linears_without_bias_is_refused_with_both() {
        let mut b = input(&[2, 6]);
        let s = constant(&mut b, "s", &[6]);
        let y = b.node("Add", "shift", &["x", &s], &[], vec![]);
        let q = linear(&mut b, "q", &y, 6, 4, false);
        let k = linear(&mut b, "k", &y, 6, 4, false);
        let z = b.node("Mul", "qk", &[&q, &k], &["z"], vec![]);
        b.output(&z);
        assert_eq!(
            refusals(&b),
            ["fold_affine at 'shift': MatMuls 'q', 'k' have no constant bias Add to take the shift of Add 'shift': folded, each would need an Add of its own, more nodes than the fold removes"]
        );
    }

    #[test]
    fn a_map_that_also_feeds_a_nonlinearity_is_refused_with_the_reader() {
        let mut b = input(&[2, 6]);
        let t = constant(&mut b, "t", &[6]);
        let y = b.node("Mul", "scale", &["x", &t], &[], vec![]);
        let z = linear(&mut b, "fc", &y, 6, 4, true);
        let r = b.node("Relu", "relu", &[&y], &["r"], vec![]);
        b.output(&z);
        b.output(&r);
        assert_eq!(
            refusals(&b),
            ["fold_affine at 'scale': Mul 'scale' also reaches 'relu' (Relu); it folds forward only when every reader is a Conv, a Gemm, a MatMul by a constant matrix or a BatchNormalization (through reshapes, transposes and averages)"]
        );
    }

    #[test]
    fn a_scale_read_elsewhere_between_it_and_its_layer_is_not_a_candidate() {
        // GELU: x·½·(1 + erf(x/√2)) reads the Linear's output twice: its Div by √2 stays
        let mut b = input(&[2, 6]);
        let y = linear(&mut b, "fc", "x", 6, 4, true);
        let c = b.initializer("sqrt2", &ndarray::arr0(std::f64::consts::SQRT_2).into_dyn());
        let d = b.node("Div", "div", &[&y, &c], &[], vec![]);
        let e = b.node("Erf", "erf", &[&d], &[], vec![]);
        let z = b.node("Mul", "gate", &[&y, &e], &["z"], vec![]);
        b.output(&z);
        assert!(at_node(&b, "div", |cx, at| FoldAffine.find(cx, at)).is_none());
        assert!(refusals(&b).is_empty());
    }

    #[test]
    fn a_bias_vector_becomes_per_channel_when_the_scale_is() {
        let v = Array1::from(vec![1.0, 2.0]);
        let b = ndarray::arr0(3.0).into_dyn();
        let c = per_channel(&b, Some(1), 4, 2).unwrap() * &v;
        assert_eq!(channel_shaped(c, 1, 4, b.shape()), ArrayD::from_shape_vec(IxDyn(&[2, 1, 1]), vec![3.0, 6.0]).unwrap());
    }
}
