//! The sum's constants read per channel: constant operands folded into the bias, and the factor a
//! branch left out of the merge keeps.

use super::branch::{Branch, Kind};
use super::{Cx, Merged};
use ndarray::{Array1, ArrayD};
use std::collections::HashSet;

/// The factor a branch left out of the merge is multiplied by in the rewritten sum.
pub(super) enum Coef {
    One,
    MinusOne,
    /// a per-channel (or scalar) constant, shaped to broadcast over the sum
    Scale(ArrayD<f64>),
}

/// Constant operands of the sum that add a per-channel (or scalar) bias, folded into `into`'s
/// bias: which branches they were.
pub(super) fn absorb_constants(cx: &Cx, branches: &[Branch], into: &mut Merged) -> HashSet<usize> {
    let (o, r) = (into.dims[0], into.dims.len() - 2);
    let mut absorbed = HashSet::new();
    for (k, b) in branches.iter().enumerate() {
        if !matches!(b.kind, Kind::Identity { bn: None }) {
            continue;
        }
        let Ok((a, aft)) = cx.consts.f64(&b.leaf) else { continue };
        if aft != into.ft {
            continue;
        }
        let Some(mut v) = channel_vector(&a, o, r) else { continue };
        let mut per_channel = true;
        for f in &b.scales {
            match channel_vector(f, o, r) {
                Some(f) => v = v * f,
                None => per_channel = false,
            }
        }
        if per_channel {
            into.bias += &v;
            absorbed.insert(k);
        }
    }
    absorbed
}

/// A constant that broadcasts per channel (or as a scalar) over a conv output of `o` channels
/// and spatial rank `r`, as one value per channel.
pub(super) fn channel_vector(a: &ArrayD<f64>, o: usize, r: usize) -> Option<Array1<f64>> {
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

/// The factor the sum tree multiplies a branch left out of the merge by, for a conv output of
/// `o` channels and spatial rank `r`; `None` when it is not per channel.
pub(super) fn rest_coef(b: &Branch, o: usize, r: usize) -> Option<Coef> {
    let tree = &b.scales[b.scales.len() - b.tree_factors..];
    if tree.iter().all(|f| f.len() == 1) {
        let v: f64 = tree.iter().map(|f| f.iter().next().copied().unwrap_or(1.0)).product();
        return Some(if v == 1.0 {
            Coef::One
        } else if v == -1.0 {
            Coef::MinusOne
        } else {
            Coef::Scale(ndarray::arr0(v).into_dyn())
        });
    }
    let mut v = Array1::from_elem(o, 1.0);
    for f in tree {
        v = v * channel_vector(f, o, r)?;
    }
    let mut shape = vec![o];
    shape.extend(std::iter::repeat_n(1, r));
    Some(Coef::Scale(v.into_shape_with_order(ndarray::IxDyn(&shape)).ok()?))
}
