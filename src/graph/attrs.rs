//! Operators as the rules read them: attributes with their defaults, the default domain and
//! opset, and the inputs each operator's schema requires at an opset.

use super::Label;
use crate::error::{Error, Result};
use crate::proto::{AttributeProto, GraphProto, ModelProto, NodeProto};

/// Inputs an operator must have (present and named) and may have, at an opset; `None` for
/// operators this crate does not read. Only the operators the rules look into are listed: a node
/// of one of them with too few inputs is not a valid model, and is refused as such on load.
fn arity(op: &str, opset: i64) -> Option<(usize, usize)> {
    Some(match op {
        "Conv" | "ConvTranspose" | "Gemm" => (2, 3),
        "MatMul" => (2, 2),
        "BatchNormalization" => (5, 5),
        "Add" | "Sub" | "Mul" | "Div" => (2, 2),
        "Sum" => (1, usize::MAX),
        "Slice" if opset >= 10 => (3, 5),
        "Pad" if opset >= 11 => (2, 4),
        "Reshape" if opset >= 5 => (2, 2),
        "Unsqueeze" if opset >= 13 => (2, 2),
        "Squeeze" if opset >= 13 => (1, 2),
        "Slice" | "Pad" | "Reshape" | "Unsqueeze" | "Squeeze" | "Identity" | "Relu" | "Cast" => (1, 1),
        "Constant" => (0, 0),
        _ => return None,
    })
}

/// Check the nodes of the operators the rules read have the inputs their schema requires (at
/// the model's opset) and a named first output, and that every Transpose's perm is a permutation.
pub fn check_arity(g: &GraphProto, opset: i64) -> Result<()> {
    let gname = g.name.as_deref().filter(|n| !n.is_empty()).unwrap_or("graph");
    for n in g.node.iter().filter(|n| is_default_domain(n)) {
        let bad = |msg: String| Err(Error::Invalid(format!("{gname}: node '{}' ({}) {msg}", n.label(), n.op_type())));
        // (tract's Transpose loops for ever, allocating, on a perm that is not a permutation)
        if n.op_type() == "Transpose" {
            if let Some(perm) = attr_ints(n, "perm") {
                let mut seen = vec![false; perm.len()];
                let ok = perm.iter().all(|&p| {
                    usize::try_from(p)
                        .ok()
                        .filter(|&p| p < seen.len())
                        .is_some_and(|p| !std::mem::replace(&mut seen[p], true))
                });
                if !ok {
                    return bad(format!("has perm {perm:?}, which is not a permutation of its axes"));
                }
            }
        }
        let Some((min, max)) = arity(n.op_type(), opset) else { continue };
        let given = n.input.iter().rposition(|i| !i.is_empty()).map_or(0, |p| p + 1);
        if given < min || given > max {
            let want = if min == max {
                format!("{min}")
            } else if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min} to {max}")
            };
            return bad(format!("has {given} input(s); at opset {opset} it takes {want}"));
        }
        if let Some(k) = n.input.iter().take(min).position(|i| i.is_empty()) {
            return bad(format!("has no input {k}, which it requires"));
        }
        if n.output.first().is_none_or(|o| o.is_empty()) {
            return bad("has no output".into());
        }
    }
    Ok(())
}

pub fn is_default_domain(n: &NodeProto) -> bool {
    matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

/// The opset version of the default domain.
pub fn default_opset(m: &ModelProto) -> i64 {
    m.opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(1)
}

pub fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name() == name)
}

pub fn attr_int(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).and_then(|a| a.i).unwrap_or(default)
}

pub fn attr_float(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).and_then(|a| a.f).unwrap_or(default)
}

pub fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

pub fn attr_string(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Whether `n` is the default-domain operator `op`.
pub fn is_op(n: &NodeProto, op: &str) -> bool {
    n.op_type() == op && is_default_domain(n)
}
