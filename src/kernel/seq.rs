//! Two convolutions in sequence as one: `next(self(x))`, composed in f64.
//!
//! Per spatial axis, output y of `next` reads its input at `y·s2 − P2 + k2·d2`, which `self`
//! computes from x at `(y·s2 + k2·d2)·s1 − P1 + k1·d1` (with P2 = 0): one convolution of stride
//! `s1·s2`, padding P1, whose taps sit at `k1·d1 + k2·d2·s1` (dilation the gcd of `d1` and
//! `d2·s1`). Its kernel is `Σ W2[k2]·W1[k1]` at each tap (per group when both have the same groups,
//! dense otherwise), its bias `b2 + Σ W2·b1`. Both produce the same output size for every input
//! size: the composite's span is the chain's.
//!
//! `next` may zero-pad its input only where that equals padding x: `self` must be a one-tap
//! kernel on that axis (its output at a padded position reads only padding) and have no bias
//! (else that position holds the bias, not zero); then the padding moves onto `self` as `s1·P2`.

use super::AffineConv;
use ndarray::{s, Array1, Array2, ArrayD, Axis, IxDyn};
use std::fmt;

/// Why two convolutions in sequence do not compose into one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqMisfit {
    Rank(usize, usize),
    /// The second reads this many channels, the first writes that many.
    Channels(usize, usize),
    /// The second zero-pads the first's output, which has a bias there.
    PaddedBias {
        axis: usize,
    },
    /// The second zero-pads the first's output on an axis where the first's kernel is longer than
    /// one tap (its window at a padded position overlaps the input).
    PaddedWindow {
        axis: usize,
        kernel: usize,
    },
    /// The first crops its input.
    Crop,
}

impl fmt::Display for SeqMisfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SeqMisfit::Rank(a, b) => write!(f, "{a}-d and {b}-d convolutions"),
            SeqMisfit::Channels(a, b) => write!(f, "the second reads {a} channels, the first writes {b}"),
            SeqMisfit::PaddedBias { axis } => write!(
                f,
                "the second zero-pads (axis {axis}) the first's output, which carries a bias: the border would hold the bias, not zero"
            ),
            SeqMisfit::PaddedWindow { axis, kernel } => write!(
                f,
                "the second zero-pads (axis {axis}) the output of the first's {kernel}-tap kernel: the border is not the first applied to zeros"
            ),
            SeqMisfit::Crop => f.write_str("the first crops its input"),
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl AffineConv {
    /// The same convolution with groups 1 (zero blocks off the diagonal).
    pub fn dense(&self) -> AffineConv {
        if self.groups == 1 {
            return self.clone();
        }
        let (o, cg) = (self.out_channels(), self.weight.shape()[1]);
        let og = o / self.groups;
        let mut shape = self.weight.shape().to_vec();
        shape[1] = cg * self.groups;
        let mut w = ArrayD::zeros(IxDyn(&shape));
        for oc in 0..o {
            let g0 = (oc / og) * cg;
            w.index_axis_mut(Axis(0), oc)
                .slice_axis_mut(Axis(0), (g0..g0 + cg).into())
                .assign(&self.weight.index_axis(Axis(0), oc));
        }
        AffineConv { weight: w, groups: 1, ..self.clone() }
    }

    /// The convolution `next(self(x))`, or why it is not one.
    pub fn then_conv(&self, next: &AffineConv) -> Result<AffineConv, SeqMisfit> {
        let r = self.rank();
        if next.rank() != r {
            return Err(SeqMisfit::Rank(r, next.rank()));
        }
        if next.in_channels() != self.out_channels() {
            return Err(SeqMisfit::Channels(next.in_channels(), self.out_channels()));
        }
        if self.crop_begin.iter().chain(&self.crop_end).chain(&next.crop_begin).chain(&next.crop_end).any(|&c| c != 0) {
            return Err(SeqMisfit::Crop);
        }
        let (mut first, mut second) = (self.clone(), next.clone());
        // the second's padding, moved onto the first where that is the same function
        for a in 0..r {
            let (pb, pe) = (second.pads_begin[a], second.pads_end[a]);
            if pb == 0 && pe == 0 {
                continue;
            }
            if first.kernel()[a] != 1 {
                return Err(SeqMisfit::PaddedWindow { axis: a, kernel: first.kernel()[a] });
            }
            if first.bias.iter().any(|&b| b != 0.0) {
                return Err(SeqMisfit::PaddedBias { axis: a });
            }
            let s1 = first.strides[a] as i64;
            first.pads_begin[a] += s1 * pb;
            first.pads_end[a] += s1 * pe;
            second.pads_begin[a] = 0;
            second.pads_end[a] = 0;
        }
        if first.groups != second.groups {
            first = first.dense();
            second = second.dense();
        }
        let g = first.groups;
        // geometry per axis: taps of the first at k1·d1, of the second at k2·d2·s1
        let (k1, k2) = (first.kernel().to_vec(), second.kernel().to_vec());
        let mut dil = vec![1usize; r];
        let mut kernel = vec![1usize; r];
        for a in 0..r {
            let step1 = if k1[a] > 1 { first.dilations[a] } else { 0 };
            let step2 = if k2[a] > 1 { second.dilations[a] * first.strides[a] } else { 0 };
            let d = gcd(step1, step2).max(1);
            dil[a] = d;
            kernel[a] = (step1 * (k1[a] - 1) + step2 * (k2[a] - 1)) / d + 1;
        }
        let tap = |a: usize, i1: usize, i2: usize| -> usize {
            (i1 * first.dilations[a] + i2 * second.dilations[a] * first.strides[a]) / dil[a]
        };
        let (o1, o2, c) = (first.out_channels(), second.out_channels(), first.in_channels());
        let (o1g, o2g, cg) = (o1 / g, o2 / g, c / g);
        let n1: usize = k1.iter().product();
        let n2: usize = k2.iter().product();
        let n: usize = kernel.iter().product();
        let unflat = |mut t: usize, k: &[usize]| -> Vec<usize> {
            let mut v = vec![0; k.len()];
            for a in (0..k.len()).rev() {
                v[a] = t % k[a];
                t /= k[a];
            }
            v
        };
        // where tap pair (t1, t2) lands in the composite kernel (flat)
        let mut land = vec![0usize; n1 * n2];
        for t1 in 0..n1 {
            let i1 = unflat(t1, &k1);
            for t2 in 0..n2 {
                let i2 = unflat(t2, &k2);
                let mut at = 0;
                for a in 0..r {
                    at = at * kernel[a] + tap(a, i1[a], i2[a]);
                }
                land[t1 * n2 + t2] = at;
            }
        }
        let w1 =
            first.weight.as_standard_layout().into_owned().into_shape_with_order((o1, cg, n1)).expect("conv weight");
        let w2 =
            second.weight.as_standard_layout().into_owned().into_shape_with_order((o2, o1g, n2)).expect("conv weight");
        let mut w = ndarray::Array3::<f64>::zeros((o2, cg, n));
        let mut bias = second.bias.clone();
        for gi in 0..g {
            let a1 = w1.slice(s![gi * o1g..(gi + 1) * o1g, .., ..]);
            let a2 = w2.slice(s![gi * o2g..(gi + 1) * o2g, .., ..]);
            let b1 = first.bias.slice(s![gi * o1g..(gi + 1) * o1g]);
            for t2 in 0..n2 {
                let m2: Array2<f64> = a2.slice(s![.., .., t2]).to_owned();
                let add: Array1<f64> = m2.dot(&b1);
                let mut bg = bias.slice_mut(s![gi * o2g..(gi + 1) * o2g]);
                bg += &add;
                for t1 in 0..n1 {
                    let m1: Array2<f64> = a1.slice(s![.., .., t1]).to_owned();
                    let prod = m2.dot(&m1);
                    let mut dst = w.slice_mut(s![gi * o2g..(gi + 1) * o2g, .., land[t1 * n2 + t2]]);
                    dst += &prod;
                }
            }
        }
        let mut shape = vec![o2, cg];
        shape.extend(&kernel);
        let weight = w.into_shape_with_order(IxDyn(&shape)).expect("composite kernel");
        let strides: Vec<usize> = (0..r).map(|a| first.strides[a] * second.strides[a]).collect();
        Ok(AffineConv::new(weight, Some(bias), g, strides, dil, first.pads_begin, first.pads_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[allow(clippy::too_many_arguments)]
    fn conv(
        rng: &mut StdRng,
        o: usize,
        c: usize,
        k: &[usize],
        g: usize,
        s: &[usize],
        d: &[usize],
        pb: &[i64],
        pe: &[i64],
        bias: bool,
    ) -> AffineConv {
        let mut shape = vec![o, c / g];
        shape.extend(k);
        let w = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.random_range(-1.0..1.0));
        let b = bias.then(|| Array1::from_shape_fn(o, |_| rng.random_range(-1.0..1.0)));
        AffineConv::new(w, b, g, s.to_vec(), d.to_vec(), pb.to_vec(), pe.to_vec())
    }

    fn agrees(a: &AffineConv, b: &AffineConv, input: &[usize]) {
        let mut rng = StdRng::seed_from_u64(9);
        let x = ArrayD::from_shape_fn(IxDyn(input), |_| rng.random_range(-1.0..1.0));
        let want = b.apply(&a.apply(&x));
        let got = a.then_conv(b).expect("composes").apply(&x);
        assert_eq!(got.shape(), want.shape());
        let d = got.iter().zip(want.iter()).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(d < 1e-12, "max diff {d}");
    }

    #[test]
    fn expand_then_kxk_then_squeeze_compose() {
        let mut rng = StdRng::seed_from_u64(1);
        // 1x1 (pads 1) → 3x3 stride 2 → 1x1, biases everywhere
        let a = conv(&mut rng, 6, 3, &[1, 1], 1, &[1, 1], &[1, 1], &[1, 1], &[1, 1], true);
        let b = conv(&mut rng, 6, 6, &[3, 3], 1, &[2, 2], &[1, 1], &[0, 0], &[0, 0], true);
        let c = conv(&mut rng, 4, 6, &[1, 1], 1, &[1, 1], &[1, 1], &[0, 0], &[0, 0], true);
        agrees(&a, &b, &[1, 3, 7, 8]);
        agrees(&a.then_conv(&b).unwrap(), &c, &[1, 3, 7, 8]);
        agrees(&b, &c, &[2, 6, 9, 6]);
    }

    #[test]
    fn strided_dilated_grouped_and_1d_3d_compose() {
        let mut rng = StdRng::seed_from_u64(2);
        // KxK stride 2 then KxK dilated: taps with holes, dense kernel
        let a = conv(&mut rng, 4, 4, &[3], 2, &[2], &[1], &[1], &[2], true);
        let b = conv(&mut rng, 4, 4, &[3], 2, &[1], &[2], &[0], &[0], true);
        agrees(&a, &b, &[1, 4, 17]);
        // depthwise then 1x1 (groups differ: dense)
        let a = conv(&mut rng, 4, 4, &[3, 3], 4, &[1, 1], &[1, 1], &[1, 1], &[1, 1], true);
        let b = conv(&mut rng, 2, 4, &[1, 1], 1, &[1, 1], &[1, 1], &[0, 0], &[0, 0], true);
        agrees(&a, &b, &[1, 4, 5, 5]);
        // 3-d, dilation on the first
        let a = conv(&mut rng, 2, 2, &[1, 3, 2], 1, &[1, 1, 2], &[1, 2, 1], &[0, 1, 0], &[0, 2, 1], true);
        let b = conv(&mut rng, 3, 2, &[2, 1, 2], 1, &[1, 2, 1], &[1, 1, 1], &[0, 0, 0], &[0, 0, 0], true);
        agrees(&a, &b, &[1, 2, 3, 9, 6]);
    }

    #[test]
    fn padding_the_intermediate_moves_onto_an_unbiased_1x1() {
        let mut rng = StdRng::seed_from_u64(3);
        let a = conv(&mut rng, 3, 2, &[1, 1], 1, &[2, 1], &[1, 1], &[0, 0], &[1, 0], false);
        let b = conv(&mut rng, 2, 3, &[3, 3], 1, &[1, 1], &[1, 1], &[1, 1], &[2, 1], true);
        agrees(&a, &b, &[1, 2, 7, 6]);
        // with a bias, the border would hold it
        let a = conv(&mut rng, 3, 2, &[1, 1], 1, &[1, 1], &[1, 1], &[0, 0], &[0, 0], true);
        assert_eq!(a.then_conv(&b), Err(SeqMisfit::PaddedBias { axis: 0 }));
        // a 3x3 first: its window at a padded position overlaps the input
        let a = conv(&mut rng, 3, 2, &[3, 3], 1, &[1, 1], &[1, 1], &[1, 1], &[1, 1], false);
        assert_eq!(a.then_conv(&b), Err(SeqMisfit::PaddedWindow { axis: 0, kernel: 3 }));
    }
}
