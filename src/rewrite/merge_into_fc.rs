//! Local convolutions into an FC (RepMLP's locality injection): a sum whose region (one input t,
//! affine in t) holds a path t → shape operators → an FC → shape and affine operators → the sum
//! becomes that path with new FC weights, when the region's map, in the FC's coordinates, is an
//! FC of the same form.
//!
//! RepMLP partitions the image (Reshape, Transpose, Reshape), applies a grouped FC written as a
//! 1x1 Conv, reshapes back, and adds a BatchNormalization and conv branches on the same
//! partitions; its deploy form has the FC alone with new weights. The general path cannot
//! recover that: the region is no convolution of t. Here the FC's own coordinates are used.
//!
//! - find: at the root of a sum, an operand reached from an FC — a Conv of one tap (stride 1, no
//!   padding), a MatMul or a Gemm, with constant weights — through shape operators (Reshape,
//!   Transpose, Flatten, Squeeze, Unsqueeze, Identity) and affine operators of one varying input
//!   (BatchNormalization, Add/Sub/Mul/Div by a constant), each read once; the FC's input reached
//!   from a tensor t through shape operators only (for a Conv, a shape operator on the path at
//!   least: else the region is a convolution, the general path's); the general path's region from
//!   t to the sum, holding the FC.
//! - check: in tract, in float64, at the shapes the model runs at. The operators from t to the
//!   FC's input must permute t's elements (evaluated on their indices), and so must those from the
//!   FC's output to the sum without the affine ones (evaluated through the path with FCs that
//!   write each element's row and feature). In the FC's coordinates the region is then a map of
//!   the FC's input rows: its response to zero gives the bias (the same in every row), its
//!   responses to impulses (one per input feature, in distinct rows, evaluated together) the
//!   matrix, which must be block-diagonal in the FC's groups. The path with that FC is compared
//!   with the region on random inputs.
//! - rewrite: the path with the new FC: its shape operators kept, the affine ones dropped (they
//!   are in the new weights); the region's other nodes (the other branches, the sum) go.

use super::affine_region::{nodes_model, region_from, region_plan, Region};
use super::sum_tree::{is_root, leaves};
use super::{Checked, Cx, FcMisfit, Patch, Reason, RegionReason, Rewrite, Rule, RuleId};
use crate::graph::{attr_int, attr_ints, attr_string, is_default_domain, is_op};
use crate::model::tensor::FloatType;
use crate::proto::NodeProto;
use crate::tract::RegionPlan;
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use std::collections::{BTreeSet, HashSet};

/// The most weights the FC may hold (as the general path's kernels).
const WEIGHT_LIMIT: u128 = 1 << 26;

pub(crate) struct MergeIntoFc;

/// How the FC computes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fc {
    /// A Conv of one tap: features on axis 1, rows the batch and positions.
    Conv { groups: usize },
    /// MatMul(u, W), W `[K, M]`: features on the last axis.
    MatMul,
    /// Gemm(u, B, C): B `[K, M]`, or `[M, K]` transposed.
    Gemm { trans_b: bool },
}

impl Fc {
    /// (input features, output features, groups) for a weight of shape `w`.
    fn sizes(self, w: &[usize]) -> Option<(usize, usize, usize)> {
        match self {
            Fc::Conv { groups } => (w.len() >= 3).then(|| (w[1] * groups, w[0], groups)),
            Fc::MatMul | Fc::Gemm { trans_b: false } => (w.len() == 2).then(|| (w[0], w[1], 1)),
            Fc::Gemm { trans_b: true } => (w.len() == 2).then(|| (w[1], w[0], 1)),
        }
    }

    fn feature_axis(self, rank: usize) -> usize {
        match self {
            Fc::Conv { .. } => 1,
            _ => rank.saturating_sub(1),
        }
    }

    fn op(self) -> &'static str {
        match self {
            Fc::Conv { .. } => "Conv",
            Fc::MatMul => "MatMul",
            Fc::Gemm { .. } => "Gemm",
        }
    }

    /// The matrix, its diagonal blocks `[M, K/groups]` (row f holds its group's inputs), in the
    /// FC's weight layout (`rank`: the Conv's spatial rank).
    fn layout(self, w: &Array2<f64>, rank: usize) -> ArrayD<f64> {
        match self {
            Fc::Conv { .. } => {
                let mut shape = w.shape().to_vec();
                shape.extend(std::iter::repeat_n(1, rank));
                w.clone().into_shape_with_order(IxDyn(&shape)).expect("one tap per weight")
            }
            Fc::MatMul | Fc::Gemm { trans_b: false } => w.t().to_owned().into_dyn(),
            Fc::Gemm { trans_b: true } => w.clone().into_dyn(),
        }
    }
}

/// A tensor's elements as rows of features (on one axis): where (row, feature) is, flat.
struct Coords {
    features: usize,
    inner: usize,
    rows: usize,
}

impl Coords {
    fn of(shape: &[usize], axis: usize) -> Coords {
        let features = shape[axis];
        let inner = shape[axis + 1..].iter().product();
        let outer: usize = shape[..axis].iter().product();
        Coords { features, inner, rows: outer * inner }
    }

    fn at(&self, row: usize, feature: usize) -> usize {
        ((row / self.inner) * self.features + feature) * self.inner + row % self.inner
    }
}

/// The FC a sum's operand is reached from, the operators around it, and the region's input.
pub(crate) struct Path {
    fc: usize,
    kind: Fc,
    /// shape operators from `t` to the FC's input, in order
    pre: Vec<usize>,
    /// operators from the FC's output to the sum's operand, in order
    post: Vec<usize>,
    t: String,
}

/// A sum, the FC paths to it with their regions (the FC of most weights first: the one the others
/// are most likely merged into), or why the region of one cannot be taken (when none can).
pub(crate) struct Candidate {
    root: usize,
    fcs: Vec<(Path, Region)>,
    refused: Option<RegionReason>,
}

pub(crate) struct Plan {
    /// which of the candidate's FCs
    fc: usize,
    /// in the FC's weight layout
    weight: ArrayD<f64>,
    bias: Array1<f64>,
    ft: FloatType,
}

fn is_shape_op(n: &NodeProto) -> bool {
    matches!(n.op_type(), "Reshape" | "Transpose" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity")
        && n.output.len() == 1
        && !n.input.is_empty()
        && is_default_domain(n)
}

/// A per-element affine operator of one varying input, the others constant: that input.
fn affine_input(cx: &Cx, n: &NodeProto) -> Option<usize> {
    if !is_default_domain(n) || n.output.len() != 1 {
        return None;
    }
    let constant = |t: &str| cx.consts.value(t).is_ok();
    match n.op_type() {
        "BatchNormalization" => (n.input.len() == 5 && n.input[1..].iter().all(|t| constant(t))).then_some(0),
        "Add" | "Sub" | "Mul" | "Div" if n.input.len() == 2 => match (constant(&n.input[0]), constant(&n.input[1])) {
            (false, true) => Some(0),
            (true, false) if !is_op(n, "Div") => Some(1),
            _ => None,
        },
        _ => None,
    }
}

/// Node `n` as an FC: a Conv of one tap, a MatMul or a Gemm, with constant weights.
fn fc_kind(cx: &Cx, n: &NodeProto) -> Option<Fc> {
    if !is_default_domain(n) || n.output.len() != 1 || n.input.len() < 2 {
        return None;
    }
    let w = cx.ix.constant(cx.g, &n.input[1])?;
    let constant = |k: usize| n.input.get(k).is_none_or(|t| t.is_empty() || cx.ix.constant(cx.g, t).is_some());
    match n.op_type() {
        "Conv" => {
            let all = |name: &str, v: i64| attr_ints(n, name).is_none_or(|a| a.iter().all(|&x| x == v));
            let no_auto_pad = attr_string(n, "auto_pad").is_none_or(|a| a == "NOTSET" || a == "VALID");
            let one_tap = w.dims.len() >= 3 && w.dims[2..].iter().all(|&d| d == 1);
            (one_tap && all("strides", 1) && all("pads", 0) && no_auto_pad && constant(2))
                .then(|| Fc::Conv { groups: attr_int(n, "group", 1).max(1) as usize })
        }
        "MatMul" => (w.dims.len() == 2 && n.input.len() == 2).then_some(Fc::MatMul),
        "Gemm" => (w.dims.len() == 2 && attr_int(n, "transA", 0) == 0 && constant(2))
            .then(|| Fc::Gemm { trans_b: attr_int(n, "transB", 0) != 0 }),
        _ => None,
    }
}

/// The FC path ending at the sum's operand `leaf`, if there is one.
fn fc_path(cx: &Cx, leaf: &str) -> Option<Path> {
    let mut post = Vec::new();
    let mut cur = leaf.to_string();
    for _ in 0..64 {
        if cx.uses(&cur) != 1 || cx.ix.outputs.contains(&cur) {
            return None;
        }
        let p = cx.producer(&cur)?;
        let n = cx.node(p);
        if let Some(kind) = fc_kind(cx, n) {
            post.reverse();
            let mut pre = Vec::new();
            let mut t = n.input[0].clone();
            while let Some(q) = cx.producer(&t).filter(|&q| is_shape_op(cx.node(q)) && pre.len() < 64) {
                pre.push(q);
                t = cx.node(q).input[0].clone();
            }
            pre.reverse();
            // a Conv with no rearrangement around it: the region is a convolution (the general path's)
            let rearranged = pre.len() + post.iter().filter(|&&q| is_shape_op(cx.node(q))).count() > 0;
            if matches!(kind, Fc::Conv { .. }) && !rearranged {
                return None;
            }
            return Some(Path { fc: p, kind, pre, post, t });
        }
        let next = if is_shape_op(n) { 0 } else { affine_input(cx, n)? };
        post.push(p);
        cur = n.input[next].clone();
    }
    None
}

impl Rule for MergeIntoFc {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::MERGE_INTO_FC;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let n = cx.node(at);
        if !(is_op(n, "Add") || is_op(n, "Sum")) || !is_root(cx, at) {
            return None;
        }
        let (operands, _) = leaves(cx, at);
        if operands.iter().filter(|l| cx.consts.value(&l.name).is_err()).count() < 2 {
            return None;
        }
        let y: &str = &n.output[0];
        let (mut fcs, mut refused) = (Vec::new(), None);
        for l in &operands {
            let Some(path) = fc_path(cx, &l.name) else { continue };
            // the region from t, else from a tensor further along the path (the partitioned
            // tensor may be read outside: what reads it there stays)
            for start in 0..=path.pre.len() {
                let t = if start == 0 { path.t.clone() } else { cx.node(path.pre[start - 1]).output[0].clone() };
                match region_from(cx, y, &t) {
                    Ok(Some(r)) if r.input() == t && r.dep().contains(&path.fc) => {
                        let pre = path.pre[start..].to_vec();
                        fcs.push((Path { pre, t, ..path }, r));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        refused.get_or_insert(e);
                    }
                }
            }
        }
        let weights =
            |p: &Path| cx.ix.constant(cx.g, &cx.node(p.fc).input[1]).map_or(0, |t| t.dims.iter().product::<i64>());
        fcs.sort_by_key(|(p, _)| std::cmp::Reverse(weights(p)));
        (!fcs.is_empty() || refused.is_some()).then_some(Candidate { root: at, fcs, refused })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let mut first = None;
        for (j, (path, region)) in c.fcs.iter().enumerate() {
            match recover_fc(cx, c.root, path, region) {
                Ok(mut plan) => {
                    plan.fc = j;
                    return Checked::Fits(plan);
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match (first, &c.refused) {
            (Some(e), _) => Checked::refuse(e),
            (None, Some(e)) => Checked::refuse(e.clone()),
            (None, None) => Checked::Refused(vec![]),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        let Candidate { root, mut fcs, .. } = c;
        let (path, region) = fcs.swap_remove(plan.fc);
        let fcn = cx.node(path.fc);
        let y = cx.node(root).output[0].clone();
        let mut names = cx.names();
        let (wname, bname) = names.conv_params(cx.ix, fcn);
        let bias = matches!(path.kind, Fc::Conv { .. } | Fc::Gemm { .. }) || plan.bias.iter().any(|&b| b != 0.0);
        let mm = names.fresh(&format!("{}_matmul", fcn.output[0]));
        let kept = kept_post(cx, &path);
        let insert: Vec<NodeProto> = path_nodes(cx, &path, &kept, &wname, bias.then_some(bname.as_str()), &y, &mm)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        let pre: HashSet<usize> = path.pre.iter().copied().collect();
        let remove: Vec<usize> = region.dep().iter().copied().filter(|q| !pre.contains(q)).collect();
        let (k, m, groups) = path.kind.sizes(plan.weight.shape()).unwrap_or_default();
        let detail = format!(
            "{} nodes between '{}' and '{}' into {} '{}' ({k} -> {m} features{})",
            region.dep().len(),
            region.input(),
            y,
            path.kind.op(),
            fcn.name(),
            if groups > 1 { format!(", {groups} groups") } else { String::new() }
        );
        let mut initializers = vec![(wname, plan.weight.into(), plan.ft)];
        if bias {
            initializers.push((bname, plan.bias.into_dyn().into(), plan.ft));
        }
        Patch {
            at: root,
            remove,
            insert,
            replace: vec![],
            initializers,
            log: Rewrite { rule: Self::ID, node: fcn.name().to_string(), detail, weights: vec![] },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).name().to_string()
    }
}

/// The shape operators after the FC (the affine ones are dropped: they go into its weights).
fn kept_post(cx: &Cx, p: &Path) -> Vec<usize> {
    p.post.iter().copied().filter(|&q| is_shape_op(cx.node(q))).collect()
}

/// The FC (weight `w`, bias `b` if any; a MatMul's bias added after it, through tensor `mm`) and
/// the shape operators after it, the last writing `y`; each with the index of the node it stands
/// for (they are in the graph's order).
fn path_nodes(
    cx: &Cx,
    p: &Path,
    kept: &[usize],
    w: &str,
    b: Option<&str>,
    y: &str,
    mm: &str,
) -> Vec<(usize, NodeProto)> {
    let fcn = cx.node(p.fc);
    let u = fcn.input[0].clone();
    let v = if kept.is_empty() { y.to_string() } else { fcn.output[0].clone() };
    let mut fc = fcn.clone();
    let mut out = Vec::new();
    match (p.kind, b) {
        (Fc::MatMul, Some(b)) => {
            fc.input = vec![u, w.to_string()];
            fc.output = vec![mm.to_string()];
            let add = NodeProto {
                op_type: Some("Add".into()),
                name: Some(format!("{}_bias", fcn.name())),
                input: vec![mm.to_string(), b.to_string()],
                output: vec![v.clone()],
                ..Default::default()
            };
            out.push((p.fc, fc));
            out.push((p.fc, add));
        }
        (kind, b) => {
            fc.input = [u, w.to_string()].into_iter().chain(b.map(str::to_string)).collect();
            fc.output = vec![v.clone()];
            if matches!(kind, Fc::Gemm { .. }) {
                // the recovered matrix has the factors in it
                fc.attribute.retain(|a| a.name() != "alpha" && a.name() != "beta");
            }
            out.push((p.fc, fc));
        }
    }
    let mut prev = v;
    for (j, &q) in kept.iter().enumerate() {
        let mut n = cx.node(q).clone();
        n.input[0] = prev;
        if j + 1 == kept.len() {
            n.output = vec![y.to_string()];
        }
        prev = n.output[0].clone();
        out.push((q, n));
    }
    out
}

/// The region's static nodes (shape arithmetic, constants) that `nodes` need, by index; or why
/// one of the shapes they need comes from a node that the rewrite removes.
fn cone(cx: &Cx, r: &Region, nodes: &[&NodeProto], keep: &HashSet<usize>, fc: &str) -> Result<Vec<usize>, Reason> {
    let (stat, dep): (HashSet<usize>, HashSet<usize>) =
        (r.stat().iter().copied().collect(), r.dep().iter().copied().collect());
    let mut out = BTreeSet::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<String> = nodes.iter().flat_map(|n| n.input.iter().cloned()).collect();
    while let Some(t) = stack.pop() {
        if t.is_empty() || t == r.input() || !seen.insert(t.clone()) {
            continue;
        }
        let Some(q) = cx.producer(&t) else { continue };
        if stat.contains(&q) {
            if out.insert(q) {
                stack.extend(cx.node(q).input.iter().cloned());
            }
        } else if dep.contains(&q) && !keep.contains(&q) {
            let node = cx.node(q).name().to_string();
            return Err(Reason::Fc { fc: fc.to_string(), why: FcMisfit::ShapeFromRemoved { node } });
        }
    }
    Ok(out.into_iter().collect())
}

/// `nodes` (each with the index of the node it stands for) and their static cone, in the graph's
/// order.
fn with_cone(
    cx: &Cx,
    r: &Region,
    nodes: Vec<(usize, NodeProto)>,
    keep: &HashSet<usize>,
    fc: &str,
) -> Result<Vec<NodeProto>, Reason> {
    let refs: Vec<&NodeProto> = nodes.iter().map(|(_, n)| n).collect();
    let mut all: Vec<(usize, usize, NodeProto)> =
        cone(cx, r, &refs, keep, fc)?.into_iter().map(|q| (q, 0, cx.node(q).clone())).collect();
    all.extend(nodes.into_iter().enumerate().map(|(j, (q, n))| (q, 1 + j, n)));
    all.sort_by_key(|(q, j, _)| (*q, *j));
    Ok(all.into_iter().map(|(_, _, n)| n).collect())
}

/// `a` as a permutation of `0..n` (`a[j]`: the index its element `j` comes from), if it is one.
fn permutation(a: &ArrayD<f64>, n: usize) -> Option<Vec<usize>> {
    if a.len() != n {
        return None;
    }
    let mut seen = vec![false; n];
    let mut out = Vec::with_capacity(n);
    for &v in a.iter() {
        if v.fract() != 0.0 || v < 0.0 || v >= n as f64 || seen[v as usize] {
            return None;
        }
        seen[v as usize] = true;
        out.push(v as usize);
    }
    Some(out)
}

/// The FC the region is, in its weight layout, with its bias; or why it is not one.
fn recover_fc(cx: &Cx, root: usize, p: &Path, r: &Region) -> Result<Plan, Reason> {
    let y = cx.node(root).output[0].clone();
    let fcn = cx.node(p.fc);
    let fc = fcn.name().to_string();
    let misfit = |why: FcMisfit| Reason::Fc { fc: fc.clone(), why };
    let t = r.input();
    let xshape = cx
        .shape_of(t)
        .ok_or_else(|| RegionReason::SizeUnknown { tensor: t.to_string(), why: cx.facts().incomplete.clone() })?;
    let (w, ft) = cx.consts.f64(&fcn.input[1]).map_err(Reason::Const)?;
    let Some((k, m, groups)) = p.kind.sizes(w.shape()).filter(|&(k, m, g)| k % g == 0 && m % g == 0) else {
        return Err(misfit(FcMisfit::Weight { shape: w.shape().to_vec() }));
    };
    let weights = m as u128 * (k / groups) as u128;
    if weights > WEIGHT_LIMIT {
        return Err(misfit(FcMisfit::TooBig { weights }));
    }
    let kept = kept_post(cx, p);
    let keep: HashSet<usize> = p.pre.iter().chain(&kept).copied().chain([p.fc]).collect();
    let xn: usize = xshape.iter().product();
    let plan = |nodes: Vec<NodeProto>, extra: &[(String, ArrayD<f64>)], out: &str, bound: usize| {
        let model = nodes_model(cx, nodes, extra, t, out, &xshape)?;
        RegionPlan::new(&model, &xshape, bound).map_err(|e| Reason::from(RegionReason::CannotEvaluate(e)))
    };
    let eval = |plan: &RegionPlan, x: &ArrayD<f64>| plan.eval(x).map_err(|e| Reason::from(RegionReason::Tract(e)));
    let indices = |n: usize, shape: &[usize]| ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| i as f64).collect());
    // the operators from t to the FC's input: a permutation of t's elements
    let u_name = &fcn.input[0];
    let not_rearranged = |from: &str, to: &str| misfit(FcMisfit::NotRearranged { from: from.into(), to: to.into() });
    let (pre, ushape) = if p.pre.is_empty() {
        ((0..xn).collect::<Vec<usize>>(), xshape.clone())
    } else {
        let nodes = with_cone(cx, r, p.pre.iter().map(|&q| (q, cx.node(q).clone())).collect(), &keep, &fc)?;
        let pl = plan(nodes, &[], u_name, xn)?;
        let u = eval(&pl, &indices(xn, &xshape).expect("the input's shape"))?;
        (permutation(&u, xn).ok_or_else(|| not_rearranged(t, u_name))?, pl.output_shape().to_vec())
    };
    let axis = p.kind.feature_axis(ushape.len());
    if ushape.len() < 2 || ushape[axis] != k || (matches!(p.kind, Fc::Gemm { .. }) && ushape.len() != 2) {
        return Err(misfit(FcMisfit::Input { shape: ushape, features: k }));
    }
    let uc = Coords::of(&ushape, axis);
    let mut vshape = ushape.clone();
    vshape[axis] = m;
    let vc = Coords::of(&vshape, axis);
    let vn: usize = vshape.iter().product();
    // the path with an FC of blocks `wg` [M, K/groups] and bias `b`, evaluated in tract
    let wname = "merge_into_fc.weight".to_string();
    let bname = "merge_into_fc.bias".to_string();
    let candidate = |wg: &Array2<f64>, b: &Array1<f64>| -> Result<RegionPlan, Reason> {
        let nodes = path_nodes(cx, p, &kept, &wname, Some(&bname), &y, "merge_into_fc.mm");
        let pre_nodes = p.pre.iter().map(|&q| (q, cx.node(q).clone()));
        let nodes = with_cone(cx, r, pre_nodes.chain(nodes).collect(), &keep, &fc)?;
        let extra = [(wname.clone(), p.kind.layout(wg, ushape.len() - 2)), (bname.clone(), b.clone().into_dyn())];
        plan(nodes, &extra, &y, xn.max(vn))
    };
    // x holding the FC input `u` (flat, in u's order)
    let x_of = |u: &[f64]| {
        let mut x = vec![0.0; xn];
        for (j, &val) in u.iter().enumerate() {
            x[pre[j]] = val;
        }
        ArrayD::from_shape_vec(IxDyn(&xshape), x).expect("the input's shape")
    };
    // the operators after the FC, the affine ones aside: a permutation of its output's elements,
    // read through FCs writing each element's row (its group's first input, holding the row) and
    // its feature (the bias)
    let kg = k / groups;
    let group_of_out = |f: usize| f / (m / groups);
    let rows_in: Vec<f64> =
        (0..xn).map(|j| (((j / uc.inner) / uc.features) * uc.inner + j % uc.inner) as f64).collect();
    let picks = Array2::from_shape_fn((m, kg), |(_, kk)| if kk == 0 { 1.0 } else { 0.0 });
    let row_plan = candidate(&picks, &Array1::zeros(m))?;
    let yshape = row_plan.output_shape().to_vec();
    let yn: usize = yshape.iter().product();
    let rows = eval(&row_plan, &x_of(&rows_in))?;
    let feats =
        eval(&candidate(&Array2::zeros((m, kg)), &Array1::from_iter((0..m).map(|f| f as f64)))?, &x_of(&rows_in))?;
    let mut post = Vec::with_capacity(yn);
    let mut seen = vec![false; vn];
    for (&row, &f) in rows.iter().zip(feats.iter()) {
        let ok = yn == vn && row.fract() == 0.0 && f.fract() == 0.0 && row >= 0.0 && f >= 0.0;
        let (row, f) = (row as usize, f as usize);
        if !ok || row >= vc.rows || f >= m || seen[vc.at(row, f)] {
            return Err(not_rearranged(&fcn.output[0], &y));
        }
        seen[vc.at(row, f)] = true;
        post.push(vc.at(row, f));
    }
    // the region, and what it computes in the FC's coordinates
    let region = region_plan(cx, r, &y, &xshape, xn.max(yn))?;
    if region.output_shape() != yshape.as_slice() {
        return Err(not_rearranged(&fcn.output[0], &y));
    }
    let to_v = |yv: &ArrayD<f64>| {
        let mut v = vec![0.0; vn];
        for (i, &val) in yv.iter().enumerate() {
            v[post[i]] = val;
        }
        v
    };
    let eps = 16.0 * ft.eps();
    let y0 = eval(&region, &ArrayD::zeros(IxDyn(&xshape)))?;
    let scale0 = y0.iter().fold(1f64, |a, v| a.max(v.abs()));
    let v0 = to_v(&y0);
    let bias = Array1::from_iter((0..m).map(|f| v0[vc.at(0, f)]));
    if (0..vc.rows).any(|row| (0..m).any(|f| (v0[vc.at(row, f)] - bias[f]).abs() > eps * scale0)) {
        return Err(misfit(FcMisfit::BiasNotPerFeature));
    }
    // impulses: feature kk in row kk mod R, R of them at a time; the weights within its group
    // kept (the FC's blocks), those between groups must be zero
    let per = uc.rows;
    let mut wg = Array2::<f64>::zeros((m, kg));
    let (mut scale, mut between) = (scale0, 0f64);
    for first in (0..k).step_by(per) {
        let last = (first + per).min(k);
        let mut u = vec![0.0; xn];
        for kk in first..last {
            u[uc.at(kk - first, kk)] = 1.0;
        }
        let dv: Vec<f64> = to_v(&eval(&region, &x_of(&u))?).iter().zip(&v0).map(|(a, b)| a - b).collect();
        scale = dv.iter().fold(scale, |a, v| a.max(v.abs()));
        for kk in first..last {
            for f in 0..m {
                let w = dv[vc.at(kk - first, f)];
                if group_of_out(f) == kk / kg {
                    wg[[f, kk % kg]] = w;
                } else {
                    between = between.max(w.abs());
                }
            }
        }
        // the rows without an impulse see nothing
        let tol = eps * dv.iter().fold(scale0, |a, v| a.max(v.abs()));
        if (last - first..vc.rows).any(|row| (0..m).any(|f| dv[vc.at(row, f)].abs() > tol)) {
            return Err(misfit(FcMisfit::MixesRows));
        }
    }
    if between > eps * scale {
        return Err(misfit(FcMisfit::Groups { groups, max_abs: between }));
    }
    // the path with the recovered FC against the region, on random inputs
    let found = candidate(&wg, &bias)?;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2 {
        let x: ArrayD<f64> = ArrayD::from_shape_fn(IxDyn(&xshape), |_| rng.random_range(-1.0..1.0));
        let (want, got) = (eval(&region, &x)?, eval(&found, &x)?);
        let mag = want.iter().fold(1f64, |a, v| a.max(v.abs()));
        let diff = want.iter().zip(got.iter()).fold(0f64, |a, (p, q)| a.max((p - q).abs()));
        if got.shape() != want.shape() || diff > 4.0 * eps * mag {
            // an impulse in one row reaching another explains it, if it does
            let dv: Vec<f64> =
                to_v(&eval(&region, &x_of(&one_hot(xn, uc.at(0, 0))))?).iter().zip(&v0).map(|(a, b)| a - b).collect();
            let tol = eps * dv.iter().fold(scale0, |a, v| a.max(v.abs()));
            let mixes = (1..vc.rows).any(|row| (0..m).any(|f| dv[vc.at(row, f)].abs() > tol));
            return Err(misfit(if mixes { FcMisfit::MixesRows } else { FcMisfit::NotRecovered { max_diff: diff } }));
        }
    }
    Ok(Plan { fc: 0, weight: p.kind.layout(&wg, ushape.len() - 2), bias, ft })
}

/// `n` zeros but a one at `at`.
fn one_hot(n: usize, at: usize) -> Vec<f64> {
    let mut v = vec![0.0; n];
    v[at] = 1.0;
    v
}

#[cfg(test)]
mod tests {
    use crate::rewrite::{fuse, FcMisfit, FuseReport, Reason};
    use crate::support::{assert_close, attr_ints, rand_input, run_f32, tensor_info, Builder, ConvAttrs};
    use crate::Model;

    /// Fuse `b`'s model; it must compute what it did (in tract) on an input of `shape`.
    fn fused(b: &Builder, shape: &[usize]) -> (Model, FuseReport) {
        let original = b.build();
        let mut m = b.build();
        let report = fuse(&mut m).unwrap();
        let x = rand_input(3, shape);
        assert_close(
            &run_f32(&m, std::slice::from_ref(&x)),
            &run_f32(&original, &[x]),
            1e-5,
            "fused vs original, in tract",
        );
        (m, report)
    }

    fn ops(m: &Model) -> Vec<&str> {
        m.graph().node.iter().map(|n| n.op_type()).collect()
    }

    /// RepMLP's block on x [1, 4, 6, 4] (2 sharesets of 3x2 partitions): partition (Reshape,
    /// Transpose, Reshape) → grouped FC as a 1x1 Conv → Reshape → BN(2) → Reshape, plus `branch`
    /// convs (k, groups) with BN on the same partitions, summed; un-partitioned after the sum.
    fn repmlp(branches: &[(usize, i64)]) -> Builder {
        let (c, s, h, w, hp, wp) = (4i64, 2i64, 3i64, 2i64, 2i64, 2i64);
        let mut b = Builder::new(c as usize, (h * hp) as usize, (w * wp) as usize);
        let sh = |b: &mut Builder, name: &str, v: &[i64]| b.initializer_i64(name, v);
        let s6 = sh(&mut b, "s6", &[1, c, hp, h, wp, w]);
        let r = b.node("Reshape", "part", &["x", &s6], &[], vec![]);
        let t = b.node("Transpose", "perm", &[&r], &[], vec![attr_ints("perm", &[0, 2, 4, 1, 3, 5])]);
        let sfc = sh(&mut b, "sfc", &[-1, s * h * w, 1, 1]);
        let u = b.node("Reshape", "to_fc", &[&t, &sfc], &[], vec![]);
        let (v, _, _) = b.conv_rand(
            "fc3",
            &u,
            (s * h * w) as usize,
            (h * w) as usize,
            &[1, 1],
            false,
            ConvAttrs::default().group(s),
        );
        let sshw = sh(&mut b, "sshw", &[-1, s, h, w]);
        let v = b.node("Reshape", "from_fc", &[&v, &sshw], &[], vec![]);
        let (v, _) = b.bn("fc3_bn", &v, s as usize, None);
        let sparts = sh(&mut b, "sparts", &[-1, hp, wp, s, h, w]);
        let mut acc = b.node("Reshape", "fc_parts", &[&v, &sparts], &[], vec![]);
        let ci = b.node("Reshape", "to_conv", &[&t, &sshw], &[], vec![]);
        for (j, &(k, groups)) in branches.iter().enumerate() {
            let p = (k / 2) as i64;
            let a = ConvAttrs::pads(&[p, p, p, p]).group(groups);
            let (y, _, _) = b.conv_rand(&format!("rep{j}"), &ci, s as usize, (s / groups) as usize, &[k, k], false, a);
            let (y, _) = b.bn(&format!("rep{j}_bn"), &y, s as usize, None);
            let y = b.node("Reshape", &format!("rep{j}_parts"), &[&y, &sparts], &[], vec![]);
            acc = b.add(&format!("add{j}"), &acc, &y);
        }
        let back = b.node("Transpose", "unperm", &[&acc], &[], vec![attr_ints("perm", &[0, 3, 1, 4, 2, 5])]);
        let sx = sh(&mut b, "sx", &[1, c, h * hp, w * wp]);
        let y = b.node("Reshape", "unpart", &[&back, &sx], &["y"], vec![]);
        b.output(&y);
        b
    }

    /// The local convolutions (1x1 and 3x3, with BN) and the BN after the FC's reshape are the FC
    /// with new weights: one grouped 1x1 Conv, no BN, no Add, the partitions kept.
    #[test]
    fn a_repmlp_block_is_its_fc_with_new_weights() {
        let (m, r) = fused(&repmlp(&[(1, 2), (3, 2)]), &[1, 4, 6, 4]);
        assert!(r.refused.is_empty(), "{}", r.summary());
        assert_eq!(ops(&m), ["Reshape", "Transpose", "Reshape", "Conv", "Reshape", "Reshape", "Transpose", "Reshape"]);
        let rw = r.rewrites.iter().find(|w| w.rule == "merge_into_fc").expect("merge_into_fc fired");
        assert!(rw.detail.ends_with("into Conv 'fc3' (12 -> 12 features, 2 groups)"), "{}", rw.detail);
        let fc = m.graph().node.iter().find(|n| n.op_type() == "Conv").unwrap();
        assert_eq!(fc.input.len(), 3, "the FC has the bias");
    }

    /// A conv branch that mixes the sharesets (groups 1 where the FC has 2) is not an FC of its
    /// groups: refused with that reason, the model untouched.
    #[test]
    fn a_region_joining_the_fcs_groups_is_refused() {
        let b = repmlp(&[(3, 1)]);
        let (m, r) = fused(&b, &[1, 4, 6, 4]);
        let refusal = r.refused.iter().find(|f| f.rule == "merge_into_fc").expect("a refusal");
        assert!(
            matches!(&refusal.reason, Reason::Fc { fc, why: FcMisfit::Groups { groups: 2, .. } } if fc == "fc3"),
            "{}",
            refusal.reason
        );
        assert!(ops(&m).contains(&"BatchNormalization"), "untouched: {:?}", ops(&m));
    }

    /// x [1, 5, 6] (tokens, features): x + MatMul(x, W) is MatMul(x, W + I).
    fn tokens(b: &mut Builder) {
        b.graph.input[0] = tensor_info("x", crate::proto::tensor_proto::DataType::Float, &[1, 5, 6]);
    }

    #[test]
    fn a_residual_around_a_linear_layer_is_the_layer() {
        let mut b = Builder::new(1, 1, 1);
        tokens(&mut b);
        let w = b.rand(&[6, 6]);
        let w = b.initializer("w", &w);
        let mm = b.node("MatMul", "fc", &["x", &w], &[], vec![]);
        let g = b.rand(&[6]);
        let g = b.initializer("gamma", &g);
        let scaled = b.node("Mul", "scale", &[&mm, &g], &[], vec![]);
        let y = b.add("residual", "x", &scaled);
        b.output(&y);
        let (m, r) = fused(&b, &[1, 5, 6]);
        assert_eq!(ops(&m), ["MatMul"], "{}", r.summary());
    }

    /// A token mixer (a depthwise conv over the tokens) beside the linear layer mixes its rows: not
    /// an FC of them.
    #[test]
    fn a_region_mixing_the_rows_is_refused() {
        let mut b = Builder::new(1, 1, 1);
        tokens(&mut b);
        let w = b.rand(&[6, 6]);
        let w = b.initializer("w", &w);
        let mm = b.node("MatMul", "fc", &["x", &w], &[], vec![]);
        let t = b.node("Transpose", "t", &["x"], &[], vec![attr_ints("perm", &[0, 2, 1])]);
        let (mix, _, _) = b.conv_rand("mix", &t, 6, 1, &[3], true, ConvAttrs::pads(&[1, 1]).group(6));
        let back = b.node("Transpose", "back", &[&mix], &[], vec![attr_ints("perm", &[0, 2, 1])]);
        let y = b.add("sum", &mm, &back);
        b.output(&y);
        let before = b.build().proto;
        let (m, r) = fused(&b, &[1, 5, 6]);
        assert_eq!(m.proto, before);
        let refusal = r.refused.iter().find(|f| f.rule == "merge_into_fc").expect("a refusal");
        assert_eq!(refusal.reason, Reason::Fc { fc: "fc".into(), why: FcMisfit::MixesRows }, "{}", r.summary());
    }
}
