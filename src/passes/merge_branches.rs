//! A sum of branches of one input tensor becomes one Conv.
//!
//! Pattern: an Add tree (any nesting and operand order) or a Sum, whose leaves are branches.
//! Leaves are grouped by the tensor they read; each branch is Conv(x), Conv(Slice(x)) (ACNet's
//! crop), Conv(Pad(x)) with zero padding, BatchNormalization(x) (RepVGG's identity) or x itself.
//! Check: every branch of a group fits, at a whole tap offset, inside the largest kernel with
//! the same output size (see [`AffineConv::offset_in`]). Rewrite: one Conv with the largest
//! branch's geometry writes the group's sum; what else the sum added stays an Add.

use super::common::{graph, is_op, kernel_str, param_names, read_bn, read_conv, read_pad, read_slice, rewired_conv, fresh_name, const_f64};
use super::{Ctx, Outcome, Patch, Refusal, Rewrite};
use crate::graph::{default_opset, GraphIndex};
use crate::io::Model;
use crate::kernel::AffineConv;
use crate::proto::{AttributeProto, NodeProto};
use crate::tensor::FloatType;
use std::collections::HashSet;

const RULE: &str = "merge_branches";

fn is_sum(n: &NodeProto, opset: i64) -> bool {
    (is_op(n, "Add") && opset >= 7) || is_op(n, "Sum")
}

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
    scales: Vec<ndarray::ArrayD<f64>>,
}

/// Collect the leaves of the sum tree rooted at `root`; internal sum nodes into `internal`.
fn leaves(m: &Model, ix: &GraphIndex, root: usize, opset: i64, internal: &mut Vec<usize>, out: &mut Vec<String>) {
    let g = graph(m);
    internal.push(root);
    for inp in &g.node[root].input {
        match ix.producer.get(inp) {
            Some(&(p, _)) if is_sum(&g.node[p], opset) && ix.uses(inp) == 1 => leaves(m, ix, p, opset, internal, out),
            _ => out.push(inp.clone()),
        }
    }
}

/// A Mul of `t` by a constant: (the other operand, the constant).
fn mul_by_const(m: &Model, ix: &GraphIndex, ctx: &Ctx, n: &NodeProto) -> Option<(String, ndarray::ArrayD<f64>)> {
    if !is_op(n, "Mul") || n.input.len() != 2 {
        return None;
    }
    for (k, other) in [(1, 0), (0, 1)] {
        if let Ok((a, _)) = const_f64(m, ix, ctx, &n.input[k]) {
            if ix.constant(graph(m), &n.input[other]).is_none() {
                return Some((n.input[other].clone(), a));
            }
        }
    }
    None
}

fn classify(m: &Model, ix: &GraphIndex, ctx: &Ctx, leaf: &str) -> Branch {
    let g = graph(m);
    // peel constant scales (RepOpt-style branch multipliers), outermost first
    let mut scales = Vec::new();
    let mut nodes = Vec::new();
    let mut cur = leaf.to_string();
    while let Some(&(p, _)) = ix.producer.get(&cur) {
        if ix.uses(&cur) != 1 {
            break;
        }
        match mul_by_const(m, ix, ctx, &g.node[p]) {
            Some((inner, a)) => {
                scales.push(a);
                nodes.push(p);
                cur = inner;
            }
            None => break,
        }
    }
    scales.reverse();
    let identity = |source: &str, nodes: Vec<usize>, scales: Vec<ndarray::ArrayD<f64>>| Branch {
        leaf: leaf.to_string(),
        source: source.to_string(),
        kind: Kind::Identity { bn: None },
        nodes,
        scales,
    };
    let Some(&(p, _)) = ix.producer.get(&cur) else { return identity(&cur, nodes, scales) };
    let n = &g.node[p];
    if ix.uses(&cur) != 1 {
        return identity(&cur, nodes, scales);
    }
    if is_op(n, "BatchNormalization") {
        nodes.push(p);
        return Branch {
            leaf: leaf.into(),
            source: n.input[0].clone(),
            kind: Kind::Identity { bn: Some(p) },
            nodes,
            scales,
        };
    }
    if !is_op(n, "Conv") {
        return identity(&cur, nodes, scales);
    }
    nodes.push(p);
    let mut source = n.input[0].clone();
    let mut through = None;
    // look through one Slice (crop) or Pad that only this branch reads
    if let Some(&(q, _)) = ix.producer.get(&source) {
        let pn = &g.node[q];
        if (is_op(pn, "Slice") || is_op(pn, "Pad")) && ix.uses(&source) == 1 {
            through = Some(q);
            nodes.push(q);
            source = pn.input[0].clone();
        }
    }
    Branch { leaf: leaf.into(), source, kind: Kind::Conv { conv: p, through }, nodes, scales }
}

/// A Conv branch's geometry and weights (the crop or padding it reads through included), or
/// why they cannot be read. Weights are decoded only here, for a group that is being merged.
fn load(m: &Model, ix: &GraphIndex, ctx: &Ctx, conv: usize, through: Option<usize>) -> Result<(AffineConv, FloatType), String> {
    let g = graph(m);
    let (mut k, ft) = read_conv(m, ix, ctx, &g.node[conv])?;
    if let Some(q) = through {
        let pn = &g.node[q];
        let rank = k.rank() + 2;
        let (cb, ce, pb, pe) = if is_op(pn, "Slice") {
            read_slice(m, ix, pn, rank).map(|(cb, ce)| (cb, ce, vec![0; rank - 2], vec![0; rank - 2]))?
        } else {
            read_pad(m, ix, ctx, pn, rank).map(|(pb, pe)| {
                let neg = |v: &Vec<i64>| v.iter().map(|&x| (-x).max(0)).collect::<Vec<_>>();
                let pos = |v: &Vec<i64>| v.iter().map(|&x| x.max(0)).collect::<Vec<_>>();
                (neg(&pb), neg(&pe), pos(&pb), pos(&pe))
            })?
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

/// A merged group.
struct Merged {
    conv: AffineConv,
    ft: FloatType,
    /// index (into the group) of the branch whose geometry and node the merged conv takes
    base: usize,
    /// per branch of the group, its kernel size (Conv branches)
    kernels: Vec<Option<Vec<usize>>>,
    /// the base branch's own padding
    base_pads: (Vec<i64>, Vec<i64>),
}

/// Merge one group of branches reading the same tensor into one conv with the geometry of its
/// largest kernel.
fn merge(m: &Model, ix: &GraphIndex, ctx: &Ctx, group: &[&Branch]) -> Result<Merged, String> {
    let g = graph(m);
    let mut loaded: Vec<Option<(AffineConv, FloatType)>> = Vec::with_capacity(group.len());
    for b in group {
        loaded.push(match b.kind {
            Kind::Conv { conv, through } => Some(load(m, ix, ctx, conv, through).map_err(|e| format!("Conv '{}': {e}", g.node[conv].name()))?),
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
    let bi = base.ok_or("no Conv among the branches")?;
    let (big, ft) = loaded[bi].as_ref().unwrap();
    let ft = *ft;
    if big.crop_begin.iter().chain(&big.crop_end).any(|&c| c != 0) {
        return Err(format!(
            "the largest kernel (Conv '{}') reads a cropped input (crop {:?}/{:?})",
            group[bi].leaf, big.crop_begin, big.crop_end
        ));
    }
    let kernels = loaded.iter().map(|l| l.as_ref().map(|(c, _)| c.kernel().to_vec())).collect();
    let base_pads = (big.pads_begin.clone(), big.pads_end.clone());
    // the sum: the base, plus every other branch in order
    let mut acc = loaded[bi].take().unwrap().0;
    scale(&mut acc, group[bi])?;
    for (j, (b, l)) in group.iter().zip(loaded.iter_mut()).enumerate() {
        if j == bi {
            continue;
        }
        let (mut k, kft) = match (l.take(), &b.kind) {
            (Some(v), _) => v,
            (None, Kind::Identity { bn }) => {
                if acc.out_channels() != acc.in_channels() {
                    return Err(format!(
                        "identity branch '{}' but the Conv maps {} to {} channels",
                        b.leaf,
                        acc.in_channels(),
                        acc.out_channels()
                    ));
                }
                let mut id = AffineConv::identity(acc.out_channels(), acc.groups, acc.rank());
                let mut ft_b = ft;
                if let Some(bn) = bn {
                    let (p, bft) = read_bn(m, ix, ctx, &g.node[*bn]).map_err(|e| format!("{e} ('{}')", g.node[*bn].name()))?;
                    if p.scale.len() != acc.out_channels() {
                        return Err(format!("identity BatchNormalization of {} channels", p.scale.len()));
                    }
                    id.fold_bn(&p);
                    ft_b = bft;
                }
                (id, ft_b)
            }
            (None, Kind::Conv { .. }) => unreachable!("every Conv branch was loaded"),
        };
        if kft != ft {
            return Err("branches of different dtypes".into());
        }
        scale(&mut k, b)?;
        let offs = k.offset_in(&acc).map_err(|e| format!("branch '{}': {e}", b.leaf))?;
        acc.add_at(&k, &offs);
    }
    Ok(Merged { conv: acc, ft, base: bi, kernels, base_pads })
}

/// Apply a branch's constant per-channel factors to its kernel.
fn scale(k: &mut AffineConv, b: &Branch) -> Result<(), String> {
    for sc in &b.scales {
        let a = channel_bias(sc, k.out_channels(), k.rank())
            .ok_or_else(|| format!("branch '{}' is multiplied by a constant of shape {:?}, not per channel", b.leaf, sc.shape()))?;
        k.then_affine(&a, &ndarray::Array1::zeros(a.len()));
    }
    Ok(())
}

/// A constant operand that adds a per-channel (or scalar) bias to a conv output of `o` channels
/// and spatial rank `r`.
fn channel_bias(a: &ndarray::ArrayD<f64>, o: usize, r: usize) -> Option<ndarray::Array1<f64>> {
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
        1 => Some(ndarray::Array1::from_elem(o, flat[0])),
        c if c == o => Some(ndarray::Array1::from(flat)),
        _ => None,
    }
}

fn set_pads(n: &mut NodeProto, k: &AffineConv) {
    n.attribute.retain(|a| a.name() != "auto_pad" && a.name() != "pads");
    let mut pads = k.pads_begin.clone();
    pads.extend(&k.pads_end);
    n.attribute.push(AttributeProto {
        name: Some("pads".into()),
        ints: pads,
        r#type: Some(crate::proto::attribute_proto::AttributeType::Ints as i32),
        ..Default::default()
    });
}

pub fn rule(m: &Model, ix: &GraphIndex, ctx: &Ctx, i: usize) -> Option<Outcome> {
    let g = graph(m);
    let opset = default_opset(&m.proto);
    let root = &g.node[i];
    if !is_sum(root, opset) || root.output.len() != 1 {
        return None;
    }
    // only at the root of a sum tree
    let out = &root.output[0];
    if ix.uses(out) == 1 && !ix.outputs.contains(out) {
        if let Some(&c) = ix.consumers_of(out).first() {
            if is_sum(&g.node[c], opset) {
                return None;
            }
        }
    }
    let mut internal = Vec::new();
    let mut leaf_names = Vec::new();
    leaves(m, ix, i, opset, &mut internal, &mut leaf_names);
    let branches: Vec<Branch> = leaf_names.iter().map(|l| classify(m, ix, ctx, l)).collect();

    // group by source, in order of first appearance
    let mut sources: Vec<&str> = Vec::new();
    for b in &branches {
        if !sources.contains(&b.source.as_str()) {
            sources.push(&b.source);
        }
    }
    let mut outcome = Outcome::default();
    let refuse = |reason: String| Refusal { rule: RULE, node: root.name().to_string(), reason };
    struct Done {
        members: Vec<usize>,
        merged: Merged,
    }
    let mut done: Vec<Done> = Vec::new();
    for s in &sources {
        let members: Vec<usize> = (0..branches.len()).filter(|&k| branches[k].source == *s).collect();
        let n_conv = members.iter().filter(|&&k| matches!(branches[k].kind, Kind::Conv { .. })).count();
        // a Conv on this source whose output is read elsewhere too
        let leaked = branches.iter().find_map(|b| {
            let (p, _) = ix.producer.get(&b.leaf)?;
            let n = &g.node[*p];
            let n = if is_op(n, "BatchNormalization") { ix.producer_node(g, n.input.first()?)? } else { n };
            if !is_op(n, "Conv") {
                return None;
            }
            let x = n.input.first()?;
            let reads = ix.producer_node(g, x).filter(|q| is_op(q, "Slice") || is_op(q, "Pad")).and_then(|q| q.input.first()).unwrap_or(x);
            (is_op(n, "Conv") && matches!(b.kind, Kind::Identity { .. }) && reads == s && ix.uses(&b.leaf) > 1).then(|| n.name().to_string())
        });
        if leaked.is_none() && (n_conv == 0 || members.len() < 2) {
            continue;
        }
        if let Some(c) = leaked {
            outcome.refusals.push(refuse(format!("output of Conv '{c}' is also used outside the block")));
            continue;
        }
        if members.len() < 2 {
            continue;
        }
        let group: Vec<&Branch> = members.iter().map(|&k| &branches[k]).collect();
        match merge(m, ix, ctx, &group) {
            Ok(merged) => done.push(Done { members, merged }),
            Err(e) => outcome.refusals.push(refuse(e)),
        }
    }
    if done.is_empty() {
        return Some(outcome);
    }

    // constant operands fold into the first merged conv's bias
    let mut absorbed: HashSet<usize> = HashSet::new();
    for (k, b) in branches.iter().enumerate() {
        if matches!(b.kind, Kind::Identity { bn: None }) && b.scales.is_empty() {
            if let Ok((a, aft)) = const_f64(m, ix, ctx, &b.leaf) {
                let d = &mut done[0].merged;
                if aft == d.ft {
                    if let Some(v) = channel_bias(&a, d.conv.out_channels(), d.conv.rank()) {
                        d.conv.bias += &v;
                        absorbed.insert(k);
                    }
                }
            }
        }
    }

    // rebuild: merged convs + whatever else the sum added
    let in_group: HashSet<usize> = done.iter().flat_map(|d| d.members.iter().copied()).collect();
    let rest: Vec<usize> = (0..branches.len()).filter(|k| !in_group.contains(k) && !absorbed.contains(k)).collect();
    let n_terms = done.len() + rest.len();
    let mut taken = HashSet::new();
    let mut insert = Vec::new();
    let mut inits = Vec::new();
    let mut remove: Vec<usize> = internal.clone();
    let mut terms: Vec<(usize, String)> = Vec::new();
    let mut details = Vec::new();
    for Done { members, merged } in done {
        let base = members[merged.base];
        let Kind::Conv { conv: ci, .. } = branches[base].kind else { unreachable!() };
        let cnode = &g.node[ci];
        let output = if n_terms == 1 { out.clone() } else { cnode.output[0].clone() };
        let (wname, bname) = param_names(g, ix, cnode);
        let (wname, bname) = if inits.iter().any(|(n, _, _): &(String, _, _)| n == &wname || n == &bname) {
            (fresh_name(g, &mut taken, &format!("{wname}_m")), fresh_name(g, &mut taken, &format!("{bname}_m")))
        } else {
            (wname, bname)
        };
        let mut node = rewired_conv(cnode, &branches[base].source, &wname, &bname, &output);
        let conv = merged.conv;
        if merged.base_pads != (conv.pads_begin.clone(), conv.pads_end.clone()) || branches[base].nodes.len() > 1 {
            set_pads(&mut node, &conv);
        }
        insert.push(node);
        let merged_kernel = kernel_str(conv.kernel());
        inits.push((wname, conv.weight, merged.ft));
        inits.push((bname, conv.bias.into_dyn(), merged.ft));
        for &k in &members {
            remove.extend(&branches[k].nodes);
        }
        terms.push((*members.iter().min().unwrap(), output));
        let mut kernels: Vec<String> = members
            .iter()
            .zip(&merged.kernels)
            .map(|(&k, kernel)| {
                let name = match &branches[k].kind {
                    Kind::Conv { .. } => kernel_str(kernel.as_ref().unwrap()),
                    Kind::Identity { bn: Some(_) } => "identity+BN".into(),
                    Kind::Identity { bn: None } => "identity".into(),
                };
                if branches[k].scales.is_empty() { name } else { format!("{name}*scale") }
            })
            .collect();
        kernels.dedup();
        details.push(format!("{} branches ({}) into Conv '{}' {}", members.len(), kernels.join(", "), cnode.name(), merged_kernel));
    }
    if !absorbed.is_empty() {
        details.push(format!("{} constant(s) into the bias", absorbed.len()));
    }
    for &k in &rest {
        terms.push((k, branches[k].leaf.clone()));
    }
    terms.sort_by_key(|t| t.0);
    if n_terms > 1 {
        if is_op(root, "Sum") {
            let mut s = root.clone();
            s.input = terms.iter().map(|t| t.1.clone()).collect();
            insert.push(s);
        } else {
            let mut acc = terms[0].1.clone();
            for (j, t) in terms.iter().enumerate().skip(1) {
                let mut a = root.clone();
                let last = j + 1 == terms.len();
                let o = if last { out.clone() } else { fresh_name(g, &mut taken, &format!("{out}_part{j}")) };
                if !last {
                    a.name = Some(fresh_name(g, &mut taken, &format!("{}_part{j}", root.name())));
                }
                a.input = vec![acc, t.1.clone()];
                a.output = vec![o.clone()];
                insert.push(a);
                acc = o;
            }
        }
    }
    remove.sort_unstable();
    remove.dedup();
    let node_name = insert[0].name().to_string();
    outcome.patch = Some(Patch {
        at: i,
        remove,
        insert,
        initializers: inits,
        log: Rewrite { rule: RULE, node: node_name, detail: details.join("; ") },
    });
    Some(outcome)
}

