//! The general path: a region between a tensor x and a sum y in which every operator is affine
//! in x with constant parameters (Conv, BatchNormalization, Add/Sub/Mul/Div by constants, Pad,
//! AveragePool, Slice, ScatterND, Transpose, Reshape, Where with constant conditions, shape
//! arithmetic …) is replaced by one Conv when, as a whole, it is one.
//!
//! This is what catches Diverse Branch Block's BN-and-pad, which exporters render as Pad →
//! Transpose → ScatterND chains (dynamo) or hundreds of Shape/Range/Where/ScatterND nodes
//! (TorchScript).
//! - find: at the root of a sum, walk back and collect the region (refused when a tensor inside
//!   it is read outside, or it holds a Pad with negative amounts, which tract cannot run).
//! - check: cut the region out as a small model and evaluate it in tract at the model's own
//!   input size: the bias is its response to zero, the kernel its response to impulses, with the
//!   geometry (kernel size, stride, padding, groups) of the largest Conv reading x. The candidate
//!   Conv is then compared with the region on random inputs, borders included. Evaluation runs in
//!   float32 (tract), so weights found this way carry float32 rounding (~1e-7 relative), unlike
//!   the exact f64 rules.
//! - rewrite: the Conv replaces the region.

use super::sum_tree::is_root;
use super::{kernel_str, rewired_conv, Checked, Cx, Patch, Reason, RegionReason, Rewrite, Rule, RuleId};
use crate::graph::{attr_int, attr_ints, is_default_domain, is_op, GraphIndex, Names};
use crate::kernel::read::read_conv;
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;
use crate::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::tract::RegionPlan;
use ndarray::{Array1, ArrayD, IxDyn};
use std::collections::{HashMap, HashSet};

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

/// The recovered convolution, the node whose name and attributes it takes, and its dtype.
pub(crate) struct Plan {
    conv: AffineConv,
    base: usize,
    ft: FloatType,
}

impl Rule for AffineRegion {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::AFFINE_REGION;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        if !is_root(cx, at) {
            return None;
        }
        let y = &cx.node(at).output[0];
        let region = find_region(cx, y).transpose()?;
        Some(Candidate { root: at, region })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let region = match &c.region {
            Ok(r) => r,
            Err(e) => return Checked::refuse(e.clone()),
        };
        let y = &cx.node(c.root).output[0];
        let (conv, base) = match recover(cx, region, y) {
            Ok(v) => v,
            Err(e) => return Checked::refuse(e),
        };
        match cx.consts.f64(&cx.node(base).input[1]) {
            Ok((_, ft)) => Checked::Fits(Plan { conv, base, ft }),
            Err(e) => Checked::refuse(Reason::Const(e)),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let region = c.region.expect("checked");
        let y = &cx.node(c.root).output[0];
        let Plan { conv, base, ft } = plan;
        let bnode = cx.node(base);
        let mut names = Names::new(cx.g);
        let wname = names.fresh(&format!("{}_region", bnode.input[1]));
        let bname = names.fresh(&format!("{wname}_bias"));
        let mut node = rewired_conv(bnode, &region.x, &wname, &bname, y);
        node.attribute.retain(|a| a.name() != "group");
        node.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(conv.groups as i64),
            r#type: Some(AttributeType::Int as i32),
            ..Default::default()
        });
        let detail = format!(
            "{} nodes between '{}' and '{}' into Conv '{}' {}",
            region.dep.len(),
            region.x,
            y,
            bnode.name(),
            kernel_str(conv.kernel())
        );
        Patch {
            at: c.root,
            remove: region.dep,
            insert: vec![node],
            initializers: vec![(wname, conv.weight, ft), (bname, conv.bias.into_dyn(), ft)],
            log: Rewrite { rule: Self::ID, node: bnode.name().to_string(), detail, weights: vec![] },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).name().to_string()
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
            if depth > 2000 || sub || !is_default_domain(n) || RANDOM.contains(&n.op_type()) {
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

/// Walk back from `y`; `Ok(None)` when there is no single-input affine region worth taking.
fn find_region(cx: &Cx, y: &str) -> Result<Option<Region>, RegionReason> {
    let (g, ix) = (cx.g, cx.ix);
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
        stack.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
    }
    if frontier.len() != 1 || !dep.iter().any(|&p| g.node[p].output[0] == y) {
        return Ok(None);
    }
    let x = frontier.into_iter().next().expect("one tensor");
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
                return Err(RegionReason::NegativePad { pad: n.name().to_string() });
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

/// The region as a model of its own: input x (concrete shape), output y.
fn submodel(cx: &Cx, r: &Region, y: &str, shape: &[usize]) -> Result<ModelProto, RegionReason> {
    let g = cx.g;
    let mut nodes: Vec<usize> = r.dep.iter().chain(&r.stat).copied().collect();
    nodes.sort_unstable();
    let needed: HashSet<&str> = nodes.iter().flat_map(|&p| g.node[p].input.iter().map(|s| s.as_str())).collect();
    let mut inits = Vec::new();
    for t in &g.initializer {
        if needed.contains(t.name()) {
            let mut t = t.clone();
            cx.model.inline_tensor(&mut t).map_err(|e| RegionReason::Tract(e.to_string()))?;
            inits.push(t);
        }
    }
    let tensor_type = |dims: Option<&[usize]>| TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(DataType::Float as i32),
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
            node: nodes.iter().map(|&p| g.node[p].clone()).collect(),
            initializer: inits,
            input: vec![ValueInfoProto { name: Some(r.x.clone()), r#type: Some(tensor_type(Some(shape))), ..Default::default() }],
            output: vec![ValueInfoProto { name: Some(y.to_string()), r#type: Some(tensor_type(None)), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The convolution the region computes, with the node whose geometry it takes.
fn recover(cx: &Cx, r: &Region, y: &str) -> Result<(AffineConv, usize), Reason> {
    // the geometry: the largest Conv reading x
    let mut base: Option<(usize, AffineConv)> = None;
    for &p in &r.dep {
        let n = cx.node(p);
        if is_op(n, "Conv") && n.input[0] == r.x {
            // a conv whose weight is computed (e.g. DBB's weight + identity) is evaluated, not read
            let Ok((k, _)) = read_conv(&cx.consts, n) else { continue };
            let vol: usize = k.kernel().iter().product();
            if base.as_ref().is_none_or(|(_, b)| vol > b.kernel().iter().product()) {
                base = Some((p, k));
            }
        }
    }
    let (bp, b) = base.ok_or(RegionReason::NoConv)?;
    if b.rank() != 2 || b.dilations.iter().any(|&d| d != 1) {
        return Err(RegionReason::Geometry.into());
    }
    let shape = cx.shape_of(&r.x).ok_or_else(|| RegionReason::SizeUnknown { tensor: r.x.clone() })?;
    if shape.len() != 4 || shape[1] != b.in_channels() {
        return Err(RegionReason::InputShape(shape).into());
    }
    let shape = vec![1, shape[1], shape[2], shape[3]];
    let (c, h, w) = (shape[1], shape[2] as i64, shape[3] as i64);
    let (kh, kw) = (b.kernel()[0] as i64, b.kernel()[1] as i64);
    let (sh, sw) = (b.strides[0] as i64, b.strides[1] as i64);
    let (ph, pw) = (b.pads_begin[0], b.pads_begin[1]);
    let o = b.out_channels();
    let (ho, wo) = ((h + ph + b.pads_end[0] - kh) / sh + 1, (w + pw + b.pads_end[1] - kw) / sw + 1);
    let out = o.saturating_mul(ho.max(0) as usize).saturating_mul(wo.max(0) as usize);
    let plan = RegionPlan::new(&submodel(cx, r, y, &shape)?, &shape, out).map_err(RegionReason::CannotEvaluate)?;
    let eval = |x: &ArrayD<f32>| plan.eval(x).map_err(RegionReason::Tract);
    let y0 = eval(&ArrayD::zeros(IxDyn(&shape)))?;
    if y0.shape() != [1, o, ho as usize, wo as usize] {
        return Err(RegionReason::OutputShape { got: y0.shape().to_vec(), want: [1, o as i64, ho, wo] }.into());
    }
    let mut bias = Array1::zeros(o);
    for oc in 0..o {
        let plane = y0.slice(ndarray::s![0, oc, .., ..]);
        let v = plane[[0usize, 0usize]];
        if plane.iter().any(|&u| (u - v).abs() > 1e-5 * v.abs().max(1.0)) {
            return Err(RegionReason::BiasNotConstant.into());
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
                    return Err(RegionReason::InputTooSmall.into());
                }
                let mut x = ArrayD::zeros(IxDyn(&shape));
                x[[0, ci, qh as usize, qw as usize]] = 1.0f32;
                let resp = eval(&x)? - &y0;
                for oh in 0..ho {
                    for ow in 0..wo {
                        let (i, j) = (qh - oh * sh + ph, qw - ow * sw + pw);
                        for oc in 0..o {
                            let v = resp[[0, oc, oh as usize, ow as usize]];
                            if i >= 0 && i < kh && j >= 0 && j < kw {
                                weight[[oc, ci, i as usize, j as usize]] = v;
                            } else if v.abs() > 1e-5 {
                                return Err(RegionReason::ReadsOutsideWindow.into());
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
    let block = (0..o).all(|oc| {
        (0..c).all(|ci| ci / cg == oc / og || weight.slice(ndarray::s![oc, ci, .., ..]).iter().all(|&v| v == 0.0))
    });
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
        let want = eval(&x)?;
        let got = conv.apply(&x.mapv(|v| v as f64));
        let mag = want.iter().fold(1f64, |a, v| a.max(v.abs()));
        let diff = want.iter().zip(got.iter()).fold(0f64, |a, (p, q)| a.max((p - q).abs()));
        if diff > 1e-4 * mag {
            return Err(RegionReason::NotRecovered { max_diff: diff }.into());
        }
    }
    Ok((conv, bp))
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
}
