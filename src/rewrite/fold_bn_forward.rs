//! A BatchNormalization before a linear layer folds forward into it (NormLinear heads, pre-norm
//! designs: NextViT's `merge_pre_bn`). The BN is `t·x + s` per channel; a Conv, Gemm or MatMul that
//! reads it becomes one reading x with its input channels scaled by t and `W·s` added to its bias:
//! W' = W·diag(t), b' = b + W·s. A second BatchNormalization absorbs it as well. (The walk and the
//! algebra here serve `fold_affine` too, for a Mul or Add of a constant before a layer.)
//!
//! - find: a BatchNormalization whose output reaches, through operators that move the channel
//!   axis but keep it whole (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity) or average
//!   over other axes (AveragePool, GlobalAveragePool, ReduceMean), a Conv (data input, channels on
//!   axis 1), a Gemm (input A, channels its columns), a MatMul with a constant 2-d right operand
//!   (channels its last axis), or another BatchNormalization (channels on axis 1).
//! - check: every reader on the way must be one of those, or read only the shape (Shape, Size),
//!   otherwise the BN stays and the reason names the reader; a padded Conv takes the fold only
//!   where the shift is zero (its border reads zeros, not s); an AveragePool that counts its
//!   padding likewise. A MatMul takes `W·s` into the constant bias Add after it (or a zero
//!   shift); without one, the BN stays.
//! - rewrite: the BN is removed, its first readers read its input; each layer at the end gets its
//!   new weights (and bias) in place; the operators between are untouched.

use super::affine::sized;
use super::{Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{attr_float, attr_int, attr_ints, attr_string, is_op, Label, Names};
use crate::kernel::read::read_bn;
use crate::model::tensor::FloatType;
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use ndarray::{Array1, ArrayD, Axis, IxDyn};
use std::collections::{HashMap, HashSet};

pub(crate) struct FoldBnForward;

/// A layer the map folds into.
#[derive(Clone, Debug)]
pub(super) enum End {
    Conv(usize),
    Gemm(usize),
    /// the MatMul, and the Add of a constant bias after it (node, index of the constant operand)
    MatMul(usize, Option<(usize, usize)>),
    Bn(usize),
}

impl End {
    fn node(&self) -> usize {
        match *self {
            End::Conv(i) | End::Gemm(i) | End::MatMul(i, _) | End::Bn(i) => i,
        }
    }
}

pub(crate) struct Candidate {
    bn: usize,
    ends: Vec<End>,
    /// the nodes reading the BN's output directly
    readers: Vec<usize>,
    /// a reader it cannot be folded into (node name, operator)
    blocked: Option<(String, String)>,
}

/// The new nodes and initializers.
pub(crate) struct Plan {
    nodes: HashMap<usize, NodeProto>,
    inits: Vec<(String, ArrayD<f64>, FloatType)>,
    /// a MatMul given a bias Add of its own: its index, and the MatMul and the Add that replace it
    created: Option<(usize, Vec<NodeProto>)>,
}

/// Where the channels are in a tensor on the way: its axis (`None`: the map is the same on every
/// channel, any axis will do), and the tensor's shape.
#[derive(Clone, Debug)]
pub(super) struct At {
    pub axis: Option<usize>,
    pub shape: Vec<usize>,
}

/// The affine map folded forward, as the layers after it take it: what reports call it, its
/// input and output, and its scale and shift per channel (one value each when it is the same on
/// every channel).
pub(super) struct Src {
    pub op: String,
    pub node: String,
    pub x: String,
    pub y: String,
    pub t: Array1<f64>,
    pub s: Array1<f64>,
}

impl Src {
    /// The scale and shift on the `n` input channels of layer `layer`.
    fn on(&self, n: usize, layer: &str) -> Result<(Array1<f64>, Array1<f64>), Reason> {
        match (sized(&self.t, n), sized(&self.s, n)) {
            (Some(t), Some(s)) => Ok((t, s)),
            _ if self.op == "BatchNormalization" => Err(Reason::BnChannels { bn: self.t.len(), conv: n }),
            _ => Err(Reason::Channels {
                op: self.op.clone(),
                node: self.node.clone(),
                channels: self.t.len(),
                layer: layer.to_string(),
                layer_channels: n,
            }),
        }
    }
}

impl Rule for FoldBnForward {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::FOLD_BN_FORWARD;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let bn = cx.node(at);
        if !is_op(bn, "BatchNormalization") || bn.output.is_empty() {
            return None;
        }
        let y = &bn.output[0];
        // the structure first (shapes may need tract's analysis of the whole model)
        if !reaches_a_layer(cx, y) {
            return None;
        }
        let shape = cx.shape_of(&bn.input[0])?;
        if shape.len() < 2 {
            return None;
        }
        let (ends, blocked) = walk(cx, y, At { axis: Some(1), shape });
        if ends.is_empty() {
            return None;
        }
        let readers = cx.ix.consumers_of(y).to_vec();
        Some(Candidate { bn: at, ends, readers, blocked })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let bn = cx.node(c.bn);
        let op = "BatchNormalization".to_string();
        if let Some((reader, reader_op)) = &c.blocked {
            let (reader, reader_op) = (reader.clone(), reader_op.clone());
            return Checked::refuse(Reason::ForwardBlocked { op, node: bn.label().to_string(), reader, reader_op });
        }
        let (p, _) = match read_bn(&cx.consts, bn) {
            Ok(v) => v,
            Err(err) => return Checked::refuse(Reason::Bn(err)),
        };
        let (t, s) = p.affine();
        let src = Src { op, node: bn.label().to_string(), x: bn.input[0].clone(), y: bn.output[0].clone(), t, s };
        // (a MatMul without a bias would need a new Add for the BN's shift: a BN traded for an
        // Add, not fewer nodes)
        match fold_into(cx, &src, &c.ends, &c.readers, false) {
            Ok(plan) => Checked::Fits(plan),
            Err(reason) => Checked::refuse(reason),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let detail = "BatchNormalization folded forward into";
        let name = cx.node(c.bn).label().to_string();
        patch(cx, Self::ID, c.bn, &c.ends, plan, detail, name)
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.bn).label().to_string()
    }
}

/// The layers `y` folds into (through the operators that carry its channels, from `at`), and the
/// first reader on the way it cannot fold into (node name, operator).
pub(super) fn walk(cx: &Cx, y: &str, at: At) -> (Vec<End>, Option<(String, String)>) {
    let mut walk = Walk { ends: vec![], blocked: None, seen: HashSet::new() };
    walk.from(cx, y, at, 0);
    (walk.ends, walk.blocked)
}

/// The plan of `src` folded into `ends` (`readers`: the nodes reading its output directly). A
/// MatMul without a bias Add to take its shift gets one when `add_for_one` (the node removed
/// balances it: an Add of a constant) and it is the only one.
pub(super) fn fold_into(cx: &Cx, src: &Src, ends: &[End], readers: &[usize], add_for_one: bool) -> Result<Plan, Reason> {
    let mut names = cx.names();
    let mut plan = Plan { nodes: HashMap::new(), inits: vec![], created: None };
    // MatMuls with no bias Add to take their shift: (node, W·s, dtype)
    let mut need_bias = Vec::new();
    for e in ends {
        match *e {
            End::Conv(i) => into_conv(cx, i, src, &mut names, &mut plan)?,
            End::Gemm(i) => into_gemm(cx, i, src, &mut names, &mut plan)?,
            End::MatMul(i, add) => {
                if let Some(v) = into_matmul(cx, i, add, src, &mut names, &mut plan)? {
                    need_bias.push((i, v));
                }
            }
            End::Bn(i) => into_bn(cx, i, src, &mut names, &mut plan)?,
        }
    }
    if need_bias.len() > usize::from(add_for_one) {
        let matmuls = need_bias.iter().map(|(i, _)| cx.node(*i).label().to_string()).collect();
        return Err(Reason::ShiftNoBias { op: src.op.clone(), node: src.node.clone(), matmuls });
    }
    // the first readers read the map's input
    for &r in readers {
        let n = plan.nodes.entry(r).or_insert_with(|| cx.node(r).clone());
        for i in n.input.iter_mut().filter(|i| **i == src.y) {
            *i = src.x.clone();
        }
    }
    if let Some((i, v)) = need_bias.pop() {
        // MatMul → Add(W·s), the Add writing what the MatMul wrote
        let mut mm = plan.nodes.remove(&i).unwrap_or_else(|| cx.node(i).clone());
        let ft = cx.consts.f64(&cx.node(i).input[1]).map_err(Reason::Const)?.1;
        let out = mm.output[0].clone();
        let product = names.fresh(&format!("{out}_product"));
        let bname = names.fresh(&format!("{}_bias", mm.input[1]));
        mm.output[0] = product.clone();
        let add = NodeProto {
            op_type: Some("Add".into()),
            name: Some(names.fresh(&format!("{}_bias", mm.name()))),
            input: vec![product, bname.clone()],
            output: vec![out],
            ..Default::default()
        };
        plan.inits.push((bname, v.into_dyn(), ft));
        plan.created = Some((i, vec![mm, add]));
    }
    Ok(plan)
}

/// The patch of `plan`: the map (node `src`) removed, the layers it folds into rewritten.
pub(super) fn patch(cx: &Cx, rule: RuleId, src: usize, ends: &[End], plan: Plan, detail: &str, node: String) -> Patch {
    let into: Vec<String> =
        ends.iter().map(|e| format!("{} '{}'", cx.node(e.node()).op_type(), cx.node(e.node()).label())).collect();
    let (at, remove, insert) = match plan.created {
        // (the new nodes go where the MatMul was, after what it reads)
        Some((i, nodes)) => (i, vec![src, i], nodes),
        None => (src, vec![src], vec![]),
    };
    Patch {
        at,
        remove,
        insert,
        replace: plan.nodes.into_iter().collect(),
        initializers: plan.inits.into_iter().map(|(n, a, ft)| (n, a.into(), ft)).collect(),
        log: Rewrite { rule, node, detail: format!("{detail} {}", into.join(", ")), weights: vec![] },
    }
}

struct Walk {
    ends: Vec<End>,
    blocked: Option<(String, String)>,
    seen: HashSet<usize>,
}

impl Walk {
    fn block(&mut self, n: &NodeProto) {
        self.blocked.get_or_insert_with(|| (n.label().to_string(), n.op_type().to_string()));
    }

    /// Follow every reader of `t`, whose channels are `at`.
    fn from(&mut self, cx: &Cx, t: &str, at: At, depth: usize) {
        if cx.ix.outputs.contains(t) {
            self.blocked.get_or_insert_with(|| (t.to_string(), "graph output".into()));
            return;
        }
        for &c in cx.ix.consumers_of(t) {
            if !self.seen.insert(c) {
                continue;
            }
            let n = cx.node(c);
            if (is_op(n, "Shape") || is_op(n, "Size")) && n.input.len() == 1 {
                continue; // reads the shape only, which stays
            }
            let slot = n.input.iter().position(|i| i == t);
            if depth > 32 || slot != Some(0) || n.input.iter().filter(|i| *i == t).count() != 1 || n.output.len() != 1 {
                self.block(n);
                continue;
            }
            let rank = at.shape.len();
            // the channels on this axis (or the same map on every channel)
            let on = |a: usize| at.axis.is_none_or(|x| x == a);
            let end = match n.op_type() {
                "Conv" if on(1) && rank >= 3 => Some(End::Conv(c)),
                "Gemm" if on(1) && rank == 2 && attr_int(n, "transA", 0) == 0 => Some(End::Gemm(c)),
                // (the bias is of the MatMul's output width)
                "MatMul" if rank >= 2 && on(rank - 1) => {
                    matrix(cx, &n.input[1]).map(|(w, _)| End::MatMul(c, bias_add(cx, &n.output[0], w.shape()[1])))
                }
                "BatchNormalization" if on(1) && rank >= 2 => Some(End::Bn(c)),
                _ => None,
            };
            if let Some(e) = end.filter(|_| crate::graph::is_default_domain(n)) {
                self.ends.push(e);
                continue;
            }
            match carry(cx, n, &at) {
                Some(next) => self.from(cx, &n.output[0], next, depth + 1),
                None => self.block(n),
            }
        }
    }
}

const CARRIERS: &[&str] = &[
    "Identity",
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "GlobalAveragePool",
    "AveragePool",
    "ReduceMean",
];

/// Whether a Conv, Gemm, MatMul or BatchNormalization reads `t`, directly or through operators
/// that may carry the channels (by operator only).
pub(super) fn reaches_a_layer(cx: &Cx, t: &str) -> bool {
    let mut stack = vec![(t.to_string(), 0)];
    while let Some((t, depth)) = stack.pop() {
        for &c in cx.ix.consumers_of(&t) {
            let n = cx.node(c);
            if ["Conv", "Gemm", "MatMul", "BatchNormalization"].iter().any(|op| is_op(n, op)) {
                return true;
            }
            if depth < 32 && CARRIERS.iter().any(|op| is_op(n, op)) {
                stack.extend(n.output.first().map(|o| (o.clone(), depth + 1)));
            }
        }
    }
    false
}

/// A constant 2-d matrix.
fn matrix(cx: &Cx, name: &str) -> Option<(ArrayD<f64>, FloatType)> {
    cx.consts.f64(name).ok().filter(|(a, _)| a.ndim() == 2)
}

/// The Add of a constant bias of `o` values (broadcasting along the last axis only) that alone
/// reads `t`: (node, index of the constant operand).
fn bias_add(cx: &Cx, t: &str, o: usize) -> Option<(usize, usize)> {
    if cx.uses(t) != 1 || cx.ix.outputs.contains(t) {
        return None;
    }
    let c = *cx.ix.consumers_of(t).first()?;
    let n = cx.node(c);
    if !is_op(n, "Add") || n.input.len() != 2 {
        return None;
    }
    let k = if n.input[0] == t { 1 } else { 0 };
    let (b, _) = cx.consts.f64(&n.input[k]).ok()?;
    let s = b.shape();
    let last_only = s.last().is_some_and(|&d| d == o || d == 1) && s[..s.len() - 1].iter().all(|&d| d == 1);
    last_only.then_some((c, k))
}

/// Where the channels go through `n`, if `n` carries them whole (or averages over other axes).
fn carry(cx: &Cx, n: &NodeProto, at: &At) -> Option<At> {
    if !crate::graph::is_default_domain(n) {
        return None;
    }
    let shape = &at.shape;
    let rank = shape.len();
    match n.op_type() {
        "Identity" => Some(at.clone()),
        "Transpose" => {
            let perm: Vec<usize> = match attr_ints(n, "perm") {
                Some(p) => p.iter().map(|&v| usize::try_from(v).ok().filter(|&v| v < rank)).collect::<Option<_>>()?,
                None => (0..rank).rev().collect(),
            };
            let axis = match at.axis {
                Some(a) => Some(perm.iter().position(|&p| p == a)?),
                None => None,
            };
            Some(At { axis, shape: perm.iter().map(|&p| shape[p]).collect() })
        }
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
            let out = cx.shape_of(&n.output[0])?;
            if out.iter().product::<usize>() != shape.iter().product::<usize>() {
                return None;
            }
            let Some(a) = at.axis else { return Some(At { axis: None, shape: out }) };
            // the batch stays on axis 0 and the channels stay one axis, after the same elements
            if a == 0 || out.is_empty() || out[0] != shape[0] {
                return None;
            }
            let before: usize = shape[..a].iter().product();
            let axis = (1..out.len()).find(|&b| out[..b].iter().product::<usize>() == before && out[b] == shape[a])?;
            Some(At { axis: Some(axis), shape: out })
        }
        "GlobalAveragePool" if on_channels(at) => Some(At { axis: at.axis, shape: cx.shape_of(&n.output[0])? }),
        "AveragePool" if on_channels(at) => {
            // exact when the average counts only real elements (or there is no padding)
            let pads = attr_ints(n, "pads").unwrap_or_default();
            let auto = attr_string(n, "auto_pad").unwrap_or_default();
            let padded = pads.iter().any(|&p| p != 0) || auto.starts_with("SAME");
            if padded && attr_int(n, "count_include_pad", 0) != 0 {
                return None;
            }
            Some(At { axis: at.axis, shape: cx.shape_of(&n.output[0])? })
        }
        "ReduceMean" => {
            let axes = match attr_ints(n, "axes") {
                Some(v) => v,
                None => match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(s) => cx.consts.i64(s).ok()?,
                    None => vec![],
                },
            };
            if axes.is_empty() {
                return None; // all axes (or none, with noop_with_empty_axes): not per channel
            }
            let axes: Vec<usize> = axes
                .iter()
                .map(|&v| {
                    let v = if v < 0 { v + rank as i64 } else { v };
                    usize::try_from(v).ok().filter(|&v| v < rank)
                })
                .collect::<Option<_>>()?;
            let keep = attr_int(n, "keepdims", 1) != 0;
            let axis = match at.axis {
                Some(a) if axes.contains(&a) => return None,
                Some(a) => Some(if keep { a } else { a - axes.iter().filter(|&&v| v < a).count() }),
                None => None,
            };
            let out: Vec<usize> = (0..rank)
                .filter_map(|i| if axes.contains(&i) { keep.then_some(1) } else { Some(shape[i]) })
                .collect();
            Some(At { axis, shape: out })
        }
        _ => None,
    }
}

/// Whether the channels are on axis 1 (or the map is the same on every channel).
fn on_channels(at: &At) -> bool {
    at.axis.is_none_or(|a| a == 1)
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), f: Some(v), r#type: Some(AttributeType::Float as i32), ..Default::default() }
}

/// `W·diag(t)` on axis `axis` (the input channels of a layer), and `Σ W·s` over every axis but
/// `keep` (its outputs).
fn scale_and_shift(w: &ArrayD<f64>, axis: usize, t: &Array1<f64>, s: &Array1<f64>, keep: usize) -> (ArrayD<f64>, Array1<f64>) {
    let mut w2 = w.clone();
    for (c, mut lane) in w2.axis_iter_mut(Axis(axis)).enumerate() {
        lane *= t[c];
    }
    let mut ws = w.clone();
    for (c, mut lane) in ws.axis_iter_mut(Axis(axis)).enumerate() {
        lane *= s[c];
    }
    let v: Array1<f64> = ws.axis_iter(Axis(keep)).map(|l| l.sum()).collect();
    (w2, v)
}

fn into_conv(cx: &Cx, i: usize, src: &Src, names: &mut Names, plan: &mut Plan) -> Result<(), Reason> {
    let n = cx.node(i);
    let conv_err = |err| Reason::Conv { conv: n.label().to_string(), err };
    let (k, ft) = crate::kernel::read::read_conv(&cx.consts, n).map_err(conv_err)?;
    let (t, s) = src.on(k.in_channels(), n.label())?;
    let padded = k.pads_begin.iter().chain(&k.pads_end).any(|&p| p != 0);
    if padded && s.iter().any(|&v| v != 0.0) {
        return Err(Reason::ShiftPadded { op: src.op.clone(), node: src.node.clone(), conv: n.label().to_string() });
    }
    // per group: input channel ci of output o is global channel (o / og)·cg + ci
    let (o, cg) = (k.out_channels(), k.weight.shape()[1]);
    let og = o / k.groups;
    let mut w = k.weight.clone();
    let mut bias = k.bias.clone();
    for oc in 0..o {
        let base = (oc / og) * cg;
        let mut row = w.index_axis_mut(Axis(0), oc);
        for (ci, mut lane) in row.axis_iter_mut(Axis(0)).enumerate() {
            bias[oc] += lane.sum() * s[base + ci];
            lane *= t[base + ci];
        }
    }
    let node = plan.nodes.entry(i).or_insert_with(|| n.clone());
    let biased = n.input.get(2).is_some_and(|b| !b.is_empty());
    if !biased && bias.iter().all(|&v| v == 0.0) {
        // (a scale only, into a Conv without bias: none to write)
        let wname = names.own_or_fresh(cx.ix, &n.input[1]);
        node.input[1] = wname.clone();
        plan.inits.push((wname, w, ft));
        return Ok(());
    }
    let (wname, bname) = names.conv_params(cx.ix, n);
    node.input.truncate(1);
    node.input.push(wname.clone());
    node.input.push(bname.clone());
    plan.inits.push((wname, w, ft));
    plan.inits.push((bname, bias.into_dyn(), ft));
    Ok(())
}

fn into_gemm(cx: &Cx, i: usize, src: &Src, names: &mut Names, plan: &mut Plan) -> Result<(), Reason> {
    let n = cx.node(i);
    let (b, ft) = cx.consts.f64(&n.input[1]).map_err(Reason::Const)?;
    let trans_b = attr_int(n, "transB", 0) != 0;
    let (alpha, beta) = (attr_float(n, "alpha", 1.0) as f64, attr_float(n, "beta", 1.0) as f64);
    // B is [in, out], or [out, in] with transB
    let in_axis = usize::from(trans_b);
    if b.ndim() != 2 {
        return Err(Reason::BnChannels { bn: src.t.len(), conv: b.shape().get(in_axis).copied().unwrap_or(0) });
    }
    let (t, s) = src.on(b.shape()[in_axis], n.label())?;
    let (b2, v) = scale_and_shift(&b, in_axis, &t, &s, 1 - in_axis);
    let o = v.len();
    let c = match n.input.get(2).filter(|c| !c.is_empty()) {
        Some(name) => Some(cx.consts.f64(name).map_err(Reason::Const)?.0),
        None => None,
    };
    let bname = names.own_or_fresh(cx.ix, &n.input[1]);
    if v.iter().all(|&x| x == 0.0) && (c.is_none() || beta == 0.0) {
        // (a scale only, and no bias to shift)
        plan.nodes.entry(i).or_insert_with(|| n.clone()).input[1] = bname.clone();
        plan.inits.push((bname, b2, ft));
        return Ok(());
    }
    // y = α·A'B + β·C: the shift adds α·s·B, into C (scaled by 1/β), or into a new C with β = 1
    let (c2, beta2) = match c {
        Some(c) if beta != 0.0 => {
            let shape = crate::graph::broadcast(c.shape(), &[o]).ok_or(Reason::BnChannels { bn: t.len(), conv: o })?;
            let mut c2 = c.broadcast(IxDyn(&shape)).ok_or(Reason::BnChannels { bn: t.len(), conv: o })?.to_owned();
            c2 += &(v.mapv(|x| x * alpha / beta));
            (c2, None)
        }
        _ => (v.mapv(|x| x * alpha).into_dyn(), Some(1.0f32)),
    };
    let cname = match n.input.get(2).filter(|c| !c.is_empty()) {
        Some(name) => names.own_or_fresh(cx.ix, name),
        None => names.fresh(&format!("{bname}_bias")),
    };
    let node = plan.nodes.entry(i).or_insert_with(|| n.clone());
    node.input.truncate(1);
    node.input.push(bname.clone());
    node.input.push(cname.clone());
    if let Some(beta) = beta2 {
        node.attribute.retain(|a| a.name() != "beta");
        node.attribute.push(float_attr("beta", beta));
    }
    plan.inits.push((bname, b2, ft));
    plan.inits.push((cname, c2, ft));
    Ok(())
}

/// The MatMul's weight scaled, and `W·s` into its bias Add; `Some(W·s)` when it is not zero and
/// there is no bias Add to take it.
fn into_matmul(
    cx: &Cx,
    i: usize,
    add: Option<(usize, usize)>,
    src: &Src,
    names: &mut Names,
    plan: &mut Plan,
) -> Result<Option<Array1<f64>>, Reason> {
    let n = cx.node(i);
    let (w, ft) = matrix(cx, &n.input[1]).ok_or_else(|| Reason::Const(crate::graph::ConstError::NotConstant(n.input[1].clone())))?;
    let (t, s) = src.on(w.shape()[0], n.label())?;
    let (w2, v) = scale_and_shift(&w, 0, &t, &s, 1);
    if t.iter().any(|&x| x != 1.0) {
        let wname = names.own_or_fresh(cx.ix, &n.input[1]);
        plan.nodes.entry(i).or_insert_with(|| n.clone()).input[1] = wname.clone();
        plan.inits.push((wname, w2, ft));
    }
    if v.iter().all(|&x| x == 0.0) {
        return Ok(None);
    }
    let Some((a, k)) = add else { return Ok(Some(v)) };
    let an = cx.node(a);
    let (b, bft) = cx.consts.f64(&an.input[k]).map_err(Reason::Const)?;
    let mut shape = b.shape().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = v.len();
    } else {
        shape.push(v.len());
    }
    let b0: Vec<f64> = b.iter().copied().collect();
    let mut b2 = ArrayD::from_shape_vec(IxDyn(&shape), v.to_vec()).expect("one axis of o values");
    for (k2, x) in b2.iter_mut().enumerate() {
        *x += if b0.len() == 1 { b0[0] } else { b0[k2] };
    }
    let bname = names.own_or_fresh(cx.ix, &an.input[k]);
    plan.nodes.entry(a).or_insert_with(|| an.clone()).input[k] = bname.clone();
    plan.inits.push((bname, b2, bft));
    Ok(None)
}

fn into_bn(cx: &Cx, i: usize, src: &Src, names: &mut Names, plan: &mut Plan) -> Result<(), Reason> {
    // BN2(t·x + s) = γ2·(t·x + s − μ2)/σ2 + β2: γ2' = γ2·t, μ2' = (μ2 − s)/t
    let n = cx.node(i);
    let (p, ft) = read_bn(&cx.consts, n).map_err(|err| Reason::IdentityBn { bn: n.label().to_string(), err })?;
    let (t, s) = src.on(p.scale.len(), n.label())?;
    if t.iter().any(|&v| v == 0.0) {
        return Err(Reason::ZeroScale { op: src.op.clone(), node: src.node.clone() });
    }
    let gamma = &p.scale * &t;
    let mean = (&p.mean - &s) / &t;
    let (gname, mname) = (names.own_or_fresh(cx.ix, &n.input[1]), names.own_or_fresh(cx.ix, &n.input[3]));
    let node = plan.nodes.entry(i).or_insert_with(|| n.clone());
    node.input[1] = gname.clone();
    node.input[3] = mname.clone();
    let shape = |name: &str| cx.consts.f64(name).map(|(a, _)| a.shape().to_vec()).unwrap_or_else(|_| vec![t.len()]);
    let as_shape = |v: Array1<f64>, like: &str| v.into_shape_with_order(IxDyn(&shape(like))).expect("per channel");
    plan.inits.push((gname, as_shape(gamma, &n.input[1]), ft));
    plan.inits.push((mname, as_shape(mean, &n.input[3]), ft));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::driver::at_node;
    use crate::support::{attr_int, attr_ints, rand_input, run_f32, tensor_info, Builder, ConvAttrs};

    fn check_at(b: &Builder, bn: &str) -> Checked<Plan> {
        at_node(b, bn, |cx, at| FoldBnForward.check(cx, &FoldBnForward.find(cx, at).expect("a candidate")))
    }

    fn refused(c: Checked<Plan>) -> Reason {
        match c {
            Checked::Refused(mut r) if r.len() == 1 => r.remove(0),
            _ => panic!("expected one refusal"),
        }
    }

    /// Fuse: no BatchNormalization is left, and the model computes what it did (in tract).
    fn folds_and_agrees(b: &Builder, x: &ArrayD<f64>) {
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert!(m.graph().node.iter().all(|n| n.op_type() != "BatchNormalization"), "a BN is left");
        assert!(report.rewrites.iter().any(|r| r.rule == RuleId::FOLD_BN_FORWARD));
        let (want, got) = (run_f32(&original, std::slice::from_ref(x)), run_f32(&m, std::slice::from_ref(x)));
        crate::support::assert_close(&got, &want, 1e-5, "folded vs original");
    }

    /// A builder whose input x is `[1, c]` (a pooled feature vector).
    fn features(c: usize) -> Builder {
        let mut b = Builder::new(c, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[1, c as i64]);
        b
    }

    #[test]
    fn a_norm_linear_head_is_one_gemm() {
        // RepViT / LeViT head: BatchNorm1d → Linear (Gemm, transB = 1)
        let mut b = features(6);
        let (y, _) = b.bn("bn", "x", 6, None);
        let w = b.rand(&[4, 6]);
        let (wn, bias) = (b.initializer("w", &w), b.rand(&[4]));
        let bn_ = b.initializer("bias", &bias);
        let z = b.node("Gemm", "fc", &[&y, &wn, &bn_], &[], vec![attr_int("transB", 1)]);
        b.output(&z);
        folds_and_agrees(&b, &rand_input(1, &[1, 6]));
    }

    #[test]
    fn a_gemm_without_bias_gets_one() {
        let mut b = features(6);
        let (y, _) = b.bn("bn", "x", 6, None);
        let w = b.rand(&[6, 4]);
        let wn = b.initializer("w", &w);
        let z = b.node("Gemm", "fc", &[&y, &wn], &[], vec![crate::support::attr_float("beta", 0.5)]);
        b.output(&z);
        folds_and_agrees(&b, &rand_input(1, &[1, 6]));
    }

    /// NextViT: BN → Reshape [1, C, HW] → {Transpose → MatMul q + bias; AveragePool → BN → Transpose
    /// → MatMul k + bias}; plus a Shape of the BN's output.
    #[test]
    fn a_pre_norm_folds_into_attention_projections_through_layout_and_pooling() {
        let mut b = Builder::new(4, 4, 4);
        let (y, _) = b.bn("norm1", "x", 4, None);
        let shape = b.initializer_i64("shape", &[1, 4, -1]);
        let r = b.node("Reshape", "r", &[&y, &shape], &[], vec![]);
        let tq = b.node("Transpose", "tq", &[&r], &[], vec![attr_ints("perm", &[0, 2, 1])]);
        let (wq, bq) = (b.rand(&[4, 4]), b.rand(&[4]));
        let (wq, bq) = (b.initializer("wq", &wq), b.initializer("bq", &bq));
        let q = b.node("MatMul", "q", &[&tq, &wq], &[], vec![]);
        let q = b.node("Add", "q_bias", &[&bq, &q], &[], vec![]);
        let pool = b.node(
            "AveragePool",
            "pool",
            &[&r],
            &[],
            vec![attr_ints("kernel_shape", &[4]), attr_ints("strides", &[4]), attr_int("count_include_pad", 1)],
        );
        let (k2, _) = b.bn("norm", &pool, 4, None);
        let tk = b.node("Transpose", "tk", &[&k2], &[], vec![attr_ints("perm", &[0, 2, 1])]);
        let (wk, bk) = (b.rand(&[4, 4]), b.rand(&[1, 4]));
        let (wk, bk) = (b.initializer("wk", &wk), b.initializer("bk", &bk));
        let k = b.node("MatMul", "k", &[&tk, &wk], &[], vec![]);
        let k = b.node("Add", "k_bias", &[&k, &bk], &[], vec![]);
        let kt = b.node("Transpose", "kt", &[&k], &[], vec![attr_ints("perm", &[0, 2, 1])]);
        let att = b.node("MatMul", "att", &[&q, &kt], &["att"], vec![]);
        let sh = b.node("Shape", "sh", &[&y], &["sh"], vec![]);
        b.output(&att);
        b.output(&sh);
        folds_and_agrees(&b, &rand_input(2, &[1, 4, 4, 4]));
    }

    #[test]
    fn a_bn_before_an_unpadded_conv_folds_and_before_a_padded_one_only_without_shift() {
        let conv_after_bn = |pads: &[i64], zero_shift: bool| {
            let mut b = Builder::new(4, 5, 5);
            let y = if zero_shift {
                // mean 0, β 0: the BN only scales
                let zero = Array1::zeros(4);
                let p = crate::support::Bn {
                    scale: b.rand(&[4]).into_dimensionality().unwrap(),
                    bias: zero.clone(),
                    mean: zero,
                    var: b.rand_in(&[4], 0.1, 2.0).into_dimensionality().unwrap(),
                    epsilon: 1e-5,
                };
                b.bn_with("bn", "x", &p, None, &[])
            } else {
                b.bn("bn", "x", 4, None).0
            };
            let (z, _, _) = b.conv_rand("conv", &y, 4, 2, &[3, 3], true, ConvAttrs::pads(pads).group(2));
            b.output(&z);
            b
        };
        folds_and_agrees(&conv_after_bn(&[0, 0, 0, 0], false), &rand_input(3, &[1, 4, 5, 5]));
        assert_eq!(
            refused(check_at(&conv_after_bn(&[1, 1, 1, 1], false), "bn")),
            Reason::ShiftPadded { op: "BatchNormalization".into(), node: "bn".into(), conv: "conv".into() }
        );
        folds_and_agrees(&conv_after_bn(&[1, 1, 1, 1], true), &rand_input(3, &[1, 4, 5, 5]));
    }

    #[test]
    fn a_bn_that_also_feeds_a_nonlinearity_stays() {
        let mut b = Builder::new(4, 5, 5);
        let (y, _) = b.bn("bn", "x", 4, None);
        let (z, _, _) = b.conv_rand("conv", &y, 3, 4, &[1, 1], true, ConvAttrs::default());
        let r = b.node("Relu", "relu", &[&y], &[], vec![]);
        b.output(&z);
        b.output(&r);
        assert_eq!(
            refused(check_at(&b, "bn")),
            Reason::ForwardBlocked {
                op: "BatchNormalization".into(),
                node: "bn".into(),
                reader: "relu".into(),
                reader_op: "Relu".into()
            }
        );
    }

    #[test]
    fn a_bn_before_a_pre_activation_is_not_a_candidate() {
        let mut b = Builder::new(4, 5, 5);
        let (y, _) = b.bn("bn", "x", 4, None);
        let r = b.node("Relu", "relu", &[&y], &[], vec![]);
        let (z, _, _) = b.conv_rand("conv", &r, 3, 4, &[1, 1], true, ConvAttrs::default());
        b.output(&z);
        assert!(at_node(&b, "bn", |cx, at| FoldBnForward.find(cx, at)).is_none());
    }

    #[test]
    fn a_matmul_without_bias_keeps_the_bn() {
        // (the BN would become an Add after the MatMul: a node for a node)
        let mut b = features(6);
        let (y, _) = b.bn("bn", "x", 6, None);
        let w = b.rand(&[6, 4]);
        let wn = b.initializer("w", &w);
        let z = b.node("MatMul", "mm", &[&y, &wn], &[], vec![]);
        b.output(&z);
        assert_eq!(
            refused(check_at(&b, "bn")),
            Reason::ShiftNoBias { op: "BatchNormalization".into(), node: "bn".into(), matmuls: vec!["mm".into()] }
        );
    }

    #[test]
    fn a_bias_add_of_the_matmuls_output_width_takes_the_shift() {
        // qkv: 4 channels in, 12 out, its bias Add of 12 values
        let mut b = features(4);
        let (y, _) = b.bn("bn", "x", 4, None);
        let (w, bias) = (b.rand(&[4, 12]), b.rand(&[12]));
        let (w, bias) = (b.initializer("w", &w), b.initializer("bias", &bias));
        let z = b.node("MatMul", "qkv", &[&y, &w], &[], vec![]);
        let z = b.node("Add", "qkv_bias", &[&z, &bias], &[], vec![]);
        b.output(&z);
        folds_and_agrees(&b, &rand_input(1, &[1, 4]));
    }
}
