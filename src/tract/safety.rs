//! What tract must not be asked to run: it would write out of bounds or abort on allocation.

use tract_onnx::prelude::*;

/// At most this many elements in any one tensor the check computes (4 GiB of float32).
pub const MAX_TENSOR_ELEMENTS: u128 = 1 << 30;

/// Why tract must not run a typed model: a Pad with negative amounts (tract-onnx casts them to
/// `usize`, and tract then writes out of bounds), or a tensor of more than `limit` elements
/// (a Pad or Resize with absurd sizes, say: an allocation failure aborts the process).
pub(crate) fn unrunnable(m: &TypedModel, limit: u128) -> Option<String> {
    for node in m.nodes() {
        if let Some(pad) = node.op_as::<tract_onnx::tract_core::ops::array::Pad>() {
            if pad.pads.iter().any(|&(a, b)| a.max(b) > isize::MAX as usize) {
                return Some(format!("Pad '{}' has negative amounts, which tract cannot run", node.name));
            }
        }
        for o in &node.outputs {
            let Some(dims) = o.fact.shape.as_concrete() else { continue };
            let n = dims.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
            if n > limit {
                return Some(format!(
                    "'{}' would be a tensor of shape {dims:?} ({n} elements), too big to run (at most {limit})",
                    node.name
                ));
            }
        }
    }
    None
}

/// Why tract must not even be handed `model`: an operator whose constant size inputs make its
/// output hold more than `limit` elements — a Pad by absurd amounts, a Tile, an Expand, a
/// ConstantOfShape or a Resize to absurd sizes. tract evaluates an operator whose inputs are all
/// constant while it types the model, before any size can be checked, and an allocation failure
/// aborts the process. Each bound is a lower bound of the output's size that needs no shape
/// analysis (the product over axes of the growth each amount alone implies).
pub(crate) fn grows_too_big(model: &crate::model::Model, limit: u128) -> Option<String> {
    use crate::graph::{attr, is_default_domain, Label};
    let g = model.graph();
    let ints = |name: &str| -> Option<Vec<i64>> {
        let t = g.initializer.iter().find(|t| t.name() == name).or_else(|| {
            g.node
                .iter()
                .find(|n| n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name))
                .and_then(|n| n.attribute.iter().find(|a| a.name() == "value"))
                .and_then(|a| a.t.as_ref())
        })?;
        let raw = model.raw_bytes(t).ok()?;
        crate::model::tensor::to_i64(t, raw.as_deref()).ok()
    };
    let product = |v: &[i64]| v.iter().fold(1u128, |a, &d| a.saturating_mul(d.max(1) as u128));
    for n in g.node.iter().filter(|n| is_default_domain(n)) {
        let input = |k: usize| n.input.get(k).filter(|s| !s.is_empty()).and_then(|s| ints(s));
        let (what, at_least) = match n.op_type() {
            "Pad" => {
                let pads = input(1).or_else(|| attr(n, "pads").map(|a| a.ints.clone()));
                let Some(p) = pads.filter(|p| p.len() % 2 == 0) else { continue };
                let r = p.len() / 2;
                let grown: Vec<i64> = (0..r).map(|a| p[a].max(0).saturating_add(p[a + r].max(0))).collect();
                ("pads by", product(&grown))
            }
            "Tile" => ("repeats", input(1).map_or(1, |v| product(&v))),
            "Expand" => ("expands to", input(1).map_or(1, |v| product(&v))),
            "ConstantOfShape" => ("makes", input(0).map_or(1, |v| product(&v))),
            "Resize" => ("resizes to", input(3).map_or(1, |v| product(&v))),
            _ => continue,
        };
        if at_least > limit {
            return Some(format!(
                "{} '{}' {what} at least {at_least} elements, too big to run (at most {limit})",
                n.op_type(),
                n.label()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::Builder;

    #[test]
    fn constant_sizes_past_the_limit_are_told_before_tract_sees_them() {
        let build = |op: &str, amounts: &[i64]| {
            let mut b = Builder::new(2, 4, 4);
            let a = b.initializer_i64("amounts", amounts);
            let y = match op {
                "ConstantOfShape" => b.node(op, "big", &[&a], &[], vec![]),
                _ => b.node(op, "big", &["x", &a], &[], vec![]),
            };
            b.output(&y);
            crate::model::Model::from_proto(b.build().proto).unwrap()
        };
        let limit = 1u128 << 20;
        for (op, amounts) in [
            ("Pad", vec![0, 0, 1 << 11, 1 << 10, 0, 0, 0, 0]),
            ("Tile", vec![1, 1, 1 << 11, 1 << 10]),
            ("Expand", vec![1, 2, 1 << 20, 4]),
            ("ConstantOfShape", vec![1 << 21]),
        ] {
            let why = grows_too_big(&build(op, &amounts), limit).unwrap_or_else(|| panic!("{op} not told"));
            assert!(
                why.starts_with(&format!("{op} 'big'")) && why.ends_with("too big to run (at most 1048576)"),
                "{why}"
            );
        }
        // within the limit, and negative pads (a crop) do not grow anything
        assert_eq!(grows_too_big(&build("Pad", &[0, 0, 4, 4, 0, 0, 4, 4]), limit), None);
        assert_eq!(grows_too_big(&build("Pad", &[0, 0, -1 << 40, 0, 0, 0, 0, 0]), limit), None);
        assert_eq!(grows_too_big(&build("Expand", &[1, 2, 4, 4]), limit), None);
    }
}
