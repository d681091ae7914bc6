//! What the rules that fold an affine map into a layer share: looking through Identity.

use super::Cx;
use crate::graph::{is_default_domain, is_op};

/// The node that writes `t`, looking through Identity nodes, and the tensors from that node's
/// output to `t` (its output first, `t` last).
pub(crate) fn producer_through_identity(cx: &Cx, t: &str) -> Option<(usize, Vec<String>)> {
    let mut path = vec![t.to_string()];
    let mut p = cx.producer(t)?;
    for _ in 0..64 {
        let n = cx.node(p);
        if !(is_op(n, "Identity") && is_default_domain(n) && n.input.len() == 1) {
            path.reverse();
            return Some((p, path));
        }
        path.push(n.input[0].clone());
        p = cx.producer(&n.input[0])?;
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::support::{Builder, ConvAttrs};

    #[test]
    fn a_bn_after_an_identity_folds_into_the_conv_before_it() {
        // paddle2onnx: Conv → Add(bias) → Identity → BatchNormalization
        let mut b = Builder::new(3, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 4, 3, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
        let bias = b.rand(&[1, 4, 1, 1]);
        let bias = b.initializer("bias", &bias);
        let y = b.node("Add", "add", &[&y, &bias], &[], vec![]);
        let y = b.node("Identity", "id", &[&y], &[], vec![]);
        let (y, _) = b.bn("bn", &y, 4, None);
        let y = b.node("Relu", "relu", &[&y], &["y"], vec![]);
        b.output(&y);
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Conv", "Relu"]);
        let x = crate::support::rand_input(3, &[1, 3, 5, 5]);
        let want = crate::support::run_f32(&original, std::slice::from_ref(&x));
        crate::support::assert_close(&crate::support::run_f32(&m, &[x]), &want, 1e-5, "folded vs original");
    }

    #[test]
    fn a_bn_after_an_identity_read_elsewhere_stays() {
        let mut b = Builder::new(3, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 4, 3, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
        let y = b.node("Identity", "id", &[&y], &[], vec![]);
        let (z, _) = b.bn("bn", &y, 4, None);
        b.output(&z);
        b.output(&y);
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        let refused: Vec<String> = report.refused.iter().map(|r| format!("{}: {}", r.rule, r.reason)).collect();
        assert_eq!(refused, ["fold_bn: output of Conv 'conv' is also used outside the block"]);
    }
}
