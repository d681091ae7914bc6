//! The general path: a region between a tensor x and a sum y in which every operator is affine
//! in x with constant parameters (Conv, BatchNormalization, Add/Sub/Mul/Div by constants, Pad,
//! AveragePool, Slice, ScatterND, Transpose, Reshape, Where with constant conditions, shape
//! arithmetic …) is replaced by one Conv when, as a whole, it is one.
//!
//! This is what catches Diverse Branch Block's BN-and-pad, which exporters render as Pad →
//! Transpose → ScatterND chains (dynamo) or hundreds of Shape/Range/Where/ScatterND nodes
//! (TorchScript).
//! - find: at the root of a sum, walk back and collect the region (refused when a tensor inside
//!   it is read outside, or it holds a Pad with negative amounts, which tract cannot run). The
//!   region's input is an operand of the sum when one is where the other branches start (the
//!   identity operand of `x + f(x)`), so the walk never goes past it.
//! - check: cut the region out as a small model and evaluate it in tract, in float64, at the
//!   model's own input size: the bias is its response to zero, the kernel its response to
//!   impulses (one per input channel and stride phase), with the geometry (kernel size, stride,
//!   dilation, padding, groups; 1-, 2- or 3-d) of the largest Conv reading x, or, when no Conv
//!   reads x, the window its operators give (Conv, AveragePool, Pad, Slice along each path). The
//!   candidate Conv is then compared with the region on random inputs, borders included.
//! - rewrite: the Conv replaces the region.

use super::sum_tree::{is_root, leaves};
use super::{kernel_str, rewired_conv, Checked, Cx, Patch, Reason, RegionReason, Rewrite, Rule, RuleId};
use crate::graph::{attr_int, attr_ints, is_default_domain, is_op, GraphIndex, Label};
use crate::kernel::read::{read_conv, read_pad, read_slice};
use crate::kernel::AffineConv;
use crate::model::tensor::{from_f64, to_f64, FloatType};
use crate::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::tract::RegionPlan;
use ndarray::{Array1, ArrayD, Axis, IxDyn};
use std::collections::{HashMap, HashSet};

/// The most weights a kernel the general path recovers may hold (2^26: 512 MiB in float64; a
/// 2048x2048 3x3 conv holds 37.7 M).
const KERNEL_LIMIT: u128 = 1 << 26;

pub(crate) struct AffineRegion;

/// The root of a sum and the region that computes it (or why the region cannot be taken).
pub(crate) struct Candidate {
    root: usize,
    region: Result<Region, RegionReason>,
}

pub(crate) struct Region {
    x: String,
    /// nodes whose values depend on x (removed by the rewrite)
    dep: Vec<usize>,
    /// nodes the region needs that do not depend on x (constants, shape arithmetic)
    stat: Vec<usize>,
}

/// The recovered convolution, the Conv node whose name and attributes it takes (a fresh node
/// when no Conv reads x), and its dtype.
pub(crate) struct Plan {
    conv: AffineConv,
    base: Option<usize>,
    ft: FloatType,
}

impl Rule for AffineRegion {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::AFFINE_REGION;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        // a sum (the walk takes in the Sub, Mul and Div inside it); a Sub, Mul or Div at the top
        // is arithmetic on a result (a detection head's box decoding), not a block
        let n = cx.node(at);
        if !is_root(cx, at) || !(is_op(n, "Add") || is_op(n, "Sum")) {
            return None;
        }
        let y: &str = &cx.node(at).output[0];
        // which tensors are fixed once the input shapes are: the same for every walk from this root
        let mut memo = HashMap::new();
        // a sum of branches (two operands at least that are not constants: a bias Add is not one)
        let (operands, _) = leaves(cx, at);
        if operands.iter().filter(|l| cx.consts.value(&l.name).is_err()).count() < 2 {
            return None;
        }
        // the region's input: an operand of the sum where the other branches start, else where
        // the walk back ends
        for t in operands.iter().map(|l| &l.name) {
            if let Ok(Some(r)) = find_region(cx, y, Some(t), &mut memo) {
                if &r.x == t {
                    return Some(Candidate { root: at, region: Ok(r) });
                }
            }
        }
        let region = find_region(cx, y, None, &mut memo).transpose()?;
        Some(Candidate { root: at, region })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let region = match &c.region {
            Ok(r) => r,
            Err(e) => return Checked::refuse(e.clone()),
        };
        let y = &cx.node(c.root).output[0];
        // the dtype: the Conv's weight's that reads x, else the first float constant the region reads
        let ft = region
            .dep
            .iter()
            .filter(|&&p| is_op(cx.node(p), "Conv") && cx.node(p).input[0] == region.x)
            .chain(&region.dep)
            .flat_map(|&p| cx.node(p).input.iter().skip(1))
            .find_map(|i| cx.ix.constant(cx.g, i).and_then(|t| FloatType::from_onnx(t.data_type.unwrap_or(0))))
            .unwrap_or(FloatType::F32);
        match recover(cx, region, y, ft) {
            Ok((conv, base)) => Checked::Fits(Plan { conv, base, ft }),
            Err(e) => Checked::refuse(e),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let region = c.region.expect("checked");
        let root = cx.node(c.root);
        let y = &root.output[0];
        let Plan { conv, base, ft } = plan;
        let mut names = cx.names();
        let (mut node, wbase) = match base {
            Some(b) => {
                let bnode = cx.node(b);
                let wname = names.fresh(&format!("{}_region", bnode.input[1]));
                let bname = names.fresh(&format!("{wname}_bias"));
                (rewired_conv(bnode, &region.x, &wname, &bname, y), wname)
            }
            None => {
                let wname = names.fresh(&format!("{}_weight", root.name()));
                let bname = names.fresh(&format!("{wname}_bias"));
                let n = NodeProto {
                    op_type: Some("Conv".into()),
                    name: root.name.clone(),
                    input: vec![region.x.clone(), wname.clone(), bname],
                    output: vec![y.clone()],
                    ..Default::default()
                };
                (n, wname)
            }
        };
        let bname = node.input[2].clone();
        // the geometry, written out
        node.attribute.retain(|a| !matches!(a.name(), "group" | "pads" | "auto_pad" | "strides" | "dilations" | "kernel_shape"));
        let ints = |name: &str, v: Vec<i64>| AttributeProto {
            name: Some(name.into()),
            ints: v,
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        };
        let mut pads = conv.pads_begin.clone();
        pads.extend(&conv.pads_end);
        node.attribute.push(ints("kernel_shape", conv.kernel().iter().map(|&v| v as i64).collect()));
        node.attribute.push(ints("pads", pads));
        node.attribute.push(ints("strides", conv.strides.iter().map(|&v| v as i64).collect()));
        node.attribute.push(ints("dilations", conv.dilations.iter().map(|&v| v as i64).collect()));
        node.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(conv.groups as i64),
            r#type: Some(AttributeType::Int as i32),
            ..Default::default()
        });
        let name = node.label().to_string();
        let detail = format!(
            "{} nodes between '{}' and '{}' into Conv '{}' {}",
            region.dep.len(),
            region.x,
            y,
            name,
            kernel_str(conv.kernel())
        );
        Patch {
            at: c.root,
            remove: region.dep,
            insert: vec![node],
            replace: vec![],
            initializers: vec![(wbase, conv.weight.into(), ft), (bname, conv.bias.into_dyn().into(), ft)],
            log: Rewrite { rule: Self::ID, node: name, detail, weights: vec![] },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).label().to_string()
    }
}

/// Operators whose value depends only on shapes.
fn shape_only(op: &str) -> bool {
    matches!(op, "Shape" | "Size")
}

/// Which inputs of an operator may depend on x for the output to stay affine in x.
fn affine_inputs(n: &NodeProto) -> Option<Vec<usize>> {
    let all = (0..n.input.len()).collect::<Vec<_>>();
    Some(match n.op_type() {
        "Conv" | "BatchNormalization" | "Pad" | "Slice" | "Reshape" | "Transpose" | "Identity" | "Unsqueeze"
        | "Squeeze" | "AveragePool" | "Expand" | "Gather" | "Neg" | "Div" | "Tile" => vec![0],
        "Add" | "Sub" | "Sum" | "Concat" => all,
        "Mul" => all, // at most one of them (checked by the caller)
        "ScatterND" | "ScatterElements" => vec![0, 2],
        "Where" => vec![1, 2],
        "Cast" => {
            let to = attr_int(n, "to", 0);
            let floats = [DataType::Float, DataType::Double, DataType::Float16, DataType::Bfloat16];
            if floats.iter().any(|&f| f as i64 == to) {
                vec![0]
            } else {
                return None;
            }
        }
        _ => return None,
    })
}

const RANDOM: &[&str] =
    &["RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"];

/// Whether a tensor's value is fixed once the input shapes are (constants, Shape of anything,
/// and deterministic operators of those).
/// `memo` keeps what was found (keys borrowed from the graph, which no walk changes).
fn is_static<'g>(g: &'g GraphProto, ix: &GraphIndex, t: &'g str, memo: &mut HashMap<&'g str, bool>, depth: usize) -> bool {
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
            if depth > 2000 || sub || !is_default_domain(n) || RANDOM.contains(&n.op_type()) {
                false
            } else if shape_only(n.op_type()) {
                true
            } else {
                n.input.iter().all(|i| is_static(g, ix, i, memo, depth + 1))
            }
        }
    };
    memo.insert(t, v);
    v
}

/// Walk back from `y` (not past `stop`); `Ok(None)` when there is no single-input affine region
/// worth taking.
/// `y` is a node's output; `memo` is [`is_static`]'s, shared by the walks from one root.
fn find_region<'g>(
    cx: &Cx<'g>,
    y: &'g str,
    stop: Option<&str>,
    memo: &mut HashMap<&'g str, bool>,
) -> Result<Option<Region>, RegionReason> {
    let (g, ix) = (cx.g, cx.ix);
    let mut dep: HashSet<usize> = HashSet::new();
    let mut frontier: HashSet<&str> = HashSet::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack = vec![y];
    while let Some(t) = stack.pop() {
        if !seen.insert(t) || is_static(g, ix, t, memo, 0) {
            continue;
        }
        let Some(&(p, _)) = ix.producer.get(t).filter(|_| stop != Some(t)) else {
            frontier.insert(t);
            continue;
        };
        let n = &g.node[p];
        let ok = affine_inputs(n).is_some_and(|ok| {
            let dep_ins: Vec<usize> = (0..n.input.len()).filter(|&k| !is_static(g, ix, &n.input[k], memo, 0)).collect();
            dep_ins.iter().all(|k| ok.contains(k))
                && !(n.op_type() == "Mul" && dep_ins.len() > 1)
                && n.output.len() == 1
                && is_default_domain(n)
        });
        if !ok || frontier.len() > 1 {
            frontier.insert(t);
            continue;
        }
        dep.insert(p);
        stack.extend(n.input.iter().filter(|i| !i.is_empty()).map(|i| i.as_str()));
    }
    if frontier.len() != 1 || !dep.iter().any(|&p| g.node[p].output[0] == y) {
        return Ok(None);
    }
    let x = frontier.into_iter().next().expect("one tensor").to_string();
    // tract mis-evaluates (and can corrupt memory on) Pad with negative amounts: refuse them
    for &p in &dep {
        let n = &g.node[p];
        if n.op_type() == "Pad" {
            let pads = match n.input.get(1) {
                Some(t) if !t.is_empty() => cx.consts.i64(t).ok(),
                _ => attr_ints(n, "pads"),
            };
            // computed amounts (TorchScript's shape arithmetic) are caught once typed, in tract
            if pads.is_some_and(|v| v.iter().any(|&a| a < 0)) {
                return Err(RegionReason::NegativePad { pad: n.label().to_string() });
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
    let mut stack: Vec<&str> = dep.iter().flat_map(|&p| g.node[p].input.iter().map(|i| i.as_str())).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(t) = stack.pop() {
        if t.is_empty() || !seen.insert(t) || t == x {
            continue;
        }
        let Some(&(p, _)) = ix.producer.get(t) else { continue };
        if dep.contains(&p) || stat.contains(&p) {
            continue;
        }
        if !is_static(g, ix, t, memo, 0) {
            // an x-dependent tensor outside the region: allowed only as a shape source
            dep.insert(p);
        } else {
            stat.insert(p);
        }
        stack.extend(g.node[p].input.iter().map(|i| i.as_str()));
    }
    // nothing removed may be read from outside the region
    let inside: HashSet<usize> = dep.union(&stat).copied().collect();
    for &p in &dep {
        for o in &g.node[p].output {
            if o == y {
                continue;
            }
            if ix.outputs.contains(o) || ix.consumers_of(o).iter().any(|c| !inside.contains(c)) {
                return Err(RegionReason::UsedOutside { tensor: o.clone() });
            }
        }
        if g.node[p].input.iter().any(|i| !i.is_empty() && i != &x && !ix.producer.contains_key(i) && ix.constant(g, i).is_none())
        {
            return Ok(None);
        }
    }
    let mut dep: Vec<usize> = dep.into_iter().collect();
    dep.sort_unstable();
    let mut stat: Vec<usize> = stat.into_iter().collect();
    stat.sort_unstable();
    Ok(Some(Region { x, dep, stat }))
}

/// The region as a model of its own computing in float64: input x (concrete shape), output y.
/// Float initializers, Constant nodes and casts to float types become float64.
fn submodel(cx: &Cx, r: &Region, y: &str, shape: &[usize]) -> Result<ModelProto, RegionReason> {
    let g = cx.g;
    let mut nodes: Vec<usize> = r.dep.iter().chain(&r.stat).copied().collect();
    nodes.sort_unstable();
    let needed: HashSet<&str> = nodes.iter().flat_map(|&p| g.node[p].input.iter().map(|s| s.as_str())).collect();
    let mut inits = Vec::new();
    for t in &g.initializer {
        if needed.contains(t.name()) {
            let mut t = cx.settled(t).unwrap_or_else(|| t.clone());
            cx.model.inline_tensor(&mut t).map_err(|e| RegionReason::Tract(e.to_string()))?;
            inits.push(to_double(t)?);
        }
    }
    let mut region_nodes = Vec::with_capacity(nodes.len());
    for &p in &nodes {
        let mut n = g.node[p].clone();
        for a in &mut n.attribute {
            if let Some(t) = a.t.take() {
                a.t = Some(to_double(t)?);
            }
            let floats = [DataType::Float, DataType::Float16, DataType::Bfloat16].map(|d| d as i64);
            if a.name() == "to" && a.i.is_some_and(|v| floats.contains(&v)) && is_op(&g.node[p], "Cast") {
                a.i = Some(DataType::Double as i64);
            }
        }
        if is_op(&n, "Constant") {
            // value_float(s) make float32 tensors: write them as float64 tensors
            if let Some(k) = n.attribute.iter().position(|a| a.name() == "value_float" || a.name() == "value_floats") {
                let a = n.attribute.remove(k);
                let v: Vec<f64> = a.f.map(|f| vec![f as f64]).unwrap_or_else(|| a.floats.iter().map(|&f| f as f64).collect());
                let dims: Vec<usize> = if a.name() == "value_float" { vec![] } else { vec![v.len()] };
                let arr = ArrayD::from_shape_vec(IxDyn(&dims), v).map_err(|e| RegionReason::Tract(e.to_string()))?;
                n.attribute.push(AttributeProto {
                    name: Some("value".into()),
                    t: Some(from_f64("", &arr, FloatType::F64)),
                    r#type: Some(AttributeType::Tensor as i32),
                    ..Default::default()
                });
            }
        }
        region_nodes.push(n);
    }
    let tensor_type = |dims: Option<&[usize]>| TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(DataType::Double as i32),
            shape: dims.map(|d| TensorShapeProto {
                dim: d
                    .iter()
                    .map(|&v| tensor_shape_proto::Dimension {
                        value: Some(tensor_shape_proto::dimension::Value::DimValue(v as i64)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: cx.model.proto.ir_version,
        opset_import: cx.model.proto.opset_import.clone(),
        graph: Some(GraphProto {
            name: Some("region".into()),
            node: region_nodes,
            initializer: inits,
            input: vec![ValueInfoProto { name: Some(r.x.clone()), r#type: Some(tensor_type(Some(shape))), ..Default::default() }],
            output: vec![ValueInfoProto { name: Some(y.to_string()), r#type: Some(tensor_type(None)), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A float tensor as float64 (others as they are).
fn to_double(t: crate::proto::TensorProto) -> Result<crate::proto::TensorProto, RegionReason> {
    if FloatType::from_onnx(t.data_type.unwrap_or(0)).is_none_or(|ft| ft == FloatType::F64) {
        return Ok(t);
    }
    let a = to_f64(&t, t.raw_data.as_deref()).map_err(RegionReason::Tract)?;
    Ok(from_f64(t.name(), &a, FloatType::F64))
}

/// Where the region's output reads its input, per spatial axis: y[j] reads x[j·stride + lo ..=
/// j·stride + hi] (the union over the region's paths).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Win {
    stride: i64,
    lo: i64,
    hi: i64,
    /// the gcd of the distances between the positions read (0: one position)
    step: i64,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// The window of tensor `t` in x, from the operators between (Conv, AveragePool, Pad, Slice, and
/// element-wise operators joining paths); `None` when an operator on the way moves positions
/// some other way (Transpose, Reshape, ScatterND, ...).
fn window(cx: &Cx, r: &Region, t: &str, rank: usize, memo: &mut HashMap<String, Option<Vec<Win>>>, depth: usize) -> Option<Vec<Win>> {
    if t == r.x {
        return Some(vec![Win { stride: 1, lo: 0, hi: 0, step: 0 }; rank]);
    }
    if let Some(v) = memo.get(t) {
        return v.clone();
    }
    let v = (|| {
        if depth > 256 {
            return None;
        }
        let p = cx.producer(t)?;
        if !r.dep.contains(&p) {
            return None;
        }
        let n = cx.node(p);
        let inner = |memo: &mut HashMap<String, Option<Vec<Win>>>| window(cx, r, &n.input[0], rank, memo, depth + 1);
        match n.op_type() {
            "Conv" | "AveragePool" => {
                let (k, s, d, pb) = if is_op(n, "Conv") {
                    let (c, _) = read_conv(&cx.consts, n).ok()?;
                    (c.kernel().to_vec(), c.strides.clone(), c.dilations.clone(), c.pads_begin.clone())
                } else {
                    let ks: Vec<usize> = attr_ints(n, "kernel_shape")?.iter().map(|&v| v as usize).collect();
                    let get = |name: &str, d: i64| attr_ints(n, name).unwrap_or_else(|| vec![d; ks.len()]);
                    if crate::graph::attr_string(n, "auto_pad").is_some_and(|a| a != "NOTSET" && a != "VALID") {
                        return None;
                    }
                    let (s, d) = (get("strides", 1), get("dilations", 1));
                    let p = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 2 * ks.len()]);
                    (ks, s.iter().map(|&v| v as usize).collect(), d.iter().map(|&v| v as usize).collect(), p[..p.len() / 2].to_vec())
                };
                let w = inner(memo)?;
                if k.len() != rank || s.len() != rank || d.len() != rank || pb.len() != rank {
                    return None;
                }
                Some(
                    (0..rank)
                        .map(|a| {
                            let (si, lo0) = (w[a].stride, -pb[a] * w[a].stride);
                            let taps = if k[a] > 1 { d[a] as i64 * si } else { 0 };
                            Win {
                                stride: s[a] as i64 * si,
                                lo: lo0 + w[a].lo,
                                hi: lo0 + (d[a] * (k[a] - 1)) as i64 * si + w[a].hi,
                                step: gcd(taps, w[a].step),
                            }
                        })
                        .collect(),
                )
            }
            "Pad" | "Slice" => {
                let (b, _) = if is_op(n, "Pad") {
                    let (pb, pe) = read_pad(&cx.consts, n, rank + 2, cx.opset).ok()?;
                    (pb.iter().map(|v| -v).collect::<Vec<_>>(), pe)
                } else {
                    read_slice(&cx.consts, n, rank + 2, cx.opset).ok()?
                };
                let w = inner(memo)?;
                // y[j] reads the inner tensor at j + b
                Some(
                    (0..rank)
                        .map(|a| Win { lo: w[a].lo + b[a] * w[a].stride, hi: w[a].hi + b[a] * w[a].stride, ..w[a] })
                        .collect(),
                )
            }
            "BatchNormalization" | "Identity" | "Cast" | "Neg" | "Mul" | "Div" | "Add" | "Sub" | "Sum" => {
                let mut acc: Option<Vec<Win>> = None;
                for i in n.input.iter().filter(|i| !i.is_empty()) {
                    if cx.consts.value(i).is_ok() || cx.ix.constant(cx.g, i).is_some() {
                        continue;
                    }
                    let w = window(cx, r, i, rank, memo, depth + 1)?;
                    acc = Some(match acc {
                        None => w,
                        Some(a) => {
                            if a.iter().zip(&w).any(|(p, q)| p.stride != q.stride) {
                                return None;
                            }
                            a.iter().zip(&w).map(|(p, q)| union(p, q)).collect()
                        }
                    });
                }
                acc
            }
            _ => None,
        }
    })();
    memo.insert(t.to_string(), v.clone());
    v
}

/// The geometry of the convolution a region may be: kernel, strides, dilations, begin pads, and
/// the Conv whose node it takes (with its groups and output channels), if one reads x.
struct Geometry {
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<i64>,
    /// `None`: from the region's output size
    pads_end: Option<Vec<i64>>,
    base: Option<(usize, AffineConv)>,
}

/// The geometry: the largest Conv reading x, or else the window the region's operators give.
fn geometry(cx: &Cx, r: &Region, y: &str, rank: usize) -> Option<Geometry> {
    let mut base: Option<(usize, AffineConv)> = None;
    for &p in &r.dep {
        let n = cx.node(p);
        if is_op(n, "Conv") && n.input[0] == r.x {
            // a conv whose weight is computed (e.g. DBB's weight + identity) is evaluated, not read
            let Ok((k, _)) = read_conv(&cx.consts, n) else { continue };
            let vol: usize = k.kernel().iter().product();
            if k.rank() == rank && base.as_ref().is_none_or(|(_, b)| vol > b.kernel().iter().product()) {
                base = Some((p, k));
            }
        }
    }
    let w = window(cx, r, y, rank, &mut HashMap::new(), 0);
    if let Some((p, b)) = base {
        // the Conv's own geometry, unless the region's operators read past its window (then
        // their union, undilated)
        let own: Vec<Win> = (0..rank)
            .map(|a| {
                let lo = -b.pads_begin[a];
                let (k, d) = (b.kernel()[a] as i64, b.dilations[a] as i64);
                Win { stride: b.strides[a] as i64, lo, hi: lo + d * (k - 1), step: if k > 1 { d } else { 0 } }
            })
            .collect();
        // inside the Conv's window, on its taps
        let inside = |w: &[Win]| {
            (0..rank).all(|a| {
                let (o, d) = (own[a], b.dilations[a] as i64);
                w[a].lo >= o.lo && w[a].hi <= o.hi && (w[a].lo - o.lo) % d == 0 && w[a].step % d == 0
            })
        };
        let same_stride = |w: &[Win]| (0..rank).all(|a| w[a].stride == own[a].stride);
        match w.filter(|w| same_stride(w) && !inside(w)) {
            None => {
                return Some(Geometry {
                    kernel: b.kernel().to_vec(),
                    strides: b.strides.clone(),
                    dilations: b.dilations.clone(),
                    pads_begin: b.pads_begin.clone(),
                    pads_end: Some(b.pads_end.clone()),
                    base: Some((p, b)),
                })
            }
            Some(w) => {
                let w: Vec<Win> = (0..rank).map(|a| union(&w[a], &own[a])).collect();
                return Some(Geometry { base: Some((p, b)), ..of_window(&w) });
            }
        }
    }
    Some(of_window(&w?))
}

/// Two windows' union (the same stride).
fn union(p: &Win, q: &Win) -> Win {
    Win { stride: p.stride, lo: p.lo.min(q.lo), hi: p.hi.max(q.hi), step: gcd(gcd(p.step, q.step), p.lo - q.lo) }
}

/// The geometry of a window: dilated by its step, starting at most at position 0 (the end pads
/// from the region's output size).
fn of_window(w: &[Win]) -> Geometry {
    let lo: Vec<i64> = w.iter().map(|w| w.lo.min(0)).collect();
    let dil: Vec<i64> = w.iter().zip(&lo).map(|(w, &l)| gcd(w.step, w.lo - l).max(1)).collect();
    Geometry {
        kernel: (0..w.len()).map(|a| ((w[a].hi - lo[a]) / dil[a] + 1).max(1) as usize).collect(),
        strides: w.iter().map(|w| w.stride.max(1) as usize).collect(),
        dilations: dil.iter().map(|&d| d as usize).collect(),
        pads_begin: lo.iter().map(|l| -l).collect(),
        pads_end: None,
        base: None,
    }
}

/// The multi-indices of a shape, in row-major order.
fn indices(shape: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
    let n: usize = shape.iter().product();
    (0..n).map(move |mut f| {
        let mut v = vec![0; shape.len()];
        for a in (0..shape.len()).rev() {
            v[a] = f % shape[a];
            f /= shape[a];
        }
        v
    })
}

/// The convolution the region computes, with the node whose name and attributes it takes.
fn recover(cx: &Cx, r: &Region, y: &str, ft: FloatType) -> Result<(AffineConv, Option<usize>), Reason> {
    let xshape = cx.shape_of(&r.x).ok_or_else(|| RegionReason::SizeUnknown { tensor: r.x.clone() })?;
    if xshape.len() < 3 {
        return Err(RegionReason::InputShape(xshape).into());
    }
    let rank = xshape.len() - 2;
    let geo = geometry(cx, r, y, rank).ok_or(RegionReason::NoConv)?;
    let c = xshape[1];
    if geo.base.as_ref().is_some_and(|(_, b)| b.in_channels() != c) {
        return Err(RegionReason::InputShape(xshape).into());
    }
    let mut shape = xshape.clone();
    shape[0] = 1;
    let len: Vec<i64> = shape[2..].iter().map(|&d| d as i64).collect();
    let numel: usize = shape.iter().product();
    // how big the region's tensors may grow (never from the analysed shapes, which an absurd Pad
    // inflates too): the input times the channel ratio of the Conv reading it
    let bound = numel.saturating_mul(geo.base.as_ref().map_or(4, |(_, b)| b.out_channels().div_ceil(c).max(1)));
    let plan = RegionPlan::new(&submodel(cx, r, y, &shape)?, &shape, bound).map_err(RegionReason::CannotEvaluate)?;
    let eval = |x: &ArrayD<f64>| plan.eval(x).map_err(RegionReason::Tract);
    // the output's shape is checked before anything is evaluated (a Pad of the batch axis can
    // make it thousands of times the Conv's output: found by fuzzing, ~1 s a region)
    let ys = plan.output_shape().to_vec();
    let o = ys.get(1).copied().unwrap_or(0);
    let (k, s, d, pb) = (&geo.kernel, &geo.strides, &geo.dilations, &geo.pads_begin);
    // the end pads: the Conv's, or what gives the region's output size
    let pe: Vec<i64> = match &geo.pads_end {
        Some(pe) => pe.clone(),
        None => {
            if ys.len() != rank + 2 {
                return Err(RegionReason::Geometry.into());
            }
            (0..rank)
                .map(|a| (ys[a + 2] as i64 - 1) * s[a] as i64 + (d[a] * (k[a] - 1)) as i64 + 1 - len[a] - pb[a])
                .collect()
        }
    };
    if pe.iter().chain(pb).any(|&p| p < 0) {
        return Err(RegionReason::Geometry.into());
    }
    let out: Vec<i64> =
        (0..rank).map(|a| (len[a] + pb[a] + pe[a] - (d[a] * (k[a] - 1)) as i64 - 1).div_euclid(s[a] as i64) + 1).collect();
    let mut want = vec![1i64, o as i64];
    want.extend(&out);
    let o_base = geo.base.as_ref().map_or(o, |(_, b)| b.out_channels());
    if ys.iter().map(|&v| v as i64).ne(want.iter().copied()) || o != o_base || out.iter().any(|&v| v < 1) {
        want[1] = o_base as i64;
        return Err(RegionReason::OutputShape { got: ys, want }.into());
    }
    let y0 = eval(&ArrayD::zeros(IxDyn(&shape)))?;
    // Evaluated in float64, the region differs from a convolution only by the rounding of its
    // own stored constants (DBB's pad value is stored rounded to the model's dtype, the BN it
    // stands for is computed): a few units of the dtype's precision, never a float32 evaluation's.
    let eps = 16.0 * ft_eps(ft);
    let scale0 = y0.iter().fold(1f64, |m, v| m.max(v.abs()));
    let centre: Vec<i64> = out.iter().map(|&v| v / 2).collect();
    let mut bias = Array1::zeros(o);
    for oc in 0..o {
        let plane = y0.index_axis(Axis(1), oc);
        // the value inside (at the borders a padding may hold a stored, rounded value)
        let mut at = vec![0];
        at.extend(centre.iter().map(|&v| v as usize));
        let v = plane[IxDyn(&at)];
        if plane.iter().any(|&u| (u - v).abs() > eps * scale0) {
            return Err(RegionReason::BiasNotConstant.into());
        }
        bias[oc] = v;
    }
    // impulses, per input channel: at the centre, and wherever a tap the centre cannot show
    // (a stride phase, a tap past the output's edge) is seen
    let mut wshape = vec![o, c];
    wshape.extend(k.iter());
    // a tap is seen only where some output position reads a real input through it, so a kernel
    // longer than outputs x inputs on an axis cannot be probed; and the weights are bounded
    // before they are allocated (a huge stride and padding keep the output small while the
    // kernel grows: found by fuzzing)
    if (0..rank).any(|a| k[a] as u128 > out[a] as u128 * len[a].max(0) as u128) {
        return Err(RegionReason::InputTooSmall.into());
    }
    let weights = wshape.iter().fold(1u128, |n, &v| n.saturating_mul(v as u128));
    if weights > KERNEL_LIMIT {
        return Err(RegionReason::KernelTooBig { weights }.into());
    }
    let mut weight = ArrayD::zeros(IxDyn(&wshape));
    let mut seen = ArrayD::from_elem(IxDyn(&wshape[1..]), false);
    let out_u: Vec<usize> = out.iter().map(|&v| v as usize).collect();
    let mut probes: std::collections::BTreeSet<Vec<i64>> = std::collections::BTreeSet::new();
    for t in indices(k) {
        let mut q = Vec::with_capacity(rank);
        for a in 0..rank {
            let (sa, tap) = (s[a] as i64, (t[a] * d[a]) as i64 - pb[a]);
            // output position o reads input o·s + tap: the one nearest the centre with 0 <= q < L
            let lo_o = (-tap).div_euclid(sa) + i64::from((-tap).rem_euclid(sa) != 0);
            let hi_o = (len[a] - 1 - tap).div_euclid(sa);
            let (lo_o, hi_o) = (lo_o.max(0), hi_o.min(out[a] - 1));
            if lo_o > hi_o {
                return Err(RegionReason::InputTooSmall.into());
            }
            let o_a = centre[a].clamp(lo_o, hi_o);
            q.push(o_a * sa + tap);
        }
        probes.insert(q);
    }
    for ci in 0..c {
        for q in &probes {
            let mut x = ArrayD::zeros(IxDyn(&shape));
            let mut at = vec![0, ci];
            at.extend(q.iter().map(|&v| v as usize));
            x[IxDyn(&at)] = 1.0;
            let resp = eval(&x)? - &y0;
            let tol = eps * resp.iter().fold(scale0, |m, v| m.max(v.abs()));
            for pos in indices(&out_u) {
                // the tap of position `pos` that reads q, if it is one
                let tap: Option<Vec<usize>> = (0..rank)
                    .map(|a| {
                        let t = q[a] - pos[a] as i64 * s[a] as i64 + pb[a];
                        let dd = d[a] as i64;
                        (t >= 0 && t % dd == 0 && t / dd < k[a] as i64).then_some((t / dd) as usize)
                    })
                    .collect();
                for oc in 0..o {
                    let mut ri = vec![0, oc];
                    ri.extend(&pos);
                    let v = resp[IxDyn(&ri)];
                    match &tap {
                        Some(t) => {
                            let mut wi = vec![oc, ci];
                            wi.extend(t);
                            weight[IxDyn(&wi)] = v;
                            let mut si = vec![ci];
                            si.extend(t);
                            seen[IxDyn(&si)] = true;
                        }
                        None if v.abs() > tol => return Err(RegionReason::ReadsOutsideWindow.into()),
                        None => {}
                    }
                }
            }
        }
    }
    if seen.iter().any(|&v| !v) {
        return Err(RegionReason::InputTooSmall.into());
    }
    let groups = groups_of(&weight, geo.base.as_ref().map(|(_, b)| b.groups));
    let weight = if groups > 1 {
        let (og, cg) = (o / groups, c / groups);
        let mut gshape = wshape.clone();
        gshape[1] = cg;
        let mut gw = ArrayD::zeros(IxDyn(&gshape));
        for oc in 0..o {
            let g0 = (oc / og) * cg;
            gw.index_axis_mut(Axis(0), oc).assign(&weight.index_axis(Axis(0), oc).slice_axis(Axis(0), (g0..g0 + cg).into()));
        }
        gw
    } else {
        weight
    };
    let conv = AffineConv::new(weight, Some(bias), groups, s.clone(), d.clone(), pb.clone(), pe);
    // check on random inputs (borders included) against the region itself
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2 {
        let x: ArrayD<f64> = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.random_range(-1.0..1.0));
        let want = eval(&x)?;
        let got = conv.apply(&x);
        let mag = want.iter().fold(1f64, |a, v| a.max(v.abs()));
        let diff = want.iter().zip(got.iter()).fold(0f64, |a, (p, q)| a.max((p - q).abs()));
        if got.shape() != want.shape() || diff > 4.0 * eps * mag {
            return Err(RegionReason::NotRecovered { max_diff: diff }.into());
        }
    }
    Ok((conv, geo.base.map(|(p, _)| p)))
}

/// The precision of a float type (the distance from 1 to the next value).
fn ft_eps(ft: FloatType) -> f64 {
    match ft {
        FloatType::F64 => f64::EPSILON,
        FloatType::F32 => f32::EPSILON as f64,
        FloatType::F16 => 2f64.powi(-10),
        FloatType::BF16 => 2f64.powi(-7),
    }
}

/// The groups of a dense kernel `[O, C, k...]`: the Conv's own when the kernel is block-diagonal
/// with them, else the most blocks it is block-diagonal with (1 when it is dense).
fn groups_of(w: &ArrayD<f64>, hint: Option<usize>) -> usize {
    let (o, c) = (w.shape()[0], w.shape()[1]);
    let diagonal = |g: usize| {
        let (og, cg) = (o / g, c / g);
        (0..o).all(|oc| (0..c).all(|ci| ci / cg == oc / og || w.index_axis(Axis(0), oc).index_axis(Axis(0), ci).iter().all(|&v| v == 0.0)))
    };
    if let Some(g) = hint.filter(|&g| g > 1 && o % g == 0 && c % g == 0 && diagonal(g)) {
        return g;
    }
    if hint.is_some() {
        return 1;
    }
    (1..=o.min(c)).rev().find(|&g| o % g == 0 && c % g == 0 && diagonal(g)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::driver::at_node;
    use crate::support::{attr_ints, Builder, ConvAttrs};

    fn check_at(b: &Builder, root: &str) -> Checked<Plan> {
        at_node(b, root, |cx, at| AffineRegion.check(cx, &AffineRegion.find(cx, at).expect("a region")))
    }

    /// Conv3x3(x) + AveragePool3x3(x) (zero-padded, borders counted): one 3x3 Conv.
    fn conv_plus_pool(pool_pads: &[i64]) -> Builder {
        let mut b = Builder::new(2, 6, 6);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let attrs = vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", pool_pads)];
        let p = b.node("AveragePool", "pool", &["x"], &[], attrs);
        let y = b.add("sum", &c, &p);
        b.output(&y);
        b
    }

    #[test]
    fn a_conv_plus_an_average_pool_is_recovered_as_one_conv() {
        let mut b = conv_plus_pool(&[1, 1, 1, 1]);
        // count_include_pad: the pool is a plain 1/9 kernel at the borders too
        b.graph.node[1].attribute.push(crate::support::attr_int("count_include_pad", 1));
        let Checked::Fits(plan) = check_at(&b, "sum") else { panic!("refused") };
        assert_eq!((plan.conv.kernel(), plan.conv.groups), (&[3usize, 3][..], 1));
    }

    #[test]
    fn a_pool_that_excludes_the_padding_is_not_a_conv() {
        // without count_include_pad the border taps are divided by fewer: not one convolution
        let Checked::Refused(r) = check_at(&conv_plus_pool(&[1, 1, 1, 1]), "sum") else { panic!("fused") };
        assert!(matches!(r[..], [Reason::Region(RegionReason::NotRecovered { .. })]), "{r:?}");
    }

    #[test]
    fn a_negative_pad_is_refused_before_tract_runs() {
        let mut b = Builder::new(2, 6, 6);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let p = b.pad("crop", "x", &[0, 0, -1, 0, 0, 0, 1, 0], None);
        let t = b.node("Transpose", "t", &[&p], &[], vec![attr_ints("perm", &[0, 1, 2, 3])]);
        let y = b.add("sum", &c, &t);
        b.output(&y);
        let Checked::Refused(r) = check_at(&b, "sum") else { panic!("fused") };
        assert_eq!(r, [Reason::Region(RegionReason::NegativePad { pad: "crop".into() })]);
    }

    /// Fuse; the model must be one Conv (plus `others`) computing what it did (in tract).
    fn fuses_to_one_conv(b: &Builder, x_shape: &[usize], others: &[&str]) -> AffineConv {
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        let mut ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).filter(|o| *o != "Conv").collect();
        ops.sort_unstable();
        assert_eq!(ops, others, "{}", report.summary());
        let x = crate::support::rand_input(5, x_shape);
        let (want, got) = (crate::support::run_f32(&original, std::slice::from_ref(&x)), crate::support::run_f32(&m, &[x]));
        crate::support::assert_close(&got, &want, 1e-5, "fused vs original, in tract");
        let convs: Vec<&NodeProto> = m.graph().node.iter().filter(|n| n.op_type() == "Conv").collect();
        assert_eq!(convs.len(), 1);
        crate::support::conv_of(&m.proto, convs[0])
    }

    /// A region of `rank` spatial axes: Conv(x) (dilated) + AveragePool(Pad(x)).
    fn conv_plus_padded_pool(rank: usize, dilation: usize) -> Builder {
        let mut b = Builder::new(2, 9, 9);
        let dims: Vec<i64> = [1, 2].into_iter().chain(std::iter::repeat_n(9, rank)).collect();
        b.graph.input[0] = crate::support::tensor_info("x", crate::proto::tensor_proto::DataType::Float, &dims);
        let k = vec![3; rank];
        let pads: Vec<i64> = vec![dilation as i64; 2 * rank];
        let attrs = ConvAttrs::pads(&pads).dilations(&vec![dilation as i64; rank]);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &k, true, attrs);
        let mut pad_amounts = vec![0i64; 2 * (rank + 2)];
        for a in 0..rank {
            pad_amounts[2 + a] = 1;
            pad_amounts[rank + 4 + a] = 1;
        }
        let p = b.pad("pad", "x", &pad_amounts, None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &vec![3; rank])]);
        let y = b.add("sum", &c, &pool);
        b.output(&y);
        b
    }

    #[test]
    fn regions_of_one_and_three_axes_are_recovered() {
        for rank in [1, 3] {
            let k = fuses_to_one_conv(&conv_plus_padded_pool(rank, 1), &[[1usize, 2].as_slice(), &vec![9; rank]].concat(), &[]);
            assert_eq!(k.kernel(), vec![3; rank].as_slice());
        }
    }

    #[test]
    fn a_dilated_region_is_recovered() {
        // a dilated 3x3 (window 5) and a 3x3 pool inside that window: the pool's taps are
        // between the dilated taps, so the region is a dense 5x5, not the dilated 3x3
        let k = fuses_to_one_conv(&conv_plus_padded_pool(2, 2), &[1, 2, 9, 9], &[]);
        assert_eq!((k.kernel(), k.dilations.as_slice()), (&[5usize, 5][..], &[1usize, 1][..]));
        // dilated branches only (a dilated 3x3, and a dilated 3x3 pool): the dilated 3x3 it is
        let mut b = Builder::new(2, 9, 9);
        let (c, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], true, ConvAttrs::pads(&[2, 2, 2, 2]).dilations(&[2, 2]));
        let p = b.pad("pad", "x", &[0, 0, 2, 2, 0, 0, 2, 2], None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("dilations", &[2, 2])]);
        let y = b.add("sum", &c, &pool);
        b.output(&y);
        let k = fuses_to_one_conv(&b, &[1, 2, 9, 9], &[]);
        assert_eq!((k.kernel(), k.dilations.as_slice()), (&[3usize, 3][..], &[2usize, 2][..]));
    }

    #[test]
    fn without_a_conv_the_geometry_comes_from_the_operators() {
        // x + BN(x) + AveragePool(Pad(x)): a depthwise 3x3 conv (PoolFormer-like token mixer)
        let mut b = Builder::new(3, 6, 6);
        let (n, _) = b.bn("norm", "x", 3, None);
        let p = b.pad("pad", "x", &[0, 0, 1, 1, 0, 0, 1, 1], None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &[3, 3])]);
        let s1 = b.add("s1", "x", &n);
        let y = b.add("sum", &s1, &pool);
        b.output(&y);
        let k = fuses_to_one_conv(&b, &[1, 3, 6, 6], &[]);
        assert_eq!((k.kernel(), k.groups), (&[3usize, 3][..], 3));
    }

    #[test]
    fn the_region_starts_at_the_sums_identity_operand() {
        // x = 0.5·h (the tail of a decomposed GELU); x + AveragePool(Pad(x)): the walk must stop
        // at x, not go on through the Mul to h
        let mut b = Builder::new(2, 6, 6);
        let half = b.initializer("half", &ndarray::arr0(0.5).into_dyn());
        let x = b.node("Mul", "act", &["x", &half], &["act_out"], vec![]);
        let p = b.pad("pad", &x, &[0, 0, 1, 1, 0, 0, 1, 1], None);
        let pool = b.node("AveragePool", "pool", &[&p], &[], vec![attr_ints("kernel_shape", &[3, 3])]);
        let y = b.add("sum", &x, &pool);
        b.output(&y);
        let at = at_node(&b, "sum", |cx, at| AffineRegion.find(cx, at).map(|c| c.region.map(|r| r.x)));
        assert_eq!(at, Some(Ok("act_out".to_string())));
        fuses_to_one_conv(&b, &[1, 2, 6, 6], &["Mul"]);
    }
}
