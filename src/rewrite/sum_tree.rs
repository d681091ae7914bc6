//! Sum trees: linear combinations of branches. A tree is made of `Add` (any nesting, any operand
//! order), `Sum`, `Sub`, `Neg`, and `Mul` / `Div` by a constant around a sub-sum (FastViT's
//! RepMixer `x + γ·(mixer(x) − norm(x))`, EfficientViM's `x + α·(dw(x) − x)`, averaged heads
//! `(a + b) / 2`); its leaves are the branches, each with the constant factors the tree multiplies
//! it by. A Mul or Div by a constant directly around one branch (no sum inside) is not part of the
//! tree: it stays with the branch (the rules read it as the branch's scale). The rules that merge
//! branches start at the root of such a tree.

use super::Cx;
use crate::graph::is_op;
use crate::proto::NodeProto;
use ndarray::{arr0, ArrayD};

/// How a tree node combines its inputs.
enum Lin {
    /// Add, Sum: every input with factor 1.
    Sum,
    /// Sub: input 0 with 1, input 1 with −1.
    Sub,
    /// Neg: −1.
    Neg,
    /// Mul or Div by a constant: input `input` times `factor`.
    Scale { input: usize, factor: ArrayD<f64> },
}

/// Whether `n` adds its inputs (Add broadcasts from opset 7).
pub(crate) fn is_sum(n: &NodeProto, opset: i64) -> bool {
    (is_op(n, "Add") && opset >= 7) || is_op(n, "Sum") || (is_op(n, "Sub") && opset >= 7)
}

/// `n` as a linear node, if it is one.
fn lin(cx: &Cx, n: &NodeProto) -> Option<Lin> {
    if n.output.len() != 1 {
        return None;
    }
    if is_sum(n, cx.opset) {
        return Some(if is_op(n, "Sub") { Lin::Sub } else { Lin::Sum });
    }
    if is_op(n, "Neg") && n.input.len() == 1 {
        return Some(Lin::Neg);
    }
    if (is_op(n, "Mul") || is_op(n, "Div")) && n.input.len() == 2 && cx.opset >= 7 {
        let constant = |k: usize| cx.consts.f64(&n.input[k]).ok().map(|(a, _)| a);
        let (c0, c1) = (constant(0), constant(1));
        return match (c0, c1, is_op(n, "Mul")) {
            (None, Some(c), true) => Some(Lin::Scale { input: 0, factor: c }),
            (Some(c), None, true) => Some(Lin::Scale { input: 1, factor: c }),
            (None, Some(c), false) if c.iter().all(|&v| v != 0.0) => {
                Some(Lin::Scale { input: 0, factor: c.mapv(|v| 1.0 / v) })
            }
            _ => None,
        };
    }
    None
}

/// The inputs of node `i` that belong to its tree, with the factor each is multiplied by.
fn operands(cx: &Cx, i: usize) -> Option<Vec<(String, Option<ArrayD<f64>>)>> {
    let n = cx.node(i);
    Some(match lin(cx, n)? {
        Lin::Sum => n.input.iter().map(|s| (s.clone(), None)).collect(),
        Lin::Sub => vec![(n.input[0].clone(), None), (n.input[1].clone(), Some(arr0(-1.0).into_dyn()))],
        Lin::Neg => vec![(n.input[0].clone(), Some(arr0(-1.0).into_dyn()))],
        Lin::Scale { input, factor } => vec![(n.input[input].clone(), Some(factor))],
    })
}

/// Whether node `i` is a sum, or scales a sub-tree that holds one.
fn has_sum(cx: &Cx, i: usize, depth: usize) -> bool {
    let n = cx.node(i);
    if is_sum(n, cx.opset) && n.output.len() == 1 {
        return true;
    }
    if depth > 64 {
        return false;
    }
    match lin(cx, n) {
        Some(Lin::Neg) | Some(Lin::Scale { .. }) => {
            operands(cx, i).is_some_and(|ops| ops.iter().any(|(t, _)| inner(cx, t, depth + 1).is_some()))
        }
        _ => false,
    }
}

/// The producer of `t` when it is a tree node its reader descends into: read once, not a graph
/// output, linear, with a sum in it.
fn inner(cx: &Cx, t: &str, depth: usize) -> Option<usize> {
    if cx.uses(t) != 1 || cx.ix.outputs.contains(t) {
        return None;
    }
    let p = cx.producer(t)?;
    has_sum(cx, p, depth).then_some(p)
}

/// Whether node `i` is the root of a sum tree: a tree node (with a sum in it) whose output is not
/// part of a larger tree.
pub(crate) fn is_root(cx: &Cx, i: usize) -> bool {
    if !has_sum(cx, i, 0) {
        return false;
    }
    let out = &cx.node(i).output[0];
    if cx.uses(out) == 1 && !cx.ix.outputs.contains(out) {
        if let Some(&c) = cx.ix.consumers_of(out).first() {
            let descends = has_sum(cx, c, 0) && operands(cx, c).is_some_and(|ops| ops.iter().any(|(t, _)| t == out));
            return !descends;
        }
    }
    true
}

/// A branch of a sum tree: the tensor, and the constant factors the tree multiplies it by
/// (innermost first; empty for 1).
pub(crate) struct Leaf {
    pub name: String,
    pub factors: Vec<ArrayD<f64>>,
}

/// The leaves of the tree rooted at `root` (in operand order) and its nodes.
pub(crate) fn leaves(cx: &Cx, root: usize) -> (Vec<Leaf>, Vec<usize>) {
    let (mut leaves, mut internal) = (Vec::new(), Vec::new());
    collect(cx, root, &[], &mut leaves, &mut internal);
    (leaves, internal)
}

fn collect(cx: &Cx, at: usize, outer: &[ArrayD<f64>], leaves: &mut Vec<Leaf>, internal: &mut Vec<usize>) {
    internal.push(at);
    for (t, f) in operands(cx, at).unwrap_or_default() {
        let mut factors: Vec<ArrayD<f64>> = f.into_iter().collect();
        factors.extend(outer.iter().cloned());
        match inner(cx, &t, 0) {
            Some(p) => collect(cx, p, &factors, leaves, internal),
            None => leaves.push(Leaf { name: t, factors }),
        }
    }
}

/// The root of the sum tree that tensor `t` (a branch's output) is a leaf of, if it is one: past
/// the Muls and Divs by constants around the branch alone (its scales), the tree node reading it,
/// then up to the root.
pub(crate) fn root_above(cx: &Cx, t: &str) -> Option<usize> {
    let mut t = t.to_string();
    for _ in 0..=64 {
        if cx.uses(&t) != 1 || cx.ix.outputs.contains(&t) {
            return None;
        }
        let c = *cx.ix.consumers_of(&t).first()?;
        let reads = operands(cx, c).is_some_and(|ops| ops.iter().any(|(o, _)| *o == t));
        if !reads {
            return None;
        }
        if has_sum(cx, c, 0) {
            let mut at = c;
            // a tree node that is not the root is read once, by the node it descends from
            for _ in 0..=64 {
                if is_root(cx, at) {
                    return Some(at);
                }
                at = *cx.ix.consumers_of(&cx.node(at).output[0]).first()?;
            }
            return None;
        }
        // a scale of this branch alone
        t = cx.node(c).output[0].clone();
    }
    None
}
