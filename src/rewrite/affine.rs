//! Per-channel affine maps `t·x + s` that rules fold into a linear layer next to them: a
//! BatchNormalization (inference), or a Mul, Div, Add or Sub of a constant that varies along at
//! most one axis of the tensor it maps (a scalar is the same map on every channel). What the
//! rules share: reading such a constant, where its channels are, and looking through Identity.

use super::Cx;
use crate::graph::{is_default_domain, is_op};
use ndarray::{Array1, ArrayD};

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

/// How many nodes read the values of `t` (not only its shape: Shape, Size), a graph output
/// counting as one.
pub(crate) fn value_reads(cx: &Cx, t: &str) -> usize {
    cx.uses(t) - shape_readers(cx, t).len()
}

/// The nodes that read only the shape of `t` (Shape, Size).
pub(crate) fn shape_readers(cx: &Cx, t: &str) -> Vec<usize> {
    let shape_only = |c: &usize| {
        let n = cx.node(*c);
        (is_op(n, "Shape") || is_op(n, "Size")) && n.input.len() == 1
    };
    cx.ix.consumers_of(t).iter().copied().filter(shape_only).collect()
}

/// Where a constant of shape `c` varies over a tensor of shape `x` it is broadcast with (numpy
/// rules, right-aligned): `Some(Some(axis))` along one axis of `x`, `Some(None)` nowhere (a
/// scalar); `None` when it varies along several axes or would enlarge `x`.
pub(crate) fn channel_axis(c: &[usize], x: &[usize]) -> Option<Option<usize>> {
    if c.len() > x.len() {
        return None;
    }
    let off = x.len() - c.len();
    let mut axis = None;
    for (i, &d) in c.iter().enumerate() {
        if d == 1 {
            continue;
        }
        if d != x[i + off] || axis.is_some() {
            return None;
        }
        axis = Some(i + off);
    }
    Some(axis)
}

/// Whether a constant of shape `c` broadcasts onto `x` without enlarging it.
pub(crate) fn fits_onto(c: &[usize], x: &[usize]) -> bool {
    c.len() <= x.len() && c.iter().zip(&x[x.len() - c.len()..]).all(|(&d, &e)| d == 1 || d == e)
}

/// `v` as `n` values: itself, or its one value repeated.
pub(crate) fn sized(v: &Array1<f64>, n: usize) -> Option<Array1<f64>> {
    match v.len() {
        l if l == n => Some(v.clone()),
        1 => Some(Array1::from_elem(n, v[0])),
        _ => None,
    }
}

/// A Mul, Div, Add or Sub of a constant: `y = t·x + s`, per channel.
#[derive(Clone, Debug)]
pub(crate) struct ConstAffine {
    /// the operand that is not the constant
    pub x: String,
    /// the node's output
    pub y: String,
    /// the axis of `x` the constant varies along (`None`: a scalar)
    pub axis: Option<usize>,
    /// the shape of `x` (and `y`)
    pub shape: Vec<usize>,
    /// scale and shift per channel (one value each for a scalar)
    pub t: Array1<f64>,
    pub s: Array1<f64>,
}

impl ConstAffine {
    /// Whether the map shifts (some s ≠ 0).
    pub fn shifts(&self) -> bool {
        self.s.iter().any(|&v| v != 0.0)
    }
}

/// The operand of node `n` (Mul, Div, Add or Sub with two inputs) that may be the data when the
/// other is a constant, with the other's index, in the order they are tried.
pub(crate) fn data_operands(n: &crate::proto::NodeProto) -> Vec<(usize, usize)> {
    if !is_default_domain(n) || n.input.len() != 2 || n.output.len() != 1 || n.input[0] == n.input[1] {
        return vec![];
    }
    match n.op_type() {
        "Mul" | "Add" | "Sub" => vec![(0, 1), (1, 0)],
        "Div" => vec![(0, 1)],
        _ => vec![],
    }
}

/// Node `i` as a per-channel affine map of its data operand `x` (index `d`; the other, `k`, a
/// constant), at the shapes the model runs at.
pub(crate) fn const_affine(cx: &Cx, i: usize, (d, k): (usize, usize)) -> Option<ConstAffine> {
    let n = cx.node(i);
    if cx.opset < 7 {
        return None; // no broadcasting before opset 7
    }
    let (c, _) = cx.consts.f64(&n.input[k]).ok()?;
    let x = &n.input[d];
    let shape = cx.shape_of(x)?;
    let axis = channel_axis(c.shape(), &shape)?;
    let v: Array1<f64> = c.iter().copied().collect();
    let v = if v.is_empty() { return None } else { v };
    let ones = Array1::from_elem(v.len(), 1.0);
    let zeros = Array1::zeros(v.len());
    let (t, s) = match (n.op_type(), d) {
        ("Mul", _) => (v, zeros),
        ("Div", 0) if v.iter().all(|&c| c != 0.0 && (1.0 / c).is_finite()) => (v.mapv(|c| 1.0 / c), zeros),
        ("Add", _) => (ones, v),
        ("Sub", 0) => (ones, -v),
        ("Sub", 1) => (-ones, v),
        _ => return None,
    };
    Some(ConstAffine { x: x.clone(), y: n.output[0].clone(), axis, shape, t, s })
}

/// `a` (any shape that broadcasts per channel on `axis` of a tensor of rank `rank`, or uniform)
/// as one value per channel of `n`; `None` if it is not.
pub(crate) fn per_channel(a: &ArrayD<f64>, axis: Option<usize>, rank: usize, n: usize) -> Option<Array1<f64>> {
    let s = a.shape();
    if s.len() > rank {
        return None;
    }
    let off = rank - s.len();
    let varying: Vec<usize> = (0..s.len()).filter(|&i| s[i] != 1).map(|i| i + off).collect();
    let v: Array1<f64> = a.iter().copied().collect();
    match (varying.as_slice(), axis) {
        ([], _) => sized(&v, n),
        ([a0], Some(ax)) if *a0 == ax && v.len() == n => Some(v),
        _ => None,
    }
}

/// `v` (one value per channel) shaped to broadcast on `axis` of a tensor of rank `rank`, with at
/// least the rank of `like` (a shape it replaces).
pub(crate) fn channel_shaped(v: Array1<f64>, axis: usize, rank: usize, like: &[usize]) -> ArrayD<f64> {
    let mut shape = vec![1; (rank - axis).max(like.len())];
    let at = shape.len() - (rank - axis);
    shape[at] = v.len();
    v.into_shape_with_order(ndarray::IxDyn(&shape)).expect("one axis of values")
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn a_constant_is_per_channel_on_the_one_axis_it_varies_along() {
        assert_eq!(channel_axis(&[1, 8, 1, 1], &[2, 8, 5, 5]), Some(Some(1)));
        assert_eq!(channel_axis(&[8, 1, 1], &[2, 8, 5, 5]), Some(Some(1)));
        assert_eq!(channel_axis(&[8], &[2, 5, 8]), Some(Some(2)));
        assert_eq!(channel_axis(&[], &[2, 5, 8]), Some(None));
        assert_eq!(channel_axis(&[1, 1], &[2, 5, 8]), Some(None));
        // two axes, a size that differs, a rank that would enlarge the tensor
        assert_eq!(channel_axis(&[5, 8], &[2, 5, 8]), None);
        assert_eq!(channel_axis(&[4], &[2, 5, 8]), None);
        assert_eq!(channel_axis(&[1, 1, 1, 8], &[5, 8]), None);
    }

    #[test]
    fn a_channel_vector_is_shaped_to_broadcast_on_its_axis() {
        let v = Array1::from(vec![1.0, 2.0, 3.0]);
        assert_eq!(channel_shaped(v.clone(), 1, 4, &[]).shape(), &[3, 1, 1]);
        assert_eq!(channel_shaped(v.clone(), 3, 4, &[1, 1, 1, 1]).shape(), &[1, 1, 1, 3]);
        assert_eq!(channel_shaped(v, 2, 3, &[1]).shape(), &[3]);
        let a = ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 1, 1]), vec![1.0, 2.0, 3.0]).unwrap();
        assert_eq!(per_channel(&a, Some(1), 4, 3).unwrap().to_vec(), [1.0, 2.0, 3.0]);
        assert_eq!(per_channel(&a, Some(2), 4, 3), None);
        assert_eq!(per_channel(&ndarray::arr0(2.0).into_dyn(), Some(2), 4, 3).unwrap().to_vec(), [2.0; 3]);
    }
}
