//! A sum of branches of one input tensor becomes one Conv.
//!
//! - find: the root of an Add tree (any nesting and operand order) or a Sum; its leaves are
//!   branches, grouped by the tensor they read. A branch is Conv(x), Conv(Slice(x)) (ACNet's crop),
//!   Conv(Pad(x)) with zero padding, BatchNormalization(x) (RepVGG's identity) or x itself, each
//!   optionally multiplied by constant per-channel scales (RepOpt).
//! - check: every branch of a group fits, at a whole tap offset, inside the group's largest
//!   kernel with the same output size (see [`AffineConv::offset_in`]); constant per-channel
//!   operands of the sum fold into the bias.
//! - rewrite: one Conv with the largest branch's geometry writes each group's sum; what else the
//!   sum added stays an Add.

use super::sum_tree::{is_root, leaves};
use super::{kernel_str, rewired_conv, Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{is_op, Exact, Label, Names};
use crate::kernel::read::{read_bn, read_conv, read_conv_form, read_pad, read_slice, ReadError};
use crate::kernel::{tap_positions, AffineConv, Geometry};
use crate::model::tensor::{FloatType, Scaled, Summed, Term};
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use ndarray::{Array1, ArrayD};
use std::collections::HashSet;

pub(crate) struct MergeBranches;

enum Kind {
    /// A Conv (node index), reading through an optional Slice (crop) or Pad (node index).
    Conv { conv: usize, through: Option<usize> },
    /// The identity, optionally through a BatchNormalization (node index).
    Identity { bn: Option<usize> },
}

struct Branch {
    leaf: String,
    source: String,
    kind: Kind,
    /// nodes that exist only for this branch
    nodes: Vec<usize>,
    /// constant per-channel (or scalar) factors the branch is multiplied by, innermost first
    scales: Vec<ArrayD<f64>>,
    /// how many of `scales` (the last ones) the sum tree applies (a Sub, or a Mul around a
    /// sub-sum): a branch that is not merged keeps its own Mul nodes but needs these re-applied
    tree_factors: usize,
}

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
    /// per member, its kernel size (Conv branches)
    kernels: Vec<Option<Vec<usize>>>,
    /// the base branch's own padding
    base_pads: (Vec<i64>, Vec<i64>),
}

pub(crate) struct Plan {
    merged: Vec<Merged>,
    /// constant operands of the sum folded into the first merged conv's bias
    absorbed: HashSet<usize>,
    /// the branches left as they are, each with the factor the sum tree multiplied it by
    rest: Vec<(usize, Coef)>,
}

/// The factor a branch left out of the merge is multiplied by in the rewritten sum.
enum Coef {
    One,
    MinusOne,
    /// a per-channel (or scalar) constant, shaped to broadcast over the sum
    Scale(ArrayD<f64>),
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
        let branches = &c.branches;
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
        let plan = Plan { merged, absorbed, rest };
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
        let Plan { merged, absorbed, rest } = plan;
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
            if m.base_pads != m.pads || branches[base].nodes.len() > 1 {
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
                        (Kind::Conv { .. }, Some(kernel)) => kernel_str(kernel),
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

/// A Mul of `t` by a constant: (the other operand, the constant).
fn mul_by_const(cx: &Cx, n: &NodeProto) -> Option<(String, ArrayD<f64>)> {
    if !is_op(n, "Mul") || n.input.len() != 2 {
        return None;
    }
    for (k, other) in [(1, 0), (0, 1)] {
        if let Ok((a, _)) = cx.consts.f64(&n.input[k]) {
            if cx.ix.constant(cx.g, &n.input[other]).is_none() {
                return Some((n.input[other].clone(), a));
            }
        }
    }
    None
}

/// What a leaf of the sum is.
fn classify(cx: &Cx, leaf: &str) -> Branch {
    // peel constant scales (RepOpt-style branch multipliers), outermost first
    let mut scales = Vec::new();
    let mut nodes = Vec::new();
    let mut cur = leaf.to_string();
    while let Some(p) = cx.producer(&cur) {
        if cx.uses(&cur) != 1 {
            break;
        }
        match mul_by_const(cx, cx.node(p)) {
            Some((inner, a)) => {
                scales.push(a);
                nodes.push(p);
                cur = inner;
            }
            None => break,
        }
    }
    scales.reverse();
    let branch = |source: String, kind: Kind, nodes: Vec<usize>, scales: Vec<ArrayD<f64>>| Branch {
        leaf: leaf.to_string(),
        source,
        kind,
        nodes,
        scales,
        tree_factors: 0,
    };
    let identity = Kind::Identity { bn: None };
    let Some(p) = cx.producer(&cur) else { return branch(cur, identity, nodes, scales) };
    let n = cx.node(p);
    if cx.uses(&cur) != 1 {
        return branch(cur, identity, nodes, scales);
    }
    if is_op(n, "BatchNormalization") {
        nodes.push(p);
        return branch(n.input[0].clone(), Kind::Identity { bn: Some(p) }, nodes, scales);
    }
    if !is_op(n, "Conv") {
        return branch(cur, identity, nodes, scales);
    }
    nodes.push(p);
    let mut source = n.input[0].clone();
    let mut through = None;
    // look through one Slice (crop) or Pad that only this branch reads
    if let Some(q) = cx.producer(&source) {
        let pn = cx.node(q);
        if (is_op(pn, "Slice") || is_op(pn, "Pad")) && cx.uses(&source) == 1 {
            through = Some(q);
            nodes.push(q);
            source = pn.input[0].clone();
        }
    }
    branch(source, Kind::Conv { conv: p, through }, nodes, scales)
}

/// A Conv reading `source` (directly or through a Slice or Pad) whose output is also read
/// outside the sum, behind an identity-classified leaf: merging would lose that output.
fn leaked_conv(cx: &Cx, branches: &[Branch], source: &str) -> Option<String> {
    branches.iter().find_map(|b| {
        let mut n = cx.producer_node(&b.leaf)?;
        if is_op(n, "BatchNormalization") {
            n = cx.producer_node(n.input.first()?)?;
        }
        if !is_op(n, "Conv") {
            return None;
        }
        let x = n.input.first()?;
        let reads = cx
            .producer_node(x)
            .filter(|q| is_op(q, "Slice") || is_op(q, "Pad"))
            .and_then(|q| q.input.first())
            .unwrap_or(x);
        (matches!(b.kind, Kind::Identity { .. }) && reads.as_str() == source && cx.uses(&b.leaf) > 1)
            .then(|| n.label().to_string())
    })
}

/// A Conv branch's geometry and weights (the crop or padding it reads through included), or
/// why they cannot be read. Weights are decoded only here, for a group that is being merged.
fn load(cx: &Cx, conv: usize, through: Option<usize>) -> Result<(AffineConv, FloatType), ReadError> {
    let (mut k, ft) = read_conv(&cx.consts, cx.node(conv))?;
    if let Some(q) = through {
        let [cb, ce, pb, pe] = read_through(cx, q, k.rank())?;
        for a in 0..k.rank() {
            k.crop_begin[a] += cb[a];
            k.crop_end[a] += ce[a];
            k.pads_begin[a] += pb[a];
            k.pads_end[a] += pe[a];
        }
    }
    Ok((k, ft))
}

/// The crop (begin, end) and padding (begin, end) per spatial axis of the Slice or Pad (node `q`)
/// a Conv of spatial rank `r` reads through.
fn read_through(cx: &Cx, q: usize, r: usize) -> Result<[Vec<i64>; 4], ReadError> {
    let pn = cx.node(q);
    if is_op(pn, "Slice") {
        let (cb, ce) = read_slice(&cx.consts, pn, r + 2, cx.opset)?;
        return Ok([cb, ce, vec![0; r], vec![0; r]]);
    }
    let (pb, pe) = read_pad(&cx.consts, pn, r + 2, cx.opset)?;
    let neg = |v: &Vec<i64>| v.iter().map(|&x| (-x).max(0)).collect::<Vec<_>>();
    let pos = |v: &Vec<i64>| v.iter().map(|&x| x.max(0)).collect::<Vec<_>>();
    Ok([neg(&pb), neg(&pe), pos(&pb), pos(&pe)])
}

/// Merge one group of branches reading the same tensor into one conv with the geometry of its
/// largest kernel. (`members` of the result is filled by the caller.)
fn merge(cx: &Cx, group: &[&Branch]) -> Result<Merged, Reason> {
    match merge_stored(cx, group) {
        Some(m) => Ok(m),
        None => merge_values(cx, group),
    }
}

/// A Conv branch whose weight is stored, read but for the weight's values.
struct Stored {
    weight: Scaled,
    ft: FloatType,
    bias: Array1<f64>,
    groups: usize,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<i64>,
    pads_end: Vec<i64>,
    crop_begin: Vec<i64>,
    crop_end: Vec<i64>,
}

impl Stored {
    /// Conv branch `b`, when its weight is stored: a float initializer's bytes, or such bytes a
    /// BatchNormalization was folded into ([`Exact::Scaled`]); `None` otherwise or when it
    /// cannot be read (the reason is [`load`]'s).
    fn read(cx: &Cx, b: &Branch) -> Option<Stored> {
        let Kind::Conv { conv, through } = b.kind else { return None };
        let n = cx.node(conv);
        let name = n.input.get(1)?;
        let (weight, ft) = match cx.consts.exact.get(name) {
            Some(Exact::Scaled(s)) if cx.ix.initializer.contains_key(name) => {
                let t = cx.ix.constant(cx.g, name)?;
                (s.clone(), FloatType::from_onnx(t.data_type.unwrap_or(0))?)
            }
            Some(_) => return None,
            None => {
                let (raw, ft, dims) = cx.stored_weight(name)?;
                let ones = vec![1.0; dims[0]];
                (Scaled::new(raw, ft, dims, ones)?, ft)
            }
        };
        let f = read_conv_form(&cx.consts, n, &weight.dims, ft).ok()?;
        let r = weight.dims.len() - 2;
        let bias = f.bias.unwrap_or_else(|| Array1::zeros(weight.dims[0]));
        let mut s = Stored {
            weight,
            ft,
            bias,
            groups: f.groups,
            strides: f.strides,
            dilations: f.dilations,
            pads_begin: f.pads_begin,
            pads_end: f.pads_end,
            crop_begin: vec![0; r],
            crop_end: vec![0; r],
        };
        if let Some(q) = through {
            let [cb, ce, pb, pe] = read_through(cx, q, r).ok()?;
            for a in 0..r {
                s.crop_begin[a] += cb[a];
                s.crop_end[a] += ce[a];
                s.pads_begin[a] += pb[a];
                s.pads_end[a] += pe[a];
            }
        }
        Some(s)
    }

    fn geometry(&self) -> Geometry<'_> {
        Geometry {
            dims: &self.weight.dims,
            groups: self.groups,
            strides: &self.strides,
            dilations: &self.dilations,
            pads_begin: &self.pads_begin,
            pads_end: &self.pads_end,
            crop_begin: &self.crop_begin,
            crop_end: &self.crop_end,
        }
    }

    fn kernel(&self) -> &[usize] {
        &self.weight.dims[2..]
    }
}

/// [`merge_values`] without reading the weights' values, when every branch is a Conv whose
/// weight is stored: the merged weight is their sum computed when it is written
/// ([`Exact::Summed`]), and what is computed now — the bias, the factors, the tap positions — is
/// what the full merge computes, with the same operations in the same order (so the values are
/// the same to the bit). `None` when a branch is not such a Conv or when the full merge would
/// refuse the group (it then says why).
fn merge_stored(cx: &Cx, group: &[&Branch]) -> Option<Merged> {
    let loaded: Vec<Stored> = group.iter().map(|b| Stored::read(cx, b)).collect::<Option<_>>()?;
    // the largest kernel (the first of equal ones), as the full merge picks it
    let volume = |s: &Stored| s.kernel().iter().product::<usize>();
    let mut bi = 0;
    for k in 1..loaded.len() {
        if volume(&loaded[k]) > volume(&loaded[bi]) {
            bi = k;
        }
    }
    let big = &loaded[bi];
    let (o, r, ft) = (big.weight.dims[0], big.weight.dims.len() - 2, big.ft);
    if big.crop_begin.iter().chain(&big.crop_end).any(|&c| c != 0) || loaded.iter().any(|s| s.ft != ft) {
        return None;
    }
    // a branch's factors, and its bias times them (`AffineConv::then_affine`'s operations)
    let scaled = |k: usize| -> Option<(Vec<Vec<f64>>, Array1<f64>)> {
        let (s, b) = (&loaded[k], group[k]);
        let (so, sr) = (s.weight.dims[0], s.weight.dims.len() - 2);
        let mut bias = s.bias.clone();
        let mut factors = Vec::with_capacity(b.scales.len());
        for sc in &b.scales {
            let a = channel_vector(sc, so, sr)?;
            bias = &bias * &a + &Array1::<f64>::zeros(a.len());
            factors.push(a.to_vec());
        }
        Some((factors, bias))
    };
    let (base_factors, mut bias) = scaled(bi)?;
    let mut terms = Vec::with_capacity(loaded.len() - 1);
    for k in (0..loaded.len()).filter(|&k| k != bi) {
        let s = &loaded[k];
        let (factors, b) = scaled(k)?;
        let offs = s.geometry().offset_in(&big.geometry()).ok()?;
        bias += &b;
        terms.push(Term { values: s.weight.clone(), factors, at: tap_positions(s.kernel(), big.kernel(), &offs) });
    }
    let summed = Summed::new(big.weight.clone(), base_factors, terms)?;
    debug_assert_eq!((summed.dims()[0], summed.dims().len() - 2), (o, r));
    Some(Merged {
        members: vec![],
        weight: Exact::Summed(summed),
        dims: big.weight.dims.clone(),
        bias,
        pads: (big.pads_begin.clone(), big.pads_end.clone()),
        ft,
        base: bi,
        kernels: loaded.iter().map(|s| Some(s.kernel().to_vec())).collect(),
        base_pads: (big.pads_begin.clone(), big.pads_end.clone()),
    })
}

/// [`merge`], reading every branch's weight in f64.
fn merge_values(cx: &Cx, group: &[&Branch]) -> Result<Merged, Reason> {
    let mut loaded: Vec<Option<(AffineConv, FloatType)>> = Vec::with_capacity(group.len());
    for b in group {
        loaded.push(match b.kind {
            Kind::Conv { conv, through } => Some(
                load(cx, conv, through).map_err(|err| Reason::Conv { conv: cx.node(conv).label().to_string(), err })?,
            ),
            Kind::Identity { .. } => None,
        });
    }
    // the largest kernel (the first of equal ones)
    let volume = |l: &Option<(AffineConv, FloatType)>| l.as_ref().map(|(c, _)| c.kernel().iter().product::<usize>());
    let mut base: Option<usize> = None;
    for k in 0..loaded.len() {
        if volume(&loaded[k]).is_some() && base.is_none_or(|j| volume(&loaded[k]) > volume(&loaded[j])) {
            base = Some(k);
        }
    }
    let bi = base.ok_or(Reason::NoConv)?;
    let (big, ft) = loaded[bi].as_ref().expect("the base is a loaded Conv");
    let ft = *ft;
    if big.crop_begin.iter().chain(&big.crop_end).any(|&c| c != 0) {
        return Err(Reason::CroppedBase {
            branch: group[bi].leaf.clone(),
            crop_begin: big.crop_begin.clone(),
            crop_end: big.crop_end.clone(),
        });
    }
    let kernels = loaded.iter().map(|l| l.as_ref().map(|(c, _)| c.kernel().to_vec())).collect();
    let base_pads = (big.pads_begin.clone(), big.pads_end.clone());
    // the sum: the base, plus every other branch in order
    let mut acc = loaded[bi].take().expect("the base is a loaded Conv").0;
    scale(&mut acc, group[bi])?;
    for (j, (b, l)) in group.iter().zip(loaded.iter_mut()).enumerate() {
        if j == bi {
            continue;
        }
        let (mut k, kft) = match (l.take(), &b.kind) {
            (Some(v), _) => v,
            (None, Kind::Identity { bn }) => identity(cx, &acc, b, *bn, ft)?,
            (None, Kind::Conv { .. }) => unreachable!("every Conv branch was loaded"),
        };
        if kft != ft {
            return Err(Reason::BranchDtypes);
        }
        scale(&mut k, b)?;
        let offs = k.offset_in(&acc).map_err(|misfit| Reason::Misfit { branch: b.leaf.clone(), misfit })?;
        acc.add_at(&k, &offs);
    }
    let pads = (acc.pads_begin.clone(), acc.pads_end.clone());
    Ok(Merged {
        members: vec![],
        dims: acc.weight.shape().to_vec(),
        weight: Exact::Values(acc.weight),
        bias: acc.bias,
        pads,
        ft,
        base: bi,
        kernels,
        base_pads,
    })
}

/// An identity branch (through its BatchNormalization, if any) as a one-tap kernel in `acc`'s
/// channels and groups, with its dtype (`ft` when there is no BatchNormalization).
fn identity(cx: &Cx, acc: &AffineConv, b: &Branch, bn: Option<usize>, ft: FloatType) -> Result<(AffineConv, FloatType), Reason> {
    if acc.out_channels() != acc.in_channels() {
        return Err(Reason::IdentityChannels {
            branch: b.leaf.clone(),
            inputs: acc.in_channels(),
            outputs: acc.out_channels(),
        });
    }
    let mut id = AffineConv::identity(acc.out_channels(), acc.groups, acc.rank());
    let Some(bn) = bn else { return Ok((id, ft)) };
    let n = cx.node(bn);
    let (p, bft) = read_bn(&cx.consts, n).map_err(|err| Reason::IdentityBn { bn: n.label().to_string(), err })?;
    if p.scale.len() != acc.out_channels() {
        return Err(Reason::IdentityBnChannels(p.scale.len()));
    }
    id.fold_bn(&p);
    Ok((id, bft))
}

/// Apply a branch's constant per-channel factors to its kernel.
fn scale(k: &mut AffineConv, b: &Branch) -> Result<(), Reason> {
    for sc in &b.scales {
        let a = channel_vector(sc, k.out_channels(), k.rank())
            .ok_or_else(|| Reason::NotPerChannel { branch: b.leaf.clone(), shape: sc.shape().to_vec() })?;
        k.then_affine(&a, &Array1::zeros(a.len()));
    }
    Ok(())
}

/// Constant operands of the sum that add a per-channel (or scalar) bias, folded into `into`'s
/// bias: which branches they were.
fn absorb_constants(cx: &Cx, branches: &[Branch], into: &mut Merged) -> HashSet<usize> {
    let (o, r) = (into.dims[0], into.dims.len() - 2);
    let mut absorbed = HashSet::new();
    for (k, b) in branches.iter().enumerate() {
        if !matches!(b.kind, Kind::Identity { bn: None }) {
            continue;
        }
        let Ok((a, aft)) = cx.consts.f64(&b.leaf) else { continue };
        if aft != into.ft {
            continue;
        }
        let Some(mut v) = channel_vector(&a, o, r) else { continue };
        let mut per_channel = true;
        for f in &b.scales {
            match channel_vector(f, o, r) {
                Some(f) => v = v * f,
                None => per_channel = false,
            }
        }
        if per_channel {
            into.bias += &v;
            absorbed.insert(k);
        }
    }
    absorbed
}

/// A constant that broadcasts per channel (or as a scalar) over a conv output of `o` channels
/// and spatial rank `r`, as one value per channel.
fn channel_vector(a: &ArrayD<f64>, o: usize, r: usize) -> Option<Array1<f64>> {
    let s = a.shape();
    if s.len() > r + 2 {
        return None;
    }
    let chan_pos = (r + 2) as isize - 1 - r as isize; // index of the channel axis, right-aligned
    let off = (r + 2) - s.len();
    let mut c = 1;
    for (i, &d) in s.iter().enumerate() {
        if (i + off) as isize == chan_pos {
            c = d;
        } else if d != 1 {
            return None;
        }
    }
    let flat: Vec<f64> = a.iter().copied().collect();
    match c {
        1 => Some(Array1::from_elem(o, flat[0])),
        c if c == o => Some(Array1::from(flat)),
        _ => None,
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

/// The factor the sum tree multiplies a branch left out of the merge by, for a conv output of
/// `o` channels and spatial rank `r`; `None` when it is not per channel.
fn rest_coef(b: &Branch, o: usize, r: usize) -> Option<Coef> {
    let tree = &b.scales[b.scales.len() - b.tree_factors..];
    if tree.iter().all(|f| f.len() == 1) {
        let v: f64 = tree.iter().map(|f| f.iter().next().copied().unwrap_or(1.0)).product();
        return Some(if v == 1.0 {
            Coef::One
        } else if v == -1.0 {
            Coef::MinusOne
        } else {
            Coef::Scale(ndarray::arr0(v).into_dyn())
        });
    }
    let mut v = Array1::from_elem(o, 1.0);
    for f in tree {
        v = v * channel_vector(f, o, r)?;
    }
    let mut shape = vec![o];
    shape.extend(std::iter::repeat_n(1, r));
    Some(Coef::Scale(v.into_shape_with_order(ndarray::IxDyn(&shape)).ok()?))
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
mod tests {
    use super::*;
    use crate::graph::ConstError;
    use crate::kernel::read::Form;
    use crate::kernel::Misfit;
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
    fn acb(hor: ConvAttrs) -> Builder {
        let mut b = Builder::new(2, 6, 6);
        let (sq, _, _) = b.conv_rand("sq", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (ver, _, _) = b.conv_rand("ver", "x", 3, 2, &[3, 1], true, ConvAttrs::pads(&[1, 0, 1, 0]));
        let (hor, _, _) = b.conv_rand("hor", "x", 3, 2, &[1, 3], true, hor);
        let s = b.add("add", &sq, &ver);
        let y = b.add("add_1", &s, &hor);
        b.output(&y);
        b
    }

    /// The merge of stored weights (a sum computed when it is written) has the bits of the merge
    /// that reads every branch in f64: stored weights as they are, weights a BatchNormalization was
    /// folded into (factors of both signs), a branch scaled by a per-channel constant.
    #[test]
    fn stored_branches_merge_to_the_bits_of_branches_read_in_f64() {
        use crate::graph::GraphIndex;
        use crate::model::tensor::from_f64;
        use crate::rewrite::driver::Cache;
        // the ACNet block with its 1x3 branch times a per-channel constant
        let mut scaled = Builder::new(2, 6, 6);
        let (sq, _, _) = scaled.conv_rand("sq", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (ver, _, _) = scaled.conv_rand("ver", "x", 3, 2, &[3, 1], true, ConvAttrs::pads(&[1, 0, 1, 0]));
        let (hor, _, _) = scaled.conv_rand("hor", "x", 3, 2, &[1, 3], true, ConvAttrs::pads(&[0, 1, 0, 1]));
        let g = scaled.rand(&[3, 1, 1]);
        let g = scaled.initializer("g", &g);
        let hor = scaled.node("Mul", "mul", &[&hor, &g], &[], vec![]);
        let s = scaled.add("add", &sq, &ver);
        let y = scaled.add("add_1", &s, &hor);
        scaled.output(&y);
        for b in [acb(ConvAttrs::pads(&[0, 1, 0, 1])), scaled] {
            let root = "add_1";
            let m = b.build();
            for folded in [false, true] {
                let ix = GraphIndex::new(m.graph());
                let mut cache = Cache::new(m.graph());
                if folded {
                    for (k, conv) in ["sq", "ver", "hor"].into_iter().enumerate() {
                        let n = m.graph().node.iter().find(|n| n.name() == conv).unwrap();
                        let t = ix.constant(m.graph(), &n.input[1]).unwrap();
                        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                        let factors = (0..dims[0]).map(|o| [0.7, -1.3, 2.1][(o + k) % 3]).collect();
                        let raw = m.raw_bytes(t).unwrap().unwrap();
                        let s = Scaled::new(raw, FloatType::F32, dims, factors).unwrap();
                        cache.exact.insert(n.input[1].clone(), Exact::Scaled(s));
                    }
                }
                let cx = Cx::new(&m, &ix, &cache);
                let at = m.graph().node.iter().position(|n| n.name() == root).unwrap();
                let c = MergeBranches.find(&cx, at).expect("a sum");
                let group: Vec<&Branch> = c.branches.iter().filter(|b| matches!(b.kind, Kind::Conv { .. })).collect();
                assert_eq!(group.len(), 3);
                let stored = merge_stored(&cx, &group).expect("every branch's weight is stored");
                let full = merge_values(&cx, &group).expect("the block merges");
                assert!(matches!(stored.weight, Exact::Summed(_)));
                let bits = |a: ArrayD<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(stored.weight.to_f64()), bits(full.weight.to_f64()), "{root}, folded: {folded}");
                assert_eq!(bits(stored.bias.clone().into_dyn()), bits(full.bias.clone().into_dyn()));
                assert_eq!((&stored.dims, &stored.pads, stored.base), (&full.dims, &full.pads, full.base));
                assert_eq!((&stored.kernels, &stored.base_pads, stored.ft), (&full.kernels, &full.base_pads, full.ft));
                let want = from_f64("w", &full.weight.to_f64(), FloatType::F32);
                assert_eq!(stored.weight.encode("w", FloatType::F32), Some(want));
            }
        }
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
}
