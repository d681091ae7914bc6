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
use crate::graph::{is_op, Names};
use crate::kernel::read::{read_bn, read_conv, read_pad, read_slice, ReadError};
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;
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
    conv: AffineConv,
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
}

impl Rule for MergeBranches {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::MERGE_BRANCHES;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        if !is_root(cx, at) {
            return None;
        }
        let (leaf_names, internal) = leaves(cx, at);
        let branches = leaf_names.iter().map(|l| classify(cx, l)).collect();
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
        for s in &sources {
            let members: Vec<usize> = (0..branches.len()).filter(|&k| branches[k].source == *s).collect();
            let n_conv = members.iter().filter(|&&k| matches!(branches[k].kind, Kind::Conv { .. })).count();
            if let Some(conv) = leaked_conv(cx, branches, s) {
                refused.push(Reason::UsedOutside { conv });
                continue;
            }
            if n_conv == 0 || members.len() < 2 {
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
        let plan = Plan { merged, absorbed };
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
        let Plan { merged, absorbed } = plan;
        let in_group: HashSet<usize> = merged.iter().flat_map(|d| d.members.iter().copied()).collect();
        let rest: Vec<usize> = (0..branches.len()).filter(|k| !in_group.contains(k) && !absorbed.contains(k)).collect();
        let n_terms = merged.len() + rest.len();
        let mut names = Names::new(cx.g);
        let mut insert = Vec::new();
        let mut inits = Vec::new();
        let mut remove: Vec<usize> = internal;
        let mut terms: Vec<(usize, String)> = Vec::new();
        let mut details = Vec::new();
        for m in merged {
            let base = m.members[m.base];
            let Kind::Conv { conv: ci, .. } = branches[base].kind else { unreachable!("the base is a Conv branch") };
            let cnode = cx.node(ci);
            let output = if n_terms == 1 { out.clone() } else { cnode.output[0].clone() };
            let (wname, bname) = names.conv_params(cx.ix, cnode);
            let mut node = rewired_conv(cnode, &branches[base].source, &wname, &bname, &output);
            let conv = m.conv;
            if m.base_pads != (conv.pads_begin.clone(), conv.pads_end.clone()) || branches[base].nodes.len() > 1 {
                set_pads(&mut node, &conv);
            }
            insert.push(node);
            let merged_kernel = kernel_str(conv.kernel());
            inits.push((wname, conv.weight, m.ft));
            inits.push((bname, conv.bias.into_dyn(), m.ft));
            for &k in &m.members {
                remove.extend(&branches[k].nodes);
            }
            terms.push((*m.members.iter().min().expect("a group has members"), output));
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
                cnode.name(),
                merged_kernel
            ));
        }
        if !absorbed.is_empty() {
            details.push(format!("{} constant(s) into the bias", absorbed.len()));
        }
        for &k in &rest {
            terms.push((k, branches[k].leaf.clone()));
        }
        terms.sort_by_key(|t| t.0);
        if n_terms > 1 {
            insert.extend(sum_of(root, &terms, out, &mut names));
        }
        remove.sort_unstable();
        remove.dedup();
        let node = insert[0].name().to_string();
        Patch { at: i, remove, insert, initializers: inits, log: Rewrite { rule: Self::ID, node, detail: details.join("; "), weights: vec![] } }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.root).name().to_string()
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
            .then(|| n.name().to_string())
    })
}

/// A Conv branch's geometry and weights (the crop or padding it reads through included), or
/// why they cannot be read. Weights are decoded only here, for a group that is being merged.
fn load(cx: &Cx, conv: usize, through: Option<usize>) -> Result<(AffineConv, FloatType), ReadError> {
    let (mut k, ft) = read_conv(&cx.consts, cx.node(conv))?;
    if let Some(q) = through {
        let pn = cx.node(q);
        let rank = k.rank() + 2;
        let (cb, ce, pb, pe) = if is_op(pn, "Slice") {
            let (cb, ce) = read_slice(&cx.consts, pn, rank, cx.opset)?;
            (cb, ce, vec![0; rank - 2], vec![0; rank - 2])
        } else {
            let (pb, pe) = read_pad(&cx.consts, pn, rank, cx.opset)?;
            let neg = |v: &Vec<i64>| v.iter().map(|&x| (-x).max(0)).collect::<Vec<_>>();
            let pos = |v: &Vec<i64>| v.iter().map(|&x| x.max(0)).collect::<Vec<_>>();
            (neg(&pb), neg(&pe), pos(&pb), pos(&pe))
        };
        for a in 0..k.rank() {
            k.crop_begin[a] += cb[a];
            k.crop_end[a] += ce[a];
            k.pads_begin[a] += pb[a];
            k.pads_end[a] += pe[a];
        }
    }
    Ok((k, ft))
}

/// Merge one group of branches reading the same tensor into one conv with the geometry of its
/// largest kernel. (`members` of the result is filled by the caller.)
fn merge(cx: &Cx, group: &[&Branch]) -> Result<Merged, Reason> {
    let mut loaded: Vec<Option<(AffineConv, FloatType)>> = Vec::with_capacity(group.len());
    for b in group {
        loaded.push(match b.kind {
            Kind::Conv { conv, through } => Some(
                load(cx, conv, through).map_err(|err| Reason::Conv { conv: cx.node(conv).name().to_string(), err })?,
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
    Ok(Merged { members: vec![], conv: acc, ft, base: bi, kernels, base_pads })
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
    let (p, bft) = read_bn(&cx.consts, n).map_err(|err| Reason::IdentityBn { bn: n.name().to_string(), err })?;
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
    let mut absorbed = HashSet::new();
    for (k, b) in branches.iter().enumerate() {
        if matches!(b.kind, Kind::Identity { bn: None }) && b.scales.is_empty() {
            if let Ok((a, aft)) = cx.consts.f64(&b.leaf) {
                if aft == into.ft {
                    if let Some(v) = channel_vector(&a, into.conv.out_channels(), into.conv.rank()) {
                        into.conv.bias += &v;
                        absorbed.insert(k);
                    }
                }
            }
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

/// The sum of `terms` (in order) written to `out`: the root Sum with new inputs, or a chain of
/// Adds like the root.
fn sum_of(root: &NodeProto, terms: &[(usize, String)], out: &str, names: &mut Names) -> Vec<NodeProto> {
    if is_op(root, "Sum") {
        let mut s = root.clone();
        s.input = terms.iter().map(|t| t.1.clone()).collect();
        return vec![s];
    }
    let mut adds = Vec::new();
    let mut acc = terms[0].1.clone();
    for (j, t) in terms.iter().enumerate().skip(1) {
        let mut a = root.clone();
        let last = j + 1 == terms.len();
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

fn set_pads(n: &mut NodeProto, k: &AffineConv) {
    n.attribute.retain(|a| a.name() != "auto_pad" && a.name() != "pads");
    let mut pads = k.pads_begin.clone();
    pads.extend(&k.pads_end);
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
}
