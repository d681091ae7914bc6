//! The region: walking back from the sum to the one tensor x every x-dependent operator of the
//! region reads, through operators affine in x with constant parameters.

use super::{Cx, RegionReason};
use crate::graph::{attr_int, attr_ints, is_default_domain, GraphIndex, Label};
use crate::proto::{tensor_proto::DataType, GraphProto, NodeProto};
use std::collections::{HashMap, HashSet};

pub(crate) struct Region {
    pub(super) x: String,
    /// nodes whose values depend on x (removed by the rewrite)
    pub(super) dep: Vec<usize>,
    /// nodes the region needs that do not depend on x (constants, shape arithmetic)
    pub(super) stat: Vec<usize>,
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
        | "Squeeze" | "AveragePool" | "Expand" | "Gather" | "Neg" | "Div" | "Tile" | "MatMul" | "Gemm" => vec![0],
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
pub(super) fn find_region<'g>(
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
