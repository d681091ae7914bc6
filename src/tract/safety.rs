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
