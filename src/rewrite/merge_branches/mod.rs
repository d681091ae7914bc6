//! A sum of branches of one input tensor becomes one Conv.
//!
//! - find: the root of an Add tree (any nesting and operand order) or a Sum; its leaves are
//!   branches, grouped by the tensor they read. A branch is Conv(x), Conv(Slice(x)) (ACNet's crop),
//!   Conv(Pad(x)) with zero padding, BatchNormalization(x) (RepVGG's identity) or x itself, each
//!   optionally multiplied by constant per-channel scales (RepOpt).
//! - check: a branch Conv(Conv(x)) whose composition a Conv of x's group holds is a branch of
//!   that group (see [`chain`]).
//! - check: the group's base is the Conv branch of the largest window (`(k − 1)·d + 1` input
//!   positions per axis), then the most taps. Every other branch lands on the base's taps: at a
//!   whole tap offset, one tap every `d / D` of the base's (a branch dilated `d`, the base `D`),
//!   inside the base's kernel, with the same output size — at every input size, or else at the
//!   size the model runs at when it runs at no other (see [`Geometry::offset_in`] and
//!   [`Cx::fixed_spatial`]). An `auto_pad` that pads by the input size (SAME_* at stride > 1) is
//!   resolved at that size. Constant per-channel operands of the sum fold into the bias.
//! - rewrite: one Conv with the base's geometry writes each group's sum (explicit pads where the
//!   base's were resolved at the input size); what else the sum added stays an Add.
//!
//! [`Geometry::offset_in`]: crate::kernel::Geometry::offset_in
//! [`Cx::fixed_spatial`]: super::driver::Cx::fixed_spatial

mod branch;
mod chain;
mod constants;
mod stored;
mod values;

use super::sum_tree::{is_root, leaves};
use super::{kernel_str, rewired_conv, Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{is_op, Exact, Label, Names};
use crate::model::tensor::FloatType;
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use branch::{classify, leaked_conv, Branch, Kind};
pub(crate) use chain::chain_in_sum;
use constants::{absorb_constants, channel_vector, rest_coef, Coef};
use ndarray::Array1;
use std::collections::HashSet;
use stored::merge_stored;
use values::merge_values;

pub(crate) struct MergeBranches;

/// A sum tree and its branches.
pub(crate) struct Candidate {
    root: usize,
    /// the tree's sum nodes
    internal: Vec<usize>,
    branches: Vec<Branch>,
}

/// A group of branches (indices into the candidate's) merged into one conv.
struct Merged {
    members: Vec<usize>,
    /// the merged weight: held, or summed from the branches' stored weights when it is written
    weight: Exact,
    /// its shape
    dims: Vec<usize>,
    bias: Array1<f64>,
    /// the merged conv's padding (the base branch's, with what it reads through)
    pads: (Vec<i64>, Vec<i64>),
    ft: FloatType,
    /// index (into `members`) of the branch whose geometry and node the merged conv takes
    base: usize,
    /// per member, its kernel size, and its dilation where it has more than one tap (Conv
    /// branches): `3x3`, `7x7 dilation 2`
    kernels: Vec<Option<String>>,
    /// the base branch's own padding (`None`: its `auto_pad` pads by the input size)
    base_pads: Option<(Vec<i64>, Vec<i64>)>,
}

pub(crate) struct Plan {
    merged: Vec<Merged>,
    /// constant operands of the sum folded into the first merged conv's bias
    absorbed: HashSet<usize>,
    /// the branches left as they are, each with the factor the sum tree multiplied it by
    rest: Vec<(usize, Coef)>,
    /// the candidate's branches with the chains a Conv holds made branches of its group, if any
    promoted: Option<Vec<Branch>>,
}

impl Rule for MergeBranches {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::MERGE_BRANCHES;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        if !is_root(cx, at) {
            return None;
        }
        let (leaves, internal) = leaves(cx, at);
        let branches = leaves
            .into_iter()
            .map(|l| {
                let mut b = classify(cx, &l.name);
                b.tree_factors = l.factors.len();
                b.scales.extend(l.factors);
                b
            })
            .collect();
        Some(Candidate { root: at, internal, branches })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let promoted = chain::promote(cx, &c.branches);
        let branches: &[Branch] = promoted.as_deref().unwrap_or(&c.branches);
        let mut refused = Vec::new();
        let mut merged: Vec<Merged> = Vec::new();
        // groups by source, in order of first appearance
        let mut sources: Vec<&str> = Vec::new();
        for b in branches {
            if !sources.contains(&b.source.as_str()) {
                sources.push(&b.source);
            }
        }
        let constant: Vec<bool> =
            branches.iter().map(|b| matches!(b.kind, Kind::Identity { bn: None }) && cx.consts.f64(&b.leaf).is_ok()).collect();
        let has_constant = constant.iter().any(|&c| c);
        for s in &sources {
            let members: Vec<usize> = (0..branches.len()).filter(|&k| branches[k].source == *s).collect();
            let n_conv = members.iter().filter(|&&k| matches!(branches[k].kind, Kind::Conv { .. })).count();
            if let Some(conv) = leaked_conv(cx, branches, s) {
                refused.push(Reason::UsedOutside { conv });
                continue;
            }
            // one Conv alone is merged only with what scales it or is added to it as a constant
            // (TorchScript's `identity_out = 0` accumulators, layer scales), and only when the
            // other operands keep their place in the sum as they are (no factor to write out)
            let plain = |b: &Branch| {
                let tree = &b.scales[b.scales.len() - b.tree_factors..];
                tree.iter().all(|f| f.len() == 1) && tree.iter().map(|f| f.iter().product::<f64>()).product::<f64>() == 1.0
            };
            let others_plain = branches.iter().zip(&constant).filter(|(b, &c)| b.source != *s && !c).all(|(b, _)| plain(b));
            let lone = members.len() == 1 && (branches[members[0]].scales.is_empty() && !has_constant || !others_plain);
            if n_conv == 0 || lone {
                continue;
            }
            let group: Vec<&Branch> = members.iter().map(|&k| &branches[k]).collect();
            match merge(cx, &group) {
                Ok(mut m) => {
                    m.members = members;
                    merged.push(m);
                }
                Err(e) => refused.push(e),
            }
        }
        if merged.is_empty() {
            return Checked::Refused(refused);
        }
        let absorbed = absorb_constants(cx, branches, &mut merged[0]);
        // a lone Conv is rewritten only when something is merged into it (else the rewrite
        // would change nothing, and fire again at every scan)
        let changes = |m: &Merged| m.members.len() > 1 || !branches[m.members[0]].scales.is_empty();
        if absorbed.is_empty() && !merged.iter().any(changes) {
            return Checked::Refused(refused);
        }
        let in_group: HashSet<usize> = merged.iter().flat_map(|d| d.members.iter().copied()).collect();
        let (o, r) = (merged[0].dims[0], merged[0].dims.len() - 2);
        let mut rest = Vec::new();
        for k in (0..branches.len()).filter(|k| !in_group.contains(k) && !absorbed.contains(k)) {
            match rest_coef(&branches[k], o, r) {
                Some(c) => rest.push((k, c)),
                None => {
                    let b = &branches[k];
                    let bad = b.scales[b.scales.len() - b.tree_factors..]
                        .iter()
                        .find(|f| channel_vector(f, o, r).is_none())
                        .map_or(vec![], |f| f.shape().to_vec());
                    return Checked::refuse(Reason::NotPerChannel { branch: b.leaf.clone(), shape: bad });
                }
            }
        }
        let plan = Plan { merged, absorbed, rest, promoted };
        if refused.is_empty() {
            Checked::Fits(plan)
        } else {
            Checked::Partly(plan, refused)
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let Candidate { root: i, internal, branches } = c;
        let root = cx.node(i);
        let out = &root.output[0];
        let Plan { merged, absorbed, rest, promoted } = plan;
        let branches = promoted.unwrap_or(branches);
        let ft = merged[0].ft;
        let n_terms = merged.len() + rest.len();
        let mut names = cx.names();
        let mut insert = Vec::new();
        let mut inits = Vec::new();
        let mut remove: Vec<usize> = internal;
        // (order, tensor, subtracted)
        let mut terms: Vec<(usize, String, bool)> = Vec::new();
        let mut details = Vec::new();
        for m in merged {
            let base = m.members[m.base];
            let Kind::Conv { conv: ci, .. } = branches[base].kind else { unreachable!("the base is a Conv branch") };
            let cnode = cx.node(ci);
            let output = if n_terms == 1 { out.clone() } else { cnode.output[0].clone() };
            let (wname, bname) = names.conv_params(cx.ix, cnode);
            let mut node = rewired_conv(cnode, &branches[base].source, &wname, &bname, &output);
            if m.base_pads.as_ref() != Some(&m.pads) || branches[base].nodes.len() > 1 {
                set_pads(&mut node, &m.pads);
            }
            insert.push(node);
            let merged_kernel = kernel_str(&m.dims[2..]);
            inits.push((wname, m.weight, m.ft));
            inits.push((bname, m.bias.into_dyn().into(), m.ft));
            for &k in &m.members {
                remove.extend(&branches[k].nodes);
            }
            terms.push((*m.members.iter().min().expect("a group has members"), output, false));
            let mut kernels: Vec<String> = m
                .members
                .iter()
                .zip(&m.kernels)
                .map(|(&k, kernel)| {
                    let name = match (&branches[k].kind, kernel) {
                        (Kind::Conv { .. }, Some(kernel)) => kernel.clone(),
                        (Kind::Chain { first, second, .. }, _) => {
                            format!("{} then {}", conv_kernel(cx, *first), conv_kernel(cx, *second))
                        }
                        (Kind::Identity { bn: Some(_) }, _) => "identity+BN".into(),
                        _ => "identity".into(),
                    };
                    if branches[k].scales.is_empty() {
                        name
                    } else {
                        format!("{name}*scale")
                    }
                })
                .collect();
            kernels.dedup();
            details.push(format!(
                "{} branches ({}) into Conv '{}' {}",
                m.members.len(),
                kernels.join(", "),
                cnode.label(),
                merged_kernel
            ));
        }
        if !absorbed.is_empty() {
            details.push(format!("{} constant(s) into the bias", absorbed.len()));
        }
        for (k, coef) in rest {
            let leaf = branches[k].leaf.clone();
            match coef {
                Coef::One => terms.push((k, leaf, false)),
                Coef::MinusOne => terms.push((k, leaf, true)),
                Coef::Scale(a) => {
                    let cname = names.fresh(&format!("{leaf}_factor"));
                    let scaled = names.fresh(&format!("{leaf}_scaled"));
                    let node = NodeProto {
                        op_type: Some("Mul".into()),
                        name: Some(names.fresh(&format!("{}_scale{k}", root.name()))),
                        input: vec![leaf, cname.clone()],
                        output: vec![scaled.clone()],
                        ..Default::default()
                    };
                    insert.push(node);
                    inits.push((cname, a.into(), ft));
                    terms.push((k, scaled, false));
                }
            }
        }
        terms.sort_by_key(|t| t.0);
        if n_terms > 1 {
            insert.extend(sum_of(root, &terms, out, &mut names));
        }
        remove.sort_unstable();
        remove.dedup();
        let node = insert[0].label().to_string();
        Patch { at: i, remove, insert, replace: vec![], initializers: inits, log: Rewrite { rule: Self::ID, node, detail: details.join("; "), weights: vec![] } }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).label().to_string()
    }
}

/// A Conv branch's kernel as reports name it: its size, and its dilation where it has more than
/// one tap (`7x7 dilation 2`, `3x1 dilation 2x1`).
fn kernel_label(kernel: &[usize], dilations: &[usize]) -> String {
    let d: Vec<usize> = kernel.iter().zip(dilations).map(|(&k, &d)| if k > 1 { d } else { 1 }).collect();
    match d.iter().max() {
        Some(&m) if m > 1 && d.iter().all(|&v| v == m) => format!("{} dilation {m}", kernel_str(kernel)),
        Some(&m) if m > 1 => format!("{} dilation {}", kernel_str(kernel), kernel_str(&d)),
        _ => kernel_str(kernel),
    }
}

/// The kernel size of Conv node `i`, as `3x3` (`?` when its weight cannot be read).
fn conv_kernel(cx: &Cx, i: usize) -> String {
    let n = cx.node(i);
    n.input.get(1).and_then(|w| cx.consts.f64(w).ok()).map_or("?".into(), |(w, _)| kernel_str(&w.shape()[2..]))
}

/// Merge one group of branches reading the same tensor into one conv with the geometry of its
/// base (the largest window). (`members` of the result is filled by the caller.)
fn merge(cx: &Cx, group: &[&Branch]) -> Result<Merged, Reason> {
    match merge_stored(cx, group) {
        Some(m) => Ok(m),
        None => merge_values(cx, group),
    }
}

/// The sum of `terms` (in order; `true` for a term subtracted) written to `out`: the root Sum
/// with new inputs, or a chain of Adds (Subs) like the root (fresh ones when the root is a Mul, Div,
/// Sub or Neg around the sum), the last named as the root.
fn sum_of(root: &NodeProto, terms: &[(usize, String, bool)], out: &str, names: &mut Names) -> Vec<NodeProto> {
    if is_op(root, "Sum") && terms.iter().all(|t| !t.2) {
        let mut s = root.clone();
        s.input = terms.iter().map(|t| t.1.clone()).collect();
        return vec![s];
    }
    let node = |op: &str| -> NodeProto {
        if is_op(root, op) {
            root.clone()
        } else {
            NodeProto { op_type: Some(op.into()), name: root.name.clone(), domain: root.domain.clone(), ..Default::default() }
        }
    };
    let mut adds = Vec::new();
    // a first term subtracted: start from another one (there is one added unless all are subtracted)
    let mut order: Vec<&(usize, String, bool)> = terms.iter().collect();
    if let Some(p) = order.iter().position(|t| !t.2) {
        let first = order.remove(p);
        order.insert(0, first);
    }
    let mut acc = order[0].1.clone();
    if order[0].2 {
        let mut neg = node("Neg");
        let o = names.fresh(&format!("{out}_neg"));
        neg.name = Some(names.fresh(&format!("{}_neg", root.name())));
        neg.input = vec![acc];
        neg.output = vec![o.clone()];
        adds.push(neg);
        acc = o;
    }
    for (j, t) in order.iter().enumerate().skip(1) {
        let mut a = node(if t.2 { "Sub" } else { "Add" });
        a.attribute.clear();
        let last = j + 1 == order.len();
        let o = if last { out.to_string() } else { names.fresh(&format!("{out}_part{j}")) };
        if !last {
            a.name = Some(names.fresh(&format!("{}_part{j}", root.name())));
        }
        a.input = vec![acc, t.1.clone()];
        a.output = vec![o.clone()];
        adds.push(a);
        acc = o;
    }
    adds
}

fn set_pads(n: &mut NodeProto, (begin, end): &(Vec<i64>, Vec<i64>)) {
    n.attribute.retain(|a| a.name() != "auto_pad" && a.name() != "pads");
    let mut pads = begin.clone();
    pads.extend(end);
    n.attribute.push(AttributeProto {
        name: Some("pads".into()),
        ints: pads,
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    });
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::graph::ConstError;
    use crate::kernel::read::{Form, ReadError};
    use crate::kernel::{AffineConv, Misfit};
    use ndarray::ArrayD;
    use crate::rewrite::driver::at_node;
    use crate::support::{Builder, ConvAttrs};

    /// `check` of the sum tree rooted at the node named `root`: the members of each merged group
    /// and the refusals.
    fn check_at(b: &Builder, root: &str) -> (Vec<Vec<usize>>, Vec<Reason>) {
        let checked = at_node(b, root, |cx, at| MergeBranches.check(cx, &MergeBranches.find(cx, at).expect("a sum")));
        let groups = |p: Plan| p.merged.into_iter().map(|m| m.members).collect();
        match checked {
            Checked::Fits(p) => (groups(p), vec![]),
            Checked::Partly(p, r) => (groups(p), r),
            Checked::Refused(r) => (vec![], r),
        }
    }

    /// An ACNet block: 3x3 + 3x1 + 1x3 on `x`, with `hor`'s attributes given.
    pub(super) fn acb(hor: ConvAttrs) -> Builder {
        let mut b = Builder::new(2, 6, 6);
        let (sq, _, _) = b.conv_rand("sq", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (ver, _, _) = b.conv_rand("ver", "x", 3, 2, &[3, 1], true, ConvAttrs::pads(&[1, 0, 1, 0]));
        let (hor, _, _) = b.conv_rand("hor", "x", 3, 2, &[1, 3], true, hor);
        let s = b.add("add", &sq, &ver);
        let y = b.add("add_1", &s, &hor);
        b.output(&y);
        b
    }
    /// A branch through a Slice whose steps have fewer values than its starts, or through a Pad
    /// without amounts (both invalid ONNX, both found by fuzzing as panics), is refused with
    /// what is wrong.
    #[test]
    fn a_crop_or_pad_of_malformed_parameters_is_refused_with_the_form() {
        for op in ["Slice", "Pad"] {
            let mut b = Builder::new(2, 6, 6);
            let crop = if op == "Slice" {
                let one = b.initializer_i64("one", &[1]);
                let end = b.initializer_i64("end", &[i64::MAX]);
                let axis = b.initializer_i64("axis", &[2]);
                let no_steps = b.initializer_i64("no_steps", &[]);
                b.node("Slice", "crop", &["x", &one, &end, &axis, &no_steps], &[], vec![])
            } else {
                b.node("Pad", "crop", &["x"], &[], vec![])
            };
            let (sq, _, _) = b.conv_rand("sq", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
            let (ver, _, _) = b.conv_rand("ver", &crop, 3, 2, &[3, 1], true, ConvAttrs::pads(&[0, 0, 1, 0]));
            let y = b.add("add", &sq, &ver);
            b.output(&y);
            let (groups, refused) = check_at(&b, "add");
            assert!(groups.is_empty(), "{op}");
            let want = if op == "Slice" { Form::SliceLengths } else { Form::PadWithout };
            assert!(
                matches!(&refused[..], [Reason::Conv { err: ReadError::Form(f), .. }] if *f == want),
                "{op}: {refused:?}"
            );
        }
    }

    #[test]
    fn an_acnet_block_is_one_group() {
        let (groups, refused) = check_at(&acb(ConvAttrs::pads(&[0, 1, 0, 1])), "add_1");
        assert_eq!(groups, [vec![0, 1, 2]]);
        assert!(refused.is_empty());
    }

    #[test]
    fn a_branch_of_another_stride_is_refused_with_the_misfit() {
        let (groups, refused) = check_at(&acb(ConvAttrs::pads(&[0, 1, 0, 1]).strides(&[2, 2])), "add_1");
        assert!(groups.is_empty());
        assert_eq!(refused.len(), 1);
        assert!(
            matches!(&refused[0], Reason::Misfit { misfit: Misfit::Stride { small: 2, large: 1, axis: 0 }, .. }),
            "{:?}",
            refused[0]
        );
    }

    #[test]
    fn a_weight_listed_as_graph_input_is_refused() {
        let mut b = acb(ConvAttrs::pads(&[0, 1, 0, 1]));
        b.graph.input.push(b.graph.initializer.iter().find(|t| t.name() == "ver.w").map(|t| {
            crate::support::tensor_info(t.name(), crate::proto::tensor_proto::DataType::Float, &t.dims)
        }).unwrap());
        let (groups, refused) = check_at(&b, "add_1");
        assert!(groups.is_empty());
        assert_eq!(
            refused,
            [Reason::Conv { conv: "ver".into(), err: ReadError::Weight(ConstError::GraphInput("ver.w".into())) }]
        );
    }

    /// x [1, 4, 6, 6], a depthwise 3x3 conv with bias, and a BatchNormalization, both of x.
    fn dw_and_bn(b: &mut Builder) -> (String, ArrayD<f64>, ArrayD<f64>, String, crate::support::Bn) {
        let (conv, w, bias) = b.conv_rand("mix", "x", 4, 1, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]).group(4));
        let (bn, p) = b.bn("norm", "x", 4, None);
        (conv, w, bias.unwrap(), bn, p)
    }

    fn dw(w: &ArrayD<f64>, bias: &ArrayD<f64>) -> AffineConv {
        crate::support::affine(w, Some(bias), 4, &[1, 1], &[1, 1], &[1, 1, 1, 1])
    }

    /// Fuse the builder's model; the one Conv it must leave, and the input it was checked on.
    fn fused(b: &Builder) -> (AffineConv, ArrayD<f64>) {
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        (crate::support::only_conv(&m.proto), crate::support::rand_input(3, &[1, 4, 6, 6]))
    }

    #[test]
    fn a_repmixer_is_one_conv() {
        // FastViT: x + γ·(mixer(x) − norm(x)), γ of shape [C, 1, 1]
        let mut b = Builder::new(4, 6, 6);
        let (conv, w, bias, bn, p) = dw_and_bn(&mut b);
        let d = b.node("Sub", "sub", &[&conv, &bn], &[], vec![]);
        let gamma = b.rand(&[4, 1, 1]);
        let g = b.initializer("gamma", &gamma);
        let s = b.node("Mul", "mul", &[&d, &g], &[], vec![]);
        let y = b.add("add", "x", &s);
        b.output(&y);
        let (k, x) = fused(&b);
        let mut want = (dw(&w, &bias).apply(&x) - p.apply(&x)) * &gamma.view().insert_axis(ndarray::Axis(0));
        want += &x;
        crate::support::assert_close(&k.apply(&x), &want, 1e-6, "fused RepMixer (weights rounded to f32)");
    }

    #[test]
    fn a_gated_residual_with_a_computed_gate_is_one_conv() {
        // EfficientViM (TorchScript): x + α·(dw(x) − x), α = Gather(Reshape(Sigmoid(alpha), [2, -1, 1, 1]), 1)
        let mut b = Builder::new(4, 6, 6);
        let (conv, w, bias, _, _) = dw_and_bn(&mut b);
        b.graph.node.pop(); // no BatchNormalization here
        let alpha = b.rand(&[2, 4]);
        let a = b.initializer("alpha", &alpha);
        let sig = b.node("Sigmoid", "sig", &[&a], &[], vec![]);
        let shape = b.initializer_i64("shape", &[2, -1, 1, 1]);
        let r = b.node("Reshape", "r", &[&sig, &shape], &[], vec![]);
        let one = b.initializer_i64("one", &[1]);
        let gate = b.node("Gather", "gate", &[&r, &one], &[], vec![crate::support::attr_int("axis", 0)]);
        let d = b.node("Sub", "sub", &[&conv, "x"], &[], vec![]);
        let s = b.node("Mul", "mul", &[&gate, &d], &[], vec![]);
        let y = b.add("add", "x", &s);
        b.output(&y);
        let (k, x) = fused(&b);
        let gate = alpha.slice(ndarray::s![1, ..]).mapv(|v| 1.0 / (1.0 + (-v).exp())).into_shape_with_order((1, 4, 1, 1)).unwrap();
        let want = &x + &((dw(&w, &bias).apply(&x) - &x) * &gate);
        crate::support::assert_close(&k.apply(&x), &want, 1e-6, "fused gated residual (weights rounded to f32)");
    }

    #[test]
    fn a_branch_of_another_tensor_keeps_the_factor_the_tree_gave_it() {
        // γ·(mixer(x) + x − h): x's branches merge, h stays, multiplied by −γ
        let mut b = Builder::new(4, 6, 6);
        let (conv, w, bias, _, _) = dw_and_bn(&mut b);
        b.graph.node.pop();
        let h = b.input("h", &[1, 4, 6, 6]);
        let s1 = b.add("add", &conv, "x");
        let d = b.node("Sub", "sub", &[&s1, &h], &[], vec![]);
        let gamma = b.rand(&[1, 4, 1, 1]);
        let g = b.initializer("gamma", &gamma);
        let y = b.node("Mul", "mul", &[&d, &g], &["y"], vec![]);
        b.output(&y);
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert_eq!(report.blocks_merged, 1);
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Conv", "Mul", "Add"]);
        let (x, hv) = (crate::support::rand_input(1, &[1, 4, 6, 6]), crate::support::rand_input(2, &[1, 4, 6, 6]));
        let want = (dw(&w, &bias).apply(&x) + &x - &hv) * &gamma;
        let got = crate::support::run_f32(&m, &[x.clone(), hv.clone()]);
        crate::support::assert_close(&got, &want, 1e-5, "fused, in tract");
        crate::support::assert_close(&crate::support::run_f32(&original, &[x, hv]), &want, 1e-5, "original, in tract");
    }

    #[test]
    fn one_conv_and_an_accumulator_or_a_layer_scale_is_one_conv() {
        // TorchScript's `identity_out = 0; identity_out += conv(x)`, then a layer scale and a
        // residual of another tensor: Conv + Add, no Mul and no Add of zero left
        let mut b = Builder::new(4, 6, 6);
        let (conv, _, _, _, _) = dw_and_bn(&mut b);
        b.graph.node.pop();
        let zero = b.initializer("zero", &ndarray::arr0(0.0).into_dyn());
        let acc = b.add("acc", &zero, &conv);
        let gamma = b.rand(&[4, 1, 1]);
        let g = b.initializer("gamma", &gamma);
        let s = b.node("Mul", "scale", &[&acc, &g], &[], vec![]);
        let h = b.input("h", &[1, 4, 6, 6]);
        let y = b.add("residual", &h, &s);
        b.output(&y);
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Conv", "Add"], "{:?}", report.rewrites);
        let (x, hv) = (crate::support::rand_input(1, &[1, 4, 6, 6]), crate::support::rand_input(2, &[1, 4, 6, 6]));
        crate::support::assert_close(
            &crate::support::run_f32(&m, &[x.clone(), hv.clone()]),
            &crate::support::run_f32(&original, &[x, hv]),
            1e-5,
            "one Conv and the residual",
        );
    }

    #[test]
    fn one_conv_and_a_constant_that_is_not_per_channel_is_left_alone() {
        // the constant varies over the plane: nothing to merge (found by the properties: the
        // lone Conv was rewritten unchanged at every scan)
        let mut b = Builder::new(4, 6, 6);
        let (conv, _, _, _, _) = dw_and_bn(&mut b);
        b.graph.node.pop();
        let plane = b.rand(&[1, 1, 6, 6]);
        let c = b.initializer("plane", &plane);
        let y = b.add("add", &conv, &c);
        b.output(&y);
        let mut m = b.build();
        let before = m.proto.clone();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.rewrites.is_empty(), "{:?}", report.rewrites);
        assert_eq!(m.proto, before);
    }

    /// A stride-2 ACNet block as TensorFlow pads it ("same") on even sizes: 3x3 pads (0, 0, 1, 1),
    /// 3x1 (0, 0, 1, 0), 1x3 (0, 0, 0, 1), 1x1 none, on x of `[1, 2, h, w]`. The branches.
    pub(super) fn tf_same_stride_2(h: usize, w: usize) -> (Builder, Vec<AffineConv>) {
        let mut b = Builder::new(2, h, w);
        let s2 = |p: &[i64]| ConvAttrs::pads(p).strides(&[2, 2]);
        let mut convs = vec![];
        let mut outs = vec![];
        for (name, k, pads) in [
            ("sq", [3, 3], [0, 0, 1, 1]),
            ("ver", [3, 1], [0, 0, 1, 0]),
            ("hor", [1, 3], [0, 0, 0, 1]),
            ("one", [1, 1], [0, 0, 0, 0]),
        ] {
            let (y, wt, bias) = b.conv_rand(name, "x", 3, 2, &k, true, s2(&pads));
            convs.push(crate::support::affine(&wt, bias.as_ref(), 1, &[2, 2], &[1, 1], &pads));
            outs.push(y);
        }
        let s = b.add("add", &outs[0], &outs[1]);
        let s = b.add("add_1", &s, &outs[2]);
        let y = b.add("add_2", &s, &outs[3]);
        b.output(&y);
        (b, convs)
    }

    /// The sum of `convs` on `x`.
    fn sum_of_convs(convs: &[AffineConv], x: &ArrayD<f64>) -> ArrayD<f64> {
        let mut want = convs[0].apply(x);
        for c in &convs[1..] {
            want += &c.apply(x);
        }
        want
    }

    #[test]
    fn tf_same_padding_at_stride_2_merges_at_the_input_size_the_model_runs_at() {
        // every branch is a kernel at the 3x3's first tap, at even sizes (the model's)
        let (b, convs) = tf_same_stride_2(8, 10);
        let (groups, refused) = check_at(&b, "add_2");
        assert_eq!((groups, refused), (vec![vec![0, 1, 2, 3]], vec![]));
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        let k = crate::support::only_conv(&m.proto);
        assert_eq!((&k.pads_begin[..], &k.pads_end[..], &k.strides[..]), (&[0, 0][..], &[1, 1][..], &[2, 2][..]));
        let x = crate::support::rand_input(3, &[1, 2, 8, 10]);
        crate::support::assert_close(&k.apply(&x), &sum_of_convs(&convs, &x), 1e-6, "merged vs branches");
        // a symbolic batch leaves the spatial size fixed
        let (mut b, _) = tf_same_stride_2(8, 10);
        crate::support::symbolic_input(&mut b, "x", &[None, Some(2), Some(8), Some(10)]);
        assert_eq!(check_at(&b, "add_2"), (vec![vec![0, 1, 2, 3]], vec![]));
    }

    #[test]
    fn on_a_symbolic_spatial_size_output_sizes_that_differ_at_some_sizes_are_refused() {
        let (mut b, _) = tf_same_stride_2(8, 10);
        crate::support::symbolic_input(&mut b, "x", &[None, Some(2), None, None]);
        let (groups, refused) = check_at(&b, "add_2");
        assert!(groups.is_empty());
        let text: Vec<String> = refused.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            text,
            ["branch 'ver.y': paddings give a different output size on axis 1 at some input sizes, and the input size is not fixed"]
        );
    }

    #[test]
    fn output_sizes_that_differ_at_the_input_size_are_refused_with_both() {
        // 3x3 without padding on a width of 3 (one output column) + a 1x1 (three), broadcast
        let mut b = Builder::new(2, 5, 3);
        let (sq, _, _) = b.conv_rand("sq", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 0, 1, 0]));
        let (one, _, _) = b.conv_rand("one", "x", 3, 2, &[1, 1], true, ConvAttrs::default());
        let y = b.add("add", &sq, &one);
        b.output(&y);
        let (groups, refused) = check_at(&b, "add");
        assert!(groups.is_empty());
        let text: Vec<String> = refused.iter().map(|r| r.to_string()).collect();
        assert_eq!(text, ["branch 'one.y': output size 3 vs 1 on axis 1 (input size 3)"]);
        // (and so they are)
        let x = crate::support::rand_input(1, &[1, 2, 5, 3]);
        let shape = |k: &[usize], p: &[i64]| {
            crate::support::affine(&ArrayD::zeros(ndarray::IxDyn(&[3, 2, k[0], k[1]])), None, 1, &[1, 1], &[1, 1], p)
                .apply(&x)
                .shape()[3]
        };
        assert_eq!((shape(&[1, 1], &[0, 0, 0, 0]), shape(&[3, 3], &[1, 0, 1, 0])), (3, 1));
    }

    /// Paddle's `padding="SAME"`: `auto_pad` SAME_UPPER on every branch, stride 2, even and odd
    /// sizes.
    pub(super) fn paddle_same_stride_2(h: usize, w: usize) -> (Builder, Vec<AffineConv>) {
        let mut b = Builder::new(2, h, w);
        let mut outs = vec![];
        let mut convs = vec![];
        for (name, k) in [("sq", [3, 3]), ("ver", [3, 1]), ("hor", [1, 3]), ("one", [1, 1])] {
            let (y, wt, bias) = b.conv_rand(name, "x", 3, 2, &k, true, ConvAttrs::default().strides(&[2, 2]));
            b.graph.node.last_mut().unwrap().attribute.push(crate::support::attr_string("auto_pad", "SAME_UPPER"));
            let pads: Vec<i64> = {
                let (pb, pe): (Vec<i64>, Vec<i64>) = (0..2)
                    .map(|a| crate::kernel::same_pads([h, w][a] as i64, k[a] as i64, 2, 1, true))
                    .unzip();
                [pb, pe].concat()
            };
            convs.push(crate::support::affine(&wt, bias.as_ref(), 1, &[2, 2], &[1, 1], &pads));
            outs.push(y);
        }
        let s = b.add("add", &outs[0], &outs[1]);
        let s = b.add("add_1", &s, &outs[2]);
        let y = b.add("add_2", &s, &outs[3]);
        b.output(&y);
        (b, convs)
    }

    #[test]
    fn auto_pad_same_with_stride_2_merges_at_the_input_size_into_explicit_pads() {
        for (h, w) in [(8, 10), (7, 9), (8, 9)] {
            let (b, convs) = paddle_same_stride_2(h, w);
            let original = b.build();
            let mut m = b.build();
            let report = crate::rewrite::fuse(&mut m).unwrap();
            assert!(report.refused.is_empty(), "{:?}", report.refused);
            // only_conv reads explicit pads and refuses an auto_pad
            let k = crate::support::only_conv(&m.proto);
            let x = crate::support::rand_input(3, &[1, 2, h, w]);
            crate::support::assert_close(&k.apply(&x), &sum_of_convs(&convs, &x), 1e-6, &format!("{h}x{w}: merged"));
            let got = crate::support::run_f32(&m, std::slice::from_ref(&x));
            crate::support::assert_close(&got, &crate::support::run_f32(&original, &[x]), 1e-5, "in tract");
        }
    }

    #[test]
    fn auto_pad_same_with_stride_2_on_a_size_not_fixed_is_refused_as_such() {
        let (mut b, _) = paddle_same_stride_2(8, 10);
        crate::support::symbolic_input(&mut b, "x", &[Some(1), Some(2), None, Some(10)]);
        let (groups, refused) = check_at(&b, "add_2");
        assert!(groups.is_empty());
        assert_eq!(
            refused,
            [Reason::Conv { conv: "sq".into(), err: ReadError::Form(Form::AutoPadSizeNotFixed("SAME_UPPER".into())) }]
        );
        assert_eq!(
            refused[0].to_string(),
            "Conv 'sq': auto_pad SAME_UPPER with stride > 1 pads by the input size, which is not fixed"
        );
    }

    /// UniRepLKNet's dilated reparam block (depthwise): a 7x7 and smaller kernels of larger
    /// dilations, each with a BatchNormalization if `bn`, in `order`; RepNeXt's 2x2 of dilation 2
    /// too.
    pub(super) fn dilated_block(order: &[usize], bn: bool) -> Builder {
        let mut b = Builder::new(4, 9, 11);
        let all: [(&str, [usize; 2], i64, i64); 5] =
            [("k7", [7, 7], 1, 3), ("k5", [5, 5], 1, 2), ("k3d2", [3, 3], 2, 2), ("k3d3", [3, 3], 3, 3), ("k2d2", [2, 2], 2, 1)];
        let mut outs = vec![];
        for &i in order {
            let (name, k, d, p) = all[i];
            let a = ConvAttrs::pads(&[p, p, p, p]).dilations(&[d, d]).group(4);
            let (y, _, _) = b.conv_rand(name, "x", 4, 1, &k, !bn, a);
            outs.push(if bn { b.bn(&format!("{name}.bn"), &y, 4, None).0 } else { y });
        }
        let mut s = outs[0].clone();
        for (j, o) in outs[1..].iter().enumerate() {
            s = b.add(&format!("add{j}"), &s, o);
        }
        b.output(&s);
        b
    }

    #[test]
    fn dilated_branches_merge_into_the_largest_window_on_its_taps() {
        // the 3x3 of dilation 3 spans 7 like the 7x7: the base is the one with more taps
        for order in [vec![0, 1, 2, 3], vec![3, 2, 1, 0], vec![4, 0, 3]] {
            let b = dilated_block(&order, true);
            let original = b.build();
            let mut m = b.build();
            let report = crate::rewrite::fuse(&mut m).unwrap();
            assert!(report.refused.is_empty(), "{order:?}: {:?}", report.refused);
            let k = crate::support::only_conv(&m.proto);
            assert_eq!((k.kernel(), &k.dilations[..], &k.pads_begin[..]), (&[7usize, 7][..], &[1usize, 1][..], &[3i64, 3][..]));
            // the report names each branch's dilation
            let detail = &report.rewrites.iter().find(|w| w.rule == RuleId::MERGE_BRANCHES).unwrap().detail;
            assert!(detail.contains("3x3 dilation 3") && detail.ends_with("into Conv 'k7' 7x7"), "{detail}");
            let x = crate::support::rand_input(3, &[1, 4, 9, 11]);
            let got = crate::support::run_f32(&m, std::slice::from_ref(&x));
            crate::support::assert_close(&got, &crate::support::run_f32(&original, &[x]), 1e-5, &format!("{order:?}"));
        }
    }

    #[test]
    fn a_branch_dilated_off_the_base_grid_is_refused_with_the_dilations() {
        // the 3x3 of dilation 3 spans 7 positions, the 5x5 5: the base is the dilated one, and
        // the 5x5's taps (every position) fall between its taps
        let (groups, refused) = check_at(&dilated_block(&[1, 3], false), "add0");
        assert!(groups.is_empty());
        let text: Vec<String> = refused.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            text,
            ["branch 'k5.y': dilation 1 vs 3 on axis 0: not a multiple, its taps fall between the large kernel's"]
        );
        // with the 7x7 (the base, then) the 3x3 of dilation 3 lands on its taps 0, 3, 6
        assert_eq!(check_at(&dilated_block(&[1, 3, 0], false), "add1"), (vec![vec![0, 1, 2]], vec![]));
    }
}
