//! A BatchNormalization after a linear layer folds into it (LeViT's `LinearNorm`: Linear →
//! BatchNorm1d over the flattened tokens; BatchNorm1d after a Linear): the layer's output
//! columns are scaled by t and the shift goes into its bias: W' = W·diag(t), b' = b·t + s.
//!
//! - find: a BatchNormalization whose input comes, through Reshape / Flatten / Squeeze /
//!   Unsqueeze / Identity / Transpose nodes read only on that path (or by a Shape), from a MatMul with a constant
//!   2-d right operand (optionally followed by the Add of a constant bias) or from a Gemm, with the
//!   BN's channels the layer's output columns.
//! - check: the layer's weights are constants; a bias broadcasts per column.
//! - rewrite: the layer gets the scaled weights (and bias); the BN is removed, or, when there is no
//!   bias to take its shift (a MatMul without one), becomes the Add of that shift, as a deployed
//!   `Linear` is exported (MatMul + Add).

use super::{Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{attr_float, attr_int, attr_ints, is_default_domain, is_op, Label, Names};
use crate::kernel::read::read_bn;
use crate::model::tensor::FloatType;
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use ndarray::{Array1, ArrayD, Axis, IxDyn};
use std::collections::HashMap;

pub(crate) struct FoldBnLinear;

enum Layer {
    /// the MatMul, and the Add of its bias (node, index of the constant operand)
    MatMul(usize, Option<(usize, usize)>),
    Gemm(usize),
}

pub(crate) struct Candidate {
    bn: usize,
    layer: Layer,
}

pub(crate) struct Plan {
    nodes: HashMap<usize, NodeProto>,
    remove: Vec<usize>,
    inits: Vec<(String, ArrayD<f64>, FloatType)>,
}

impl Rule for FoldBnLinear {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::FOLD_BN_LINEAR;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let bn = cx.node(at);
        if !is_op(bn, "BatchNormalization") {
            return None;
        }
        // the structure first (shapes may need tract's analysis of the whole model)
        let mut t = bn.input.first()?.clone();
        for _ in 0..16 {
            let n = cx.producer_node(&t)?;
            if ["MatMul", "Gemm", "Add"].iter().any(|op| is_op(n, op)) {
                break;
            }
            if !["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"].iter().any(|op| is_op(n, op)) {
                return None;
            }
            t = n.input.first()?.clone();
        }
        // walk back from the BN's input with its channel axis (1)
        let mut t = bn.input.first()?.clone();
        let mut shape = cx.shape_of(&t)?;
        let mut axis = 1;
        for _ in 0..16 {
            if value_reads(cx, &t) != 1 || cx.ix.outputs.contains(&t) || shape.len() <= axis {
                return None;
            }
            let p = cx.producer(&t)?;
            let n = cx.node(p);
            if !is_default_domain(n) || n.output.len() != 1 {
                return None;
            }
            let last = axis + 1 == shape.len();
            match n.op_type() {
                "MatMul" if last && cx.consts.f64(&n.input[1]).is_ok_and(|(w, _)| w.ndim() == 2) => {
                    return Some(Candidate { bn: at, layer: Layer::MatMul(p, None) });
                }
                "Gemm" if axis == 1 && shape.len() == 2 => return Some(Candidate { bn: at, layer: Layer::Gemm(p) }),
                "Add" if last && n.input.len() == 2 => {
                    // a Linear's bias after its MatMul
                    let (k, m) = if cx.consts.f64(&n.input[1]).is_ok() { (1, 0) } else { (0, 1) };
                    let (b, _) = cx.consts.f64(&n.input[k]).ok()?;
                    let s = b.shape();
                    let per_col = s.last().is_some_and(|&d| d == shape[axis] || d == 1)
                        && s[..s.len() - 1].iter().all(|&d| d == 1);
                    let mm = cx.producer(&n.input[m])?;
                    let mn = cx.node(mm);
                    let w_ok = cx.consts.f64(mn.input.get(1)?).is_ok_and(|(w, _)| w.ndim() == 2);
                    if !per_col || !is_op(mn, "MatMul") || !w_ok || value_reads(cx, &n.input[m]) != 1 {
                        return None;
                    }
                    return Some(Candidate { bn: at, layer: Layer::MatMul(mm, Some((p, k))) });
                }
                "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" => {
                    let input = cx.shape_of(&n.input[0])?;
                    if input.iter().product::<usize>() != shape.iter().product::<usize>() {
                        return None;
                    }
                    let after: usize = shape[axis..].iter().product();
                    // the same channels, the same elements after them
                    axis = (0..input.len())
                        .find(|&a| input[a] == shape[axis] && input[a..].iter().product::<usize>() == after)?;
                    shape = input;
                }
                "Transpose" => {
                    let perm: Vec<usize> = match attr_ints(n, "perm") {
                        Some(v) => v.iter().map(|&a| usize::try_from(a).ok()).collect::<Option<_>>()?,
                        None => (0..shape.len()).rev().collect(),
                    };
                    axis = *perm.get(axis)?;
                    shape = cx.shape_of(&n.input[0])?;
                }
                _ => return None,
            }
            t = n.input[0].clone();
        }
        None
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let bn = cx.node(c.bn);
        let (p, _) = match read_bn(&cx.consts, bn) {
            Ok(v) => v,
            Err(err) => return Checked::refuse(Reason::Bn(err)),
        };
        let (t, s) = p.affine();
        let mut names = cx.names();
        let mut plan = Plan { nodes: HashMap::new(), remove: vec![c.bn], inits: vec![] };
        let r = match c.layer {
            Layer::MatMul(mm, add) => matmul(cx, c.bn, mm, add, &t, &s, &mut names, &mut plan),
            Layer::Gemm(g) => gemm(cx, g, &t, &s, &mut names, &mut plan),
        };
        if let Err(e) = r {
            return Checked::refuse(e);
        }
        if !plan.remove.is_empty() {
            // the BN goes: the node before it writes its output instead
            let (u, y) = (&bn.input[0], &bn.output[0]);
            let Some(p) = cx.producer(u) else { return Checked::refuse(Reason::NoConv) };
            let n = plan.nodes.entry(p).or_insert_with(|| cx.node(p).clone());
            n.output[0] = y.clone();
        }
        Checked::Fits(plan)
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let bn = cx.node(c.bn);
        let layer = match c.layer {
            Layer::MatMul(i, _) | Layer::Gemm(i) => cx.node(i),
        };
        Patch {
            at: c.bn,
            remove: plan.remove,
            insert: vec![],
            replace: plan.nodes.into_iter().collect(),
            initializers: plan.inits.into_iter().map(|(n, a, ft)| (n, a.into(), ft)).collect(),
            log: Rewrite {
                rule: Self::ID,
                node: layer.label().to_string(),
                detail: format!("BatchNormalization '{}' folded into {} '{}'", bn.label(), layer.op_type(), layer.label()),
                weights: vec![],
            },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.bn).label().to_string()
    }
}

/// How many nodes read the values of `t` (not only its shape: Shape, Size), a graph output
/// counting as one.
fn value_reads(cx: &Cx, t: &str) -> usize {
    let shape_only = |&&c: &&usize| {
        let n = cx.node(c);
        (is_op(n, "Shape") || is_op(n, "Size")) && n.input.len() == 1
    };
    cx.uses(t) - cx.ix.consumers_of(t).iter().filter(shape_only).count()
}

/// `w` with column (output) `o` scaled by `t[o]`, along `axis`.
fn scale_columns(w: &ArrayD<f64>, axis: usize, t: &Array1<f64>) -> ArrayD<f64> {
    let mut w = w.clone();
    for (o, mut lane) in w.axis_iter_mut(Axis(axis)).enumerate() {
        lane *= t[o];
    }
    w
}

fn wrong_width(bn: usize, layer: usize) -> Reason {
    Reason::BnChannels { bn, conv: layer }
}

#[allow(clippy::too_many_arguments)]
fn matmul(
    cx: &Cx,
    bn: usize,
    mm: usize,
    add: Option<(usize, usize)>,
    t: &Array1<f64>,
    s: &Array1<f64>,
    names: &mut Names,
    plan: &mut Plan,
) -> Result<(), Reason> {
    let n = cx.node(mm);
    let (w, ft) = cx.consts.f64(&n.input[1]).map_err(Reason::Const)?;
    if w.shape()[1] != t.len() {
        return Err(wrong_width(t.len(), w.shape()[1]));
    }
    let wname = names.own_or_fresh(cx.ix, &n.input[1]);
    plan.nodes.entry(mm).or_insert_with(|| n.clone()).input[1] = wname.clone();
    plan.inits.push((wname, scale_columns(&w, 1, t), ft));
    match add {
        Some((a, k)) => {
            // b' = b·t + s
            let an = cx.node(a);
            let (b, bft) = cx.consts.f64(&an.input[k]).map_err(Reason::Const)?;
            let b0: Vec<f64> = b.iter().copied().collect();
            let v: Vec<f64> = (0..t.len()).map(|o| (if b0.len() == 1 { b0[0] } else { b0[o] }) * t[o] + s[o]).collect();
            let mut shape = b.shape().to_vec();
            match shape.last_mut() {
                Some(l) => *l = t.len(),
                None => shape.push(t.len()),
            }
            let bname = names.own_or_fresh(cx.ix, &an.input[k]);
            plan.nodes.entry(a).or_insert_with(|| an.clone()).input[k] = bname.clone();
            plan.inits.push((bname, ArrayD::from_shape_vec(IxDyn(&shape), v).expect("o values"), bft));
        }
        None => {
            // the BN becomes the Add of its shift, broadcast on its channel axis (1)
            let bnode = cx.node(bn);
            let rank = cx.shape_of(&bnode.input[0]).map_or(2, |s| s.len());
            let mut shape = vec![t.len()];
            shape.extend(std::iter::repeat_n(1, rank.saturating_sub(2)));
            let sname = names.fresh(&format!("{}_shift", bnode.name()));
            let node = NodeProto {
                op_type: Some("Add".into()),
                name: bnode.name.clone(),
                input: vec![bnode.input[0].clone(), sname.clone()],
                output: vec![bnode.output[0].clone()],
                ..Default::default()
            };
            plan.remove.clear();
            plan.nodes.insert(bn, node);
            plan.inits.push((sname, s.clone().into_shape_with_order(IxDyn(&shape)).expect("per channel"), ft));
        }
    }
    Ok(())
}

fn gemm(cx: &Cx, g: usize, t: &Array1<f64>, s: &Array1<f64>, names: &mut Names, plan: &mut Plan) -> Result<(), Reason> {
    let n = cx.node(g);
    let (b, ft) = cx.consts.f64(&n.input[1]).map_err(Reason::Const)?;
    // output columns: axis 1 of B, or axis 0 with transB
    let out_axis = if attr_int(n, "transB", 0) != 0 { 0 } else { 1 };
    if b.ndim() != 2 || b.shape()[out_axis] != t.len() {
        return Err(wrong_width(t.len(), b.shape().get(out_axis).copied().unwrap_or(0)));
    }
    let beta = attr_float(n, "beta", 1.0) as f64;
    // t·(α·AB + β·C) + s = α·A(B·t) + β·(C·t + s/β)
    let c = match n.input.get(2).filter(|c| !c.is_empty()) {
        Some(name) => Some(cx.consts.f64(name).map_err(Reason::Const)?.0),
        None => None,
    };
    let (c2, set_beta) = match c {
        Some(c) if beta != 0.0 => {
            let sh = c.shape();
            if sh.len() > 2 || sh.iter().rev().skip(1).any(|&d| d != 1) {
                return Err(Reason::NotPerChannel { branch: n.input[2].clone(), shape: sh.to_vec() });
            }
            let c0: Vec<f64> = c.iter().copied().collect();
            let v: Vec<f64> =
                (0..t.len()).map(|o| (if c0.len() == 1 { c0[0] } else { c0[o] }) * t[o] + s[o] / beta).collect();
            (Array1::from(v), false)
        }
        _ => (s.clone(), true),
    };
    let bname = names.own_or_fresh(cx.ix, &n.input[1]);
    let cname = match n.input.get(2).filter(|c| !c.is_empty()) {
        Some(name) => names.own_or_fresh(cx.ix, name),
        None => names.fresh(&format!("{bname}_bias")),
    };
    let mut node = n.clone();
    node.input = vec![n.input[0].clone(), bname.clone(), cname.clone()];
    if set_beta {
        node.attribute.retain(|a| a.name() != "beta");
        node.attribute.push(AttributeProto {
            name: Some("beta".into()),
            f: Some(1.0),
            r#type: Some(AttributeType::Float as i32),
            ..Default::default()
        });
    }
    plan.nodes.insert(g, node);
    plan.inits.push((bname, scale_columns(&b, out_axis, t), ft));
    plan.inits.push((cname, c2.into_dyn(), ft));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::{attr_int, rand_input, run_f32, tensor_info, Builder};

    /// Fuse: no BatchNormalization is left; the model computes what it did (in tract).
    fn folds_and_agrees(b: &Builder, x: &ArrayD<f64>) -> Vec<String> {
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert!(report.rewrites.iter().any(|r| r.rule == RuleId::FOLD_BN_LINEAR));
        let (want, got) = (run_f32(&original, std::slice::from_ref(x)), run_f32(&m, std::slice::from_ref(x)));
        crate::support::assert_close(&got, &want, 1e-5, "folded vs original");
        m.graph().node.iter().map(|n| n.op_type().to_string()).collect()
    }

    #[test]
    fn a_linear_norm_over_flattened_tokens_is_a_matmul_and_the_add_of_its_shift() {
        // LeViT: MatMul [1, N, Cin] x [Cin, C] → Flatten(0, 1) → BatchNorm1d(C) → Reshape back
        let mut b = Builder::new(1, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[1, 5, 3]);
        let w = b.rand(&[3, 4]);
        let w = b.initializer("w", &w);
        let m = b.node("MatMul", "mm", &["x", &w], &[], vec![]);
        let f = b.node("Flatten", "flat", &[&m], &[], vec![attr_int("axis", 2)]);
        let (y, _) = b.bn("bn", &f, 4, None);
        let back = b.initializer_i64("back_shape", &[1, 5, 4]);
        let z = b.node("Reshape", "back", &[&y, &back], &["z"], vec![]);
        b.output(&z);
        let ops = folds_and_agrees(&b, &rand_input(1, &[1, 5, 3]));
        assert_eq!(ops, ["MatMul", "Flatten", "Add", "Reshape"]);
    }

    #[test]
    fn a_bn_after_a_biased_linear_folds_into_the_bias() {
        let mut b = Builder::new(1, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[6, 3]);
        let (w, bias) = (b.rand(&[3, 4]), b.rand(&[4]));
        let (w, bias) = (b.initializer("w", &w), b.initializer("bias", &bias));
        let m = b.node("MatMul", "mm", &["x", &w], &[], vec![]);
        let a = b.node("Add", "mm_bias", &[&bias, &m], &[], vec![]);
        let (y, _) = b.bn("bn", &a, 4, None);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &rand_input(2, &[6, 3])), ["MatMul", "Add"]);
    }

    #[test]
    fn a_bn_after_a_gemm_folds_into_it() {
        let mut b = Builder::new(1, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[2, 3]);
        let (w, c) = (b.rand(&[4, 3]), b.rand(&[4]));
        let (w, c) = (b.initializer("w", &w), b.initializer("c", &c));
        let g = b.node("Gemm", "fc", &["x", &w, &c], &[], vec![attr_int("transB", 1), crate::support::attr_float("beta", 2.0)]);
        let (y, _) = b.bn("bn", &g, 4, None);
        b.output(&y);
        assert_eq!(folds_and_agrees(&b, &rand_input(3, &[2, 3])), ["Gemm"]);
    }
}
