//! Sum trees: an `Add` tree (any nesting, any operand order) or a `Sum`, and its leaves. The
//! rules that merge branches start at the root of such a tree.

use super::Cx;
use crate::graph::is_op;
use crate::proto::NodeProto;

/// Whether `n` adds its inputs (Add broadcasts from opset 7).
pub(crate) fn is_sum(n: &NodeProto, opset: i64) -> bool {
    (is_op(n, "Add") && opset >= 7) || is_op(n, "Sum")
}

/// Whether node `i` is the root of a sum tree: a sum whose output is not the only input of
/// another sum of the tree.
pub(crate) fn is_root(cx: &Cx, i: usize) -> bool {
    let n = cx.node(i);
    if !is_sum(n, cx.opset) || n.output.len() != 1 {
        return false;
    }
    let out = &n.output[0];
    if cx.uses(out) == 1 && !cx.ix.outputs.contains(out) {
        if let Some(&c) = cx.ix.consumers_of(out).first() {
            return !is_sum(cx.node(c), cx.opset);
        }
    }
    true
}

/// The leaves of the sum tree rooted at `root` (in operand order) and its sum nodes.
pub(crate) fn leaves(cx: &Cx, root: usize) -> (Vec<String>, Vec<usize>) {
    let (mut leaves, mut internal) = (Vec::new(), Vec::new());
    collect(cx, root, &mut leaves, &mut internal);
    (leaves, internal)
}

fn collect(cx: &Cx, at: usize, leaves: &mut Vec<String>, internal: &mut Vec<usize>) {
    internal.push(at);
    for inp in &cx.node(at).input {
        match cx.producer(inp) {
            Some(p) if is_sum(cx.node(p), cx.opset) && cx.uses(inp) == 1 => collect(cx, p, leaves, internal),
            _ => leaves.push(inp.clone()),
        }
    }
}
