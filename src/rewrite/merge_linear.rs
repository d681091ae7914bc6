//! Parallel linear layers of one input, summed (and scaled), become one: distillation heads
//! averaged at inference, `(head(x) + head_dist(x)) / 2` (RepViT, iFormer, LeViT), are one Gemm
//! with `W = Σ c_i·α_i·W_i` and `C = Σ c_i·β_i·C_i`.
//!
//! - find: the root of a sum tree (see [`super::sum_tree`]) whose leaves are Gemms (transA = 0,
//!   constant B and C, each read only by the tree) of one tensor, at least two, and constants.
//! - check: the factors the tree gives each head are scalars or per output column; the constant
//!   leaves broadcast per output column.
//! - rewrite: one Gemm (the first head's node, α = β = 1) writes the tree's output.

use super::sum_tree::{is_root, leaves};
use super::{Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{attr_float, attr_int, is_op, ConstError, Label};
use crate::model::tensor::FloatType;
use ndarray::{Array1, Array2, ArrayD, Axis, Ix2};

pub(crate) struct MergeLinear;

struct Head {
    gemm: usize,
    factors: Vec<ArrayD<f64>>,
}

pub(crate) struct Candidate {
    root: usize,
    internal: Vec<usize>,
    heads: Vec<Head>,
    /// constant leaves and their factors
    constants: Vec<(String, Vec<ArrayD<f64>>)>,
}

pub(crate) struct Plan {
    /// `[in, out]`
    w: Array2<f64>,
    c: Array1<f64>,
    ft: FloatType,
}

impl Rule for MergeLinear {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::MERGE_LINEAR;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        if !is_root(cx, at) {
            return None;
        }
        let (leaves, internal) = leaves(cx, at);
        let mut heads = Vec::new();
        let mut constants = Vec::new();
        let mut input: Option<&str> = None;
        for l in leaves {
            if cx.consts.f64(&l.name).is_ok() {
                constants.push((l.name, l.factors));
                continue;
            }
            let p = cx.producer(&l.name)?;
            let n = cx.node(p);
            let a = n.input.first()?;
            if !is_op(n, "Gemm") || cx.uses(&l.name) != 1 || attr_int(n, "transA", 0) != 0 || input.is_some_and(|i| i != a)
            {
                return None;
            }
            input = Some(a);
            heads.push(Head { gemm: p, factors: l.factors });
        }
        (heads.len() >= 2).then_some(Candidate { root: at, internal, heads, constants })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let mut acc: Option<(Array2<f64>, Array1<f64>, FloatType)> = None;
        for h in &c.heads {
            let n = cx.node(h.gemm);
            let (b, ft) = match cx.consts.f64(&n.input[1]) {
                Ok(v) => v,
                Err(e) => return Checked::refuse(Reason::Const(e)),
            };
            let Ok(b) = b.into_dimensionality::<Ix2>() else {
                return Checked::refuse(Reason::Const(ConstError::NotConstant(n.input[1].clone())));
            };
            let b = if attr_int(n, "transB", 0) != 0 { b.reversed_axes() } else { b };
            let o = b.ncols();
            let (alpha, beta) = (attr_float(n, "alpha", 1.0) as f64, attr_float(n, "beta", 1.0) as f64);
            let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                None => Array1::zeros(o),
                Some(name) => match cx.consts.f64(name) {
                    Ok((a, _)) => match per_column(&a, o) {
                        Some(v) => v * beta,
                        None => return Checked::refuse(Reason::NotPerChannel { branch: name.clone(), shape: a.shape().to_vec() }),
                    },
                    Err(e) => return Checked::refuse(Reason::Const(e)),
                },
            };
            let Some(coef) = coefficient(&h.factors, o) else {
                let shape = h.factors.iter().find(|f| per_column(f, o).is_none()).map_or(vec![], |f| f.shape().to_vec());
                return Checked::refuse(Reason::NotPerChannel { branch: n.output[0].clone(), shape });
            };
            let mut w = b.to_owned() * alpha;
            for (mut col, &k) in w.axis_iter_mut(Axis(1)).zip(&coef) {
                col *= k;
            }
            let bias = bias * &coef;
            acc = Some(match acc {
                None => (w, bias, ft),
                Some((aw, ab, aft)) => {
                    if aw.dim() != w.dim() {
                        return Checked::refuse(Reason::Const(ConstError::NotConstant(n.input[1].clone())));
                    }
                    if aft != ft {
                        return Checked::refuse(Reason::BranchDtypes);
                    }
                    (aw + w, ab + bias, ft)
                }
            });
        }
        let (w, mut c_acc, ft) = acc.expect("two heads");
        for (name, factors) in &c.constants {
            let (a, _) = cx.consts.f64(name).expect("a constant leaf");
            let o = w.ncols();
            match (per_column(&a, o), coefficient(factors, o)) {
                (Some(v), Some(k)) => c_acc = c_acc + v * k,
                _ => return Checked::refuse(Reason::NotPerChannel { branch: name.clone(), shape: a.shape().to_vec() }),
            }
        }
        Checked::Fits(Plan { w, c: c_acc, ft })
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let root = cx.node(c.root);
        let first = cx.node(c.heads[0].gemm);
        let mut names = cx.names();
        let wname = names.own_or_fresh(cx.ix, &first.input[1]);
        let cname = match first.input.get(2).filter(|s| !s.is_empty()) {
            Some(s) => names.own_or_fresh(cx.ix, s),
            None => names.fresh(&format!("{wname}_bias")),
        };
        let mut node = first.clone();
        node.input = vec![first.input[0].clone(), wname.clone(), cname.clone()];
        node.output = vec![root.output[0].clone()];
        node.attribute.retain(|a| !matches!(a.name(), "alpha" | "beta"));
        // B in the first head's layout
        let w = if attr_int(first, "transB", 0) != 0 { plan.w.reversed_axes() } else { plan.w };
        let w = w.as_standard_layout().into_owned();
        let mut remove = c.internal;
        remove.extend(c.heads.iter().map(|h| h.gemm));
        let heads: Vec<String> = c.heads.iter().map(|h| format!("'{}'", cx.node(h.gemm).label())).collect();
        Patch {
            at: c.root,
            remove,
            insert: vec![node],
            replace: vec![],
            initializers: vec![(wname, w.into_dyn().into(), plan.ft), (cname, plan.c.into_dyn().into(), plan.ft)],
            log: Rewrite {
                rule: Self::ID,
                node: first.label().to_string(),
                detail: format!("{} Gemms ({}) of one input into one", heads.len(), heads.join(", ")),
                weights: vec![],
            },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).label().to_string()
    }
}

/// A constant that broadcasts over a `[M, o]` output per column (or as a scalar): its `o` values.
fn per_column(a: &ArrayD<f64>, o: usize) -> Option<Array1<f64>> {
    let s = a.shape();
    if s.len() > 2 || s.iter().rev().skip(1).any(|&d| d != 1) {
        return None;
    }
    match s.last().copied().unwrap_or(1) {
        1 => Some(Array1::from_elem(o, *a.iter().next()?)),
        d if d == o => Some(a.iter().copied().collect()),
        _ => None,
    }
}

/// The product of a leaf's factors, per output column.
fn coefficient(factors: &[ArrayD<f64>], o: usize) -> Option<Array1<f64>> {
    factors.iter().try_fold(Array1::from_elem(o, 1.0), |acc, f| Some(acc * per_column(f, o)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::{attr_int, rand_input, run_f32, tensor_info, Builder};

    #[test]
    fn averaged_distillation_heads_are_one_gemm() {
        let mut b = Builder::new(6, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[2, 6]);
        let (w1, c1, w2, c2) = (b.rand(&[4, 6]), b.rand(&[4]), b.rand(&[6, 4]), b.rand(&[1, 4]));
        let (w1, c1, w2, c2) =
            (b.initializer("w1", &w1), b.initializer("c1", &c1), b.initializer("w2", &w2), b.initializer("c2", &c2));
        let h1 = b.node("Gemm", "head", &["x", &w1, &c1], &[], vec![attr_int("transB", 1)]);
        let h2 = b.node("Gemm", "head_dist", &["x", &w2, &c2], &[], vec![crate::support::attr_float("alpha", 0.5)]);
        let s = b.add("add", &h1, &h2);
        let two = b.initializer("two", &ndarray::arr0(2.0).into_dyn());
        let y = b.node("Div", "div", &[&s, &two], &["y"], vec![]);
        b.output(&y);
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Gemm"], "{:?}", report.refused);
        assert_eq!(m.graph().node[0].name(), "head");
        let x = rand_input(1, &[2, 6]);
        crate::support::assert_close(&run_f32(&m, std::slice::from_ref(&x)), &run_f32(&original, &[x]), 1e-5, "one Gemm");
    }

    #[test]
    fn heads_of_different_inputs_are_not_a_candidate() {
        let mut b = Builder::new(6, 1, 1);
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[1, 6]);
        let x2 = b.input("x2", &[1, 6]);
        let (w1, w2) = (b.rand(&[6, 4]), b.rand(&[6, 4]));
        let (w1, w2) = (b.initializer("w1", &w1), b.initializer("w2", &w2));
        let h1 = b.node("Gemm", "h1", &["x", &w1], &[], vec![]);
        let h2 = b.node("Gemm", "h2", &[&x2, &w2], &[], vec![]);
        let y = b.add("add", &h1, &h2);
        b.output(&y);
        assert!(crate::rewrite::driver::at_node(&b, "add", |cx, at| MergeLinear.find(cx, at)).is_none());
    }
}
