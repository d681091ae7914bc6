//! The kernel algebra (BN fold, placing a small kernel at its tap offset inside a large one,
//! identity, crop) against direct convolution: for every case, the merged convolution applied to
//! a random input equals the sum of the branches applied to it, within 1e-9. `AffineConv::apply`
//! is the reference; it is itself cross-checked against an independent direct 2-D convolution
//! written here (explicit zero-padded copy, strided window slices).
// ndarray's `s![.., 1..-1]` counts negative ends from the back; clippy reads them as empty ranges
#![allow(clippy::reversed_empty_ranges)]

use acnet_onnx::kernel::{same_pads, AffineConv, BatchNorm, Placement};
use ndarray::{s, Array1, Array4, ArrayD, Ix1, Ix4, IxDyn};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TOL: f64 = 1e-9;

fn rand_arr(rng: &mut StdRng, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(-1.0f64..=1.0))
}

/// A random convolution with weight `[o, cin/groups, k...]` and a random bias.
#[allow(clippy::too_many_arguments)]
fn conv(
    rng: &mut StdRng,
    o: usize,
    cin: usize,
    groups: usize,
    k: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pb: &[i64],
    pe: &[i64],
) -> AffineConv {
    let mut shape = vec![o, cin / groups];
    shape.extend_from_slice(k);
    let w = rand_arr(rng, &shape);
    let b = rand_arr(rng, &[o]).into_dimensionality::<Ix1>().unwrap();
    AffineConv::new(w, Some(b), groups, strides.to_vec(), dilations.to_vec(), pb.to_vec(), pe.to_vec())
}

/// Stride 1, dilation 1, groups 1.
fn plain(rng: &mut StdRng, o: usize, cin: usize, k: &[usize], pb: &[i64], pe: &[i64]) -> AffineConv {
    let r = k.len();
    conv(rng, o, cin, 1, k, &vec![1; r], &vec![1; r], pb, pe)
}

fn assert_close(got: &ArrayD<f64>, want: &ArrayD<f64>, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "{what}: reference is (almost) zero, the check would be vacuous");
    let d = got.iter().zip(want.iter()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= TOL, "{what}: max abs diff {d} > {TOL}");
}

/// Merge `smalls` into a copy of `big` at the offsets `offset_in` gives; check the merged conv
/// equals the sum of all branches on `x`; return the offsets.
fn check_merge(big: &AffineConv, smalls: &[&AffineConv], x: &ArrayD<f64>, what: &str) -> Vec<Vec<usize>> {
    let mut merged = big.clone();
    let mut offs = Vec::new();
    let mut want = big.apply(x);
    for (k, s) in smalls.iter().enumerate() {
        let o = s.offset_in(big).unwrap_or_else(|e| panic!("{what}: branch {k} refused: {e}"));
        merged.add_at(s, &o);
        offs.push(o.offset);
        let y = s.apply(x);
        assert_eq!(y.shape(), want.shape(), "{what}: branch {k} output shape");
        want += &y;
    }
    // geometry is the big conv's
    assert_eq!(
        (&merged.pads_begin, &merged.pads_end, &merged.strides, &merged.dilations),
        (&big.pads_begin, &big.pads_end, &big.strides, &big.dilations)
    );
    assert_close(&merged.apply(x), &want, what);
    offs
}

// ---------------------------------------------------------------------------------------------
// An independent direct 2-D convolution: zero-pad a copy of x explicitly, then each output is
// the dot product of a strided (dilated) window of the padded copy with the kernel.

fn naive_conv2d(
    x: &ArrayD<f64>,
    w: &ArrayD<f64>,
    b: &Array1<f64>,
    groups: usize,
    stride: [usize; 2],
    dil: [usize; 2],
    pads: [usize; 4],
) -> ArrayD<f64> {
    let x = x.view().into_dimensionality::<Ix4>().unwrap();
    let w = w.view().into_dimensionality::<Ix4>().unwrap();
    let (n, c, h, wd) = x.dim();
    let [top, left, bottom, right] = pads;
    let mut xp = Array4::<f64>::zeros((n, c, h + top + bottom, wd + left + right));
    xp.slice_mut(s![.., .., top..top + h, left..left + wd]).assign(&x);
    let (o, cg, kh, kw) = w.dim();
    assert_eq!(cg * groups, c);
    let (eh, ew) = (dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1);
    let (ph, pw) = (xp.dim().2, xp.dim().3);
    let oh = if ph >= eh { (ph - eh) / stride[0] + 1 } else { 0 };
    let ow = if pw >= ew { (pw - ew) / stride[1] + 1 } else { 0 };
    let og = o / groups;
    let mut y = Array4::<f64>::zeros((n, o, oh, ow));
    for bi in 0..n {
        for oc in 0..o {
            let g = oc / og;
            let kern = w.slice(s![oc, .., .., ..]);
            for i in 0..oh {
                for j in 0..ow {
                    let (r0, c0) = (i * stride[0], j * stride[1]);
                    let win = xp.slice(s![bi, g * cg..(g + 1) * cg, r0..r0 + eh;dil[0], c0..c0 + ew;dil[1]]);
                    y[[bi, oc, i, j]] = (&win * &kern).sum() + b[oc];
                }
            }
        }
    }
    y.into_dyn()
}

fn naive_of(k: &AffineConv, x: &ArrayD<f64>) -> ArrayD<f64> {
    assert_eq!(k.rank(), 2);
    assert!(k.crop_begin.iter().chain(&k.crop_end).all(|&c| c == 0));
    let p = |v: i64| v as usize;
    naive_conv2d(
        x,
        &k.weight,
        &k.bias,
        k.groups,
        [k.strides[0], k.strides[1]],
        [k.dilations[0], k.dilations[1]],
        [p(k.pads_begin[0]), p(k.pads_begin[1]), p(k.pads_end[0]), p(k.pads_end[1])],
    )
}

#[test]
fn case_apply_matches_independent_direct_convolution() {
    let mut rng = StdRng::seed_from_u64(1);
    let cases: Vec<(AffineConv, Vec<usize>)> = vec![
        (plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]), vec![2, 2, 5, 6]),
        // stride (2,1), dilation (1,2), groups 2, asymmetric pads
        (conv(&mut rng, 4, 6, 2, &[3, 2], &[2, 1], &[1, 2], &[2, 0], &[1, 3]), vec![1, 6, 7, 6]),
        // depthwise, stride 2 on an even and an odd axis, dilation 2
        (conv(&mut rng, 3, 3, 3, &[3, 3], &[2, 2], &[2, 2], &[2, 1], &[2, 1]), vec![1, 3, 8, 9]),
        // no padding, kernel the size of the input
        (plain(&mut rng, 2, 2, &[4, 3], &[0, 0], &[0, 0]), vec![1, 2, 4, 3]),
    ];
    for (i, (k, xs)) in cases.iter().enumerate() {
        let x = rand_arr(&mut rng, xs);
        let got = k.apply(&x);
        let want = naive_of(k, &x);
        assert_close(&got, &want, &format!("case {i}"));
    }
}

#[test]
fn case_apply_crop_reads_the_sliced_input() {
    let mut rng = StdRng::seed_from_u64(2);
    let x = rand_arr(&mut rng, &[1, 2, 6, 7]);
    // x[:, :, 1:, 1:-2] through a 3x1 conv with pads (0,1) on W
    let mut k = plain(&mut rng, 3, 2, &[3, 1], &[0, 1], &[0, 1]);
    k.crop_begin = vec![1, 1];
    k.crop_end = vec![0, 2];
    let xs = x.slice(s![.., .., 1.., 1..-2]).to_owned().into_dyn();
    let mut uncropped = k.clone();
    uncropped.crop_begin = vec![0, 0];
    uncropped.crop_end = vec![0, 0];
    assert_close(&k.apply(&x), &naive_of(&uncropped, &xs), "crop vs sliced input (naive)");
    assert_close(&k.apply(&x), &uncropped.apply(&xs), "crop vs sliced input (apply)");
}

// ---------------------------------------------------------------------------------------------
// BatchNormalization fold

fn rand_bn(rng: &mut StdRng, c: usize, epsilon: f64) -> BatchNorm {
    let v = |rng: &mut StdRng| rand_arr(rng, &[c]).into_dimensionality::<Ix1>().unwrap();
    BatchNorm {
        scale: v(rng),
        bias: v(rng),
        mean: v(rng),
        var: Array1::from_shape_fn(c, |_| rng.random_range(0.05..2.0)),
        epsilon,
    }
}

/// BN by hand: (y - mean) / sqrt(var + eps) * gamma + beta on channel axis 1.
fn bn_by_hand(y: &ArrayD<f64>, bn: &BatchNorm) -> ArrayD<f64> {
    let mut out = y.clone();
    for (idx, v) in out.indexed_iter_mut() {
        let c = idx[1];
        *v = (*v - bn.mean[c]) / (bn.var[c] + bn.epsilon).sqrt() * bn.scale[c] + bn.bias[c];
    }
    out
}

#[test]
fn case_fold_bn_equals_conv_then_bn() {
    let mut rng = StdRng::seed_from_u64(3);
    for (i, eps) in [1e-5, 1e-3, 0.1].into_iter().enumerate() {
        let k = conv(&mut rng, 4, 4, 2, &[3, 3], &[1, 1], &[1, 1], &[1, 1], &[1, 1]);
        let bn = rand_bn(&mut rng, 4, eps);
        let x = rand_arr(&mut rng, &[2, 4, 5, 4]);
        let want = bn_by_hand(&k.apply(&x), &bn);
        let mut f = k.clone();
        f.fold_bn(&bn);
        assert_close(&f.apply(&x), &want, &format!("eps {eps} ({i})"));
    }
    // a conv without bias (zero bias) folds too
    let mut k = plain(&mut rng, 3, 2, &[1, 3], &[0, 1], &[0, 1]);
    k.bias.fill(0.0);
    let bn = rand_bn(&mut rng, 3, 1e-5);
    let x = rand_arr(&mut rng, &[1, 2, 4, 4]);
    let want = bn_by_hand(&k.apply(&x), &bn);
    k.fold_bn(&bn);
    assert_close(&k.apply(&x), &want, "no bias");
}

#[test]
fn case_fold_non_affine_bn() {
    let mut rng = StdRng::seed_from_u64(4);
    let k = plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]);
    let mut bn = rand_bn(&mut rng, 3, 1e-5);
    bn.scale.fill(1.0);
    bn.bias.fill(0.0);
    let x = rand_arr(&mut rng, &[1, 2, 5, 5]);
    let want = bn_by_hand(&k.apply(&x), &bn);
    let mut f = k.clone();
    f.fold_bn(&bn);
    assert_close(&f.apply(&x), &want, "non-affine BN");
    // and the folded weight is the conv weight over sigma, per output channel
    for o in 0..3 {
        let sigma = (bn.var[o] + bn.epsilon).sqrt();
        let w = f.weight.slice(s![o, .., .., ..]).to_owned() * sigma;
        let d = (&w - &k.weight.slice(s![o, .., .., ..])).mapv(f64::abs).fold(0.0f64, |m, &v| m.max(v));
        assert!(d < TOL, "channel {o}: {d}");
        assert!((f.bias[o] - (k.bias[o] - bn.mean[o]) / sigma).abs() < TOL);
    }
}

// ---------------------------------------------------------------------------------------------
// Placement at a tap offset

#[test]
fn case_acb_3x3_with_3x1_and_1x3() {
    let mut rng = StdRng::seed_from_u64(5);
    let big = plain(&mut rng, 4, 3, &[3, 3], &[1, 1], &[1, 1]);
    let ver = plain(&mut rng, 4, 3, &[3, 1], &[1, 0], &[1, 0]);
    let hor = plain(&mut rng, 4, 3, &[1, 3], &[0, 1], &[0, 1]);
    let x = rand_arr(&mut rng, &[2, 3, 5, 6]);
    let offs = check_merge(&big, &[&ver, &hor], &x, "ACB 3x3");
    assert_eq!(offs, vec![vec![0, 1], vec![1, 0]]);
}

#[test]
fn case_5x5_with_1x3_and_3x1() {
    let mut rng = StdRng::seed_from_u64(6);
    let big = plain(&mut rng, 3, 2, &[5, 5], &[2, 2], &[2, 2]);
    let hor = plain(&mut rng, 3, 2, &[1, 3], &[0, 1], &[0, 1]);
    let ver = plain(&mut rng, 3, 2, &[3, 1], &[1, 0], &[1, 0]);
    let sq = plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]);
    let one = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[0, 0]);
    let x = rand_arr(&mut rng, &[1, 2, 6, 7]);
    let offs = check_merge(&big, &[&hor, &ver, &sq, &one], &x, "5x5");
    assert_eq!(offs, vec![vec![2, 1], vec![1, 2], vec![1, 1], vec![2, 2]]);
}

#[test]
fn case_7x7() {
    let mut rng = StdRng::seed_from_u64(7);
    let big = plain(&mut rng, 2, 2, &[7, 7], &[3, 3], &[3, 3]);
    let ver = plain(&mut rng, 2, 2, &[7, 1], &[3, 0], &[3, 0]);
    let hor = plain(&mut rng, 2, 2, &[1, 7], &[0, 3], &[0, 3]);
    let k5 = plain(&mut rng, 2, 2, &[5, 5], &[2, 2], &[2, 2]);
    let k3 = plain(&mut rng, 2, 2, &[3, 3], &[1, 1], &[1, 1]);
    let one = plain(&mut rng, 2, 2, &[1, 1], &[0, 0], &[0, 0]);
    let x = rand_arr(&mut rng, &[1, 2, 7, 8]);
    let offs = check_merge(&big, &[&ver, &hor, &k5, &k3, &one], &x, "7x7");
    assert_eq!(offs, vec![vec![0, 3], vec![3, 0], vec![1, 1], vec![2, 2], vec![3, 3]]);
}

#[test]
fn case_asymmetric_pads() {
    let mut rng = StdRng::seed_from_u64(8);
    // pads_begin (2, 1) != pads_end (0, 1): a "causal" 3x3 on H
    let big = plain(&mut rng, 3, 2, &[3, 3], &[2, 1], &[0, 1]);
    let hor = plain(&mut rng, 3, 2, &[1, 3], &[0, 1], &[0, 1]);
    let ver = plain(&mut rng, 3, 2, &[3, 1], &[2, 0], &[0, 0]);
    let even = plain(&mut rng, 3, 2, &[2, 2], &[1, 1], &[0, 0]);
    let even2 = plain(&mut rng, 3, 2, &[2, 2], &[1, 0], &[0, 1]);
    let one = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[0, 0]);
    let x = rand_arr(&mut rng, &[1, 2, 5, 6]);
    let offs = check_merge(&big, &[&hor, &ver, &even, &even2, &one], &x, "asymmetric");
    assert_eq!(offs, vec![vec![2, 0], vec![0, 1], vec![1, 0], vec![1, 1], vec![2, 1]]);
    // the mirror image: big pads (0,2) on W
    let big = plain(&mut rng, 3, 2, &[3, 3], &[1, 0], &[1, 2]);
    let hor = plain(&mut rng, 3, 2, &[1, 3], &[0, 0], &[0, 2]);
    let one = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[0, 0]);
    let offs = check_merge(&big, &[&hor, &one], &x, "asymmetric mirror");
    assert_eq!(offs, vec![vec![1, 0], vec![1, 0]]);
}

#[test]
fn case_shift_crop_begin_pad_end() {
    // a 1x1 reading x shifted by one column (crop 1 at the start of W, pad 1 at its end), as a
    // Pad with pads (-1 begin, +1 end) before a branch gives: lands at tap (1, 2) of a 3x3 p1
    let mut rng = StdRng::seed_from_u64(9);
    let big = plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]);
    let mut shift = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[0, 1]);
    shift.crop_begin = vec![0, 1];
    let x = rand_arr(&mut rng, &[1, 2, 4, 5]);
    let offs = check_merge(&big, &[&shift], &x, "shift");
    assert_eq!(offs, vec![vec![1, 2]]);
}

#[test]
fn case_conv1d() {
    let mut rng = StdRng::seed_from_u64(10);
    let big = plain(&mut rng, 3, 2, &[5], &[2], &[2]);
    let k3 = plain(&mut rng, 3, 2, &[3], &[1], &[1]);
    let k1 = plain(&mut rng, 3, 2, &[1], &[0], &[0]);
    let k2 = plain(&mut rng, 3, 2, &[2], &[1], &[0]);
    let x = rand_arr(&mut rng, &[2, 2, 9]);
    let offs = check_merge(&big, &[&k3, &k1, &k2], &x, "conv1d");
    assert_eq!(offs, vec![vec![1], vec![2], vec![1]]);
    // stride 2 in 1-d
    let big = conv(&mut rng, 3, 2, 1, &[3], &[2], &[1], &[1], &[1]);
    let k1 = conv(&mut rng, 3, 2, 1, &[1], &[2], &[1], &[0], &[0]);
    let x = rand_arr(&mut rng, &[1, 2, 8]);
    assert_eq!(check_merge(&big, &[&k1], &x, "conv1d stride 2"), vec![vec![1]]);
}

#[test]
fn case_conv3d() {
    let mut rng = StdRng::seed_from_u64(11);
    let big = plain(&mut rng, 2, 2, &[3, 3, 3], &[1, 1, 1], &[1, 1, 1]);
    let a = plain(&mut rng, 2, 2, &[3, 1, 1], &[1, 0, 0], &[1, 0, 0]);
    let b = plain(&mut rng, 2, 2, &[1, 3, 1], &[0, 1, 0], &[0, 1, 0]);
    let c = plain(&mut rng, 2, 2, &[1, 1, 3], &[0, 0, 1], &[0, 0, 1]);
    let d = plain(&mut rng, 2, 2, &[1, 3, 3], &[0, 1, 1], &[0, 1, 1]);
    let one = plain(&mut rng, 2, 2, &[1, 1, 1], &[0, 0, 0], &[0, 0, 0]);
    let x = rand_arr(&mut rng, &[1, 2, 3, 4, 5]);
    let offs = check_merge(&big, &[&a, &b, &c, &d, &one], &x, "conv3d");
    assert_eq!(offs, vec![vec![0, 1, 1], vec![1, 0, 1], vec![1, 1, 0], vec![1, 0, 0], vec![1, 1, 1]]);
}

#[test]
fn case_stride_2_even_and_odd_sizes() {
    let mut rng = StdRng::seed_from_u64(12);
    let s2 = [2, 2];
    let d1 = [1, 1];
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &s2, &d1, &[1, 1], &[1, 1]);
    let ver = conv(&mut rng, 3, 2, 1, &[3, 1], &s2, &d1, &[1, 0], &[1, 0]);
    let hor = conv(&mut rng, 3, 2, 1, &[1, 3], &s2, &d1, &[0, 1], &[0, 1]);
    let one = conv(&mut rng, 3, 2, 1, &[1, 1], &s2, &d1, &[0, 0], &[0, 0]);
    for shape in [[1, 2, 6, 6], [1, 2, 7, 7], [1, 2, 6, 7], [1, 2, 7, 6]] {
        let x = rand_arr(&mut rng, &shape);
        let offs = check_merge(&big, &[&ver, &hor, &one], &x, &format!("stride 2 on {shape:?}"));
        assert_eq!(offs, vec![vec![0, 1], vec![1, 0], vec![1, 1]]);
    }
    // mixed strides per axis
    let s21 = [2, 1];
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &s21, &d1, &[1, 1], &[1, 1]);
    let hor = conv(&mut rng, 3, 2, 1, &[1, 3], &s21, &d1, &[0, 1], &[0, 1]);
    let x = rand_arr(&mut rng, &[1, 2, 7, 6]);
    assert_eq!(check_merge(&big, &[&hor], &x, "stride (2,1)"), vec![vec![1, 0]]);
}

#[test]
fn case_dilation_2() {
    let mut rng = StdRng::seed_from_u64(13);
    let s1 = [1, 1];
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &s1, &[2, 2], &[2, 2], &[2, 2]);
    // branch pads are scaled by the dilation; a one-tap axis has no dilation to speak of
    let ver = conv(&mut rng, 3, 2, 1, &[3, 1], &s1, &[2, 1], &[2, 0], &[2, 0]);
    let hor = conv(&mut rng, 3, 2, 1, &[1, 3], &s1, &[2, 2], &[0, 2], &[0, 2]);
    let one = conv(&mut rng, 3, 2, 1, &[1, 1], &s1, &[1, 1], &[0, 0], &[0, 0]);
    let x = rand_arr(&mut rng, &[1, 2, 6, 7]);
    let offs = check_merge(&big, &[&ver, &hor, &one], &x, "dilation 2");
    assert_eq!(offs, vec![vec![0, 1], vec![1, 0], vec![1, 1]]);
    // dilation 2 with stride 2
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &[2, 2], &[2, 2], &[2, 2], &[2, 2]);
    let ver = conv(&mut rng, 3, 2, 1, &[3, 1], &[2, 2], &[2, 2], &[2, 0], &[2, 0]);
    let x = rand_arr(&mut rng, &[1, 2, 7, 8]);
    assert_eq!(check_merge(&big, &[&ver], &x, "dilation 2 stride 2"), vec![vec![0, 1]]);
}

#[test]
fn case_groups_2_and_depthwise() {
    let mut rng = StdRng::seed_from_u64(14);
    let (s1, d1) = ([1, 1], [1, 1]);
    // groups 2: 4 -> 6 channels
    let big = conv(&mut rng, 6, 4, 2, &[3, 3], &s1, &d1, &[1, 1], &[1, 1]);
    let ver = conv(&mut rng, 6, 4, 2, &[3, 1], &s1, &d1, &[1, 0], &[1, 0]);
    let hor = conv(&mut rng, 6, 4, 2, &[1, 3], &s1, &d1, &[0, 1], &[0, 1]);
    let one = conv(&mut rng, 6, 4, 2, &[1, 1], &s1, &d1, &[0, 0], &[0, 0]);
    let x = rand_arr(&mut rng, &[1, 4, 5, 5]);
    let offs = check_merge(&big, &[&ver, &hor, &one], &x, "groups 2");
    assert_eq!(offs, vec![vec![0, 1], vec![1, 0], vec![1, 1]]);
    // depthwise: groups = channels
    let big = conv(&mut rng, 4, 4, 4, &[3, 3], &s1, &d1, &[1, 1], &[1, 1]);
    let ver = conv(&mut rng, 4, 4, 4, &[3, 1], &s1, &d1, &[1, 0], &[1, 0]);
    let one = conv(&mut rng, 4, 4, 4, &[1, 1], &s1, &d1, &[0, 0], &[0, 0]);
    let id = AffineConv::identity(4, 4, 2);
    let offs = check_merge(&big, &[&ver, &one, &id], &x, "depthwise");
    assert_eq!(offs, vec![vec![0, 1], vec![1, 1], vec![1, 1]]);
}

#[test]
fn case_identity_with_groups() {
    let mut rng = StdRng::seed_from_u64(15);
    for groups in [1, 2, 4] {
        let c = 4;
        let id = AffineConv::identity(c, groups, 2);
        let x = rand_arr(&mut rng, &[2, c, 4, 5]);
        // the identity kernel is the identity
        assert_eq!(id.apply(&x), x, "groups {groups}: identity.apply");
        let big = conv(&mut rng, c, c, groups, &[3, 3], &[1, 1], &[1, 1], &[1, 1], &[1, 1]);
        let offs = id.offset_in(&big).unwrap();
        assert_eq!(offs.offset, vec![1, 1]);
        let mut merged = big.clone();
        merged.add_at(&id, &offs);
        let want = big.apply(&x) + &x;
        assert_close(&merged.apply(&x), &want, &format!("groups {groups}: conv(x) + x"));
    }
    // identity with a BN folded into it (RepVGG's identity branch) in 1-d and 3-d
    for (rank, xs) in [(1usize, vec![1, 3, 6]), (3, vec![1, 3, 3, 4, 3])] {
        let mut id = AffineConv::identity(3, 1, rank);
        let bn = rand_bn(&mut rng, 3, 1e-5);
        id.fold_bn(&bn);
        let x = rand_arr(&mut rng, &xs);
        let k = vec![3; rank];
        let big = plain(&mut rng, 3, 3, &k, &vec![1; rank], &vec![1; rank]);
        let offs = id.offset_in(&big).unwrap();
        let mut merged = big.clone();
        merged.add_at(&id, &offs);
        let want = big.apply(&x) + bn_by_hand(&x, &bn);
        assert_close(&merged.apply(&x), &want, &format!("identity+BN rank {rank}"));
    }
}

#[test]
fn case_crop_branches_into_unpadded_3x3() {
    // ACNet with padding 0: the 3x1 branch reads x[:, :, :, 1:-1], the 1x3 x[:, :, 1:-1, :]
    let mut rng = StdRng::seed_from_u64(16);
    let big = plain(&mut rng, 3, 2, &[3, 3], &[0, 0], &[0, 0]);
    let mut ver = plain(&mut rng, 3, 2, &[3, 1], &[0, 0], &[0, 0]);
    ver.crop_begin = vec![0, 1];
    ver.crop_end = vec![0, 1];
    let mut hor = plain(&mut rng, 3, 2, &[1, 3], &[0, 0], &[0, 0]);
    hor.crop_begin = vec![1, 0];
    hor.crop_end = vec![1, 0];
    let mut one = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[0, 0]);
    one.crop_begin = vec![1, 1];
    one.crop_end = vec![1, 1];
    let x = rand_arr(&mut rng, &[1, 2, 5, 6]);
    // the crop is the slice, checked with the independent convolution
    let mut plain_ver = ver.clone();
    plain_ver.crop_begin = vec![0, 0];
    plain_ver.crop_end = vec![0, 0];
    assert_close(
        &ver.apply(&x),
        &naive_of(&plain_ver, &x.slice(s![.., .., .., 1..-1]).to_owned().into_dyn()),
        "3x1 on x[..., 1:-1]",
    );
    let offs = check_merge(&big, &[&ver, &hor, &one], &x, "crop");
    assert_eq!(offs, vec![vec![0, 1], vec![1, 0], vec![1, 1]]);
    // and the merged conv against the independent convolution
    let mut merged = big.clone();
    for s in [&ver, &hor, &one] {
        merged.add_at(s, &s.offset_in(&big).unwrap());
    }
    let want = naive_of(&big, &x)
        + naive_of(&plain_ver, &x.slice(s![.., .., .., 1..-1]).to_owned().into_dyn())
        + {
            let mut p = hor.clone();
            p.crop_begin = vec![0, 0];
            p.crop_end = vec![0, 0];
            naive_of(&p, &x.slice(s![.., .., 1..-1, ..]).to_owned().into_dyn())
        }
        + {
            let mut p = one.clone();
            p.crop_begin = vec![0, 0];
            p.crop_end = vec![0, 0];
            naive_of(&p, &x.slice(s![.., .., 1..-1, 1..-1]).to_owned().into_dyn())
        };
    assert_close(&merged.apply(&x), &want, "crop merged vs naive");
    assert_close(&naive_of(&merged, &x), &want, "crop merged (naive) vs naive branches");
}

// ---------------------------------------------------------------------------------------------
// dilated branches, and output sizes equal at one input size only

/// Merge `smalls` into a copy of `big` at the placements `offset_in_at` gives for `x`'s size;
/// check the merged conv equals the sum of all branches on `x`, both computed by `apply` and by
/// the independent convolution (2-d, no crops); return the placements.
fn check_merge_at(big: &AffineConv, smalls: &[&AffineConv], x: &ArrayD<f64>, what: &str) -> Vec<Placement> {
    let len = &x.shape()[2..];
    let mut merged = big.clone();
    let mut placed = Vec::new();
    let mut want = big.apply(x);
    let mut naive = naive_of(big, x);
    for (k, s) in smalls.iter().enumerate() {
        let at = s.offset_in_at(big, len).unwrap_or_else(|e| panic!("{what}: branch {k} refused: {e}"));
        merged.add_at(s, &at);
        placed.push(at);
        let y = s.apply(x);
        assert_eq!(y.shape(), want.shape(), "{what}: branch {k} output shape");
        want += &y;
        naive += &naive_of(s, x);
    }
    assert_close(&merged.apply(x), &want, what);
    assert_close(&naive_of(&merged, x), &naive, &format!("{what} (independent convolution)"));
    placed
}

fn at(offset: &[usize], step: &[usize]) -> Placement {
    Placement { offset: offset.to_vec(), step: step.to_vec() }
}

/// UniRepLKNet's dilated reparam block: a large depthwise kernel summed with smaller kernels of
/// larger dilations, each a kernel of zeros between its taps ((k − 1)·d + 1 wide) placed on the
/// large one's taps; RepNeXt's 2x2 kernel of dilation 2 inside a 3x3.
#[test]
fn case_dilated_kernels_land_on_the_large_kernels_taps() {
    let mut rng = StdRng::seed_from_u64(30);
    let (c, s1) = (3, [1, 1]);
    let big = conv(&mut rng, c, c, c, &[9, 9], &s1, &[1, 1], &[4, 4], &[4, 4]);
    let k5 = conv(&mut rng, c, c, c, &[5, 5], &s1, &[1, 1], &[2, 2], &[2, 2]);
    let k3d2 = conv(&mut rng, c, c, c, &[3, 3], &s1, &[2, 2], &[2, 2], &[2, 2]);
    let k3d3 = conv(&mut rng, c, c, c, &[3, 3], &s1, &[3, 3], &[3, 3], &[3, 3]);
    let k3d4 = conv(&mut rng, c, c, c, &[3, 3], &s1, &[4, 4], &[4, 4], &[4, 4]);
    // dilations per axis, off the centre
    let k32 = conv(&mut rng, c, c, c, &[3, 2], &s1, &[2, 3], &[2, 1], &[2, 2]);
    let x = rand_arr(&mut rng, &[1, c, 9, 11]);
    let placed = check_merge_at(&big, &[&k5, &k3d2, &k3d3, &k3d4, &k32], &x, "dilated reparam block");
    assert_eq!(
        placed,
        vec![
            at(&[2, 2], &[1, 1]),
            at(&[2, 2], &[2, 2]),
            at(&[1, 1], &[3, 3]),
            at(&[0, 0], &[4, 4]),
            at(&[2, 3], &[2, 3])
        ]
    );
    // at every input size too (the output sizes are)
    assert_eq!(k3d3.offset_in(&big), Ok(at(&[1, 1], &[3, 3])));
    // RepNeXt: 3x3 + 2x2 of dilation 2 with pad 1, at stride 1 and 2
    for s in [1, 2] {
        let big = conv(&mut rng, c, c, c, &[3, 3], &[s, s], &[1, 1], &[1, 1], &[1, 1]);
        let k2 = conv(&mut rng, c, c, c, &[2, 2], &[s, s], &[2, 2], &[1, 1], &[1, 1]);
        let x = rand_arr(&mut rng, &[1, c, 7, 8]);
        assert_eq!(check_merge_at(&big, &[&k2], &x, &format!("RepNeXt stride {s}")), vec![at(&[0, 0], &[2, 2])]);
    }
    // a dilated large kernel: 3x3 of dilation 4 on the taps of a 5x5 of dilation 2
    let big = conv(&mut rng, c, c, 1, &[5, 5], &s1, &[2, 2], &[4, 4], &[4, 4]);
    let k3d4 = conv(&mut rng, c, c, 1, &[3, 3], &s1, &[4, 4], &[4, 4], &[4, 4]);
    let k2d4 = conv(&mut rng, c, c, 1, &[2, 2], &s1, &[4, 4], &[2, 2], &[2, 2]);
    let x = rand_arr(&mut rng, &[1, c, 10, 9]);
    assert_eq!(
        check_merge_at(&big, &[&k3d4, &k2d4], &x, "dilation 4 in 2"),
        vec![at(&[0, 0], &[2, 2]), at(&[1, 1], &[2, 2])]
    );
}

#[test]
fn case_dilated_kernels_off_the_large_kernels_taps_or_window_are_refused() {
    let mut rng = StdRng::seed_from_u64(31);
    let s1 = [1, 1];
    // dilation 3 on a grid of 2: taps 0, 3, 6 against 0, 2, 4, ...
    let big = conv(&mut rng, 2, 2, 1, &[5, 5], &s1, &[2, 2], &[4, 4], &[4, 4]);
    let d3 = conv(&mut rng, 2, 2, 1, &[3, 3], &s1, &[3, 3], &[3, 3], &[3, 3]);
    refused(&d3, &big, "dilation 3 vs 2 on axis 0: not a multiple");
    // a 3x3 of dilation 3 spans 7 positions: not inside a 5x5
    let big = plain(&mut rng, 2, 2, &[5, 5], &[2, 2], &[2, 2]);
    let wide = conv(&mut rng, 2, 2, 1, &[3, 3], &s1, &[3, 3], &[3, 3], &[3, 3]);
    refused(&wide, &big, "kernel of 3 at offset -1, one tap every 3, does not fit in 5 on axis 0 (taps -1 to 5)");
    let x = rand_arr(&mut rng, &[1, 2, 8, 8]);
    assert!(wide.offset_in_at(&big, &x.shape()[2..]).is_err());
}

/// TensorFlow's "same" padding at stride 2 on an even size pads only at the end: the 3x3 gets
/// pads (0, 1), the 3x1 (0, 1) on H only, the 1x1 none. The output sizes are those of the 3x3 at
/// even sizes only (the spans differ), where every branch is a kernel at the 3x3's first tap.
#[test]
fn case_tf_same_padding_at_stride_2_merges_at_the_input_size() {
    let mut rng = StdRng::seed_from_u64(32);
    let (s2, d1) = ([2, 2], [1, 1]);
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &s2, &d1, &[0, 0], &[1, 1]);
    let ver = conv(&mut rng, 3, 2, 1, &[3, 1], &s2, &d1, &[0, 0], &[1, 0]);
    let hor = conv(&mut rng, 3, 2, 1, &[1, 3], &s2, &d1, &[0, 0], &[0, 1]);
    let one = conv(&mut rng, 3, 2, 1, &[1, 1], &s2, &d1, &[0, 0], &[0, 0]);
    // not at every size
    refused(&ver, &big, "paddings give a different output size on axis 1 at some input sizes");
    for shape in [[1, 2, 8, 8], [1, 2, 6, 10], [1, 2, 20, 12]] {
        let x = rand_arr(&mut rng, &shape);
        let placed = check_merge_at(&big, &[&ver, &hor, &one], &x, &format!("TF same on {shape:?}"));
        assert_eq!(placed, vec![at(&[0, 0], &[1, 1]); 3]);
    }
    // at an odd width the 3x1 has one output more: refused with both sizes
    let e = ver.offset_in_at(&big, &[8, 9]).unwrap_err();
    assert_eq!(e.to_string(), "output size 5 vs 4 on axis 1 (input size 9)");
    let x = rand_arr(&mut rng, &[1, 2, 8, 9]);
    assert_eq!((ver.apply(&x).shape()[3], big.apply(&x).shape()[3]), (5, 4), "the sizes the refusal names");
}

/// `same_pads`: ONNX's `auto_pad` SAME_UPPER / SAME_LOWER and TensorFlow's "same".
#[test]
fn case_same_pads_follow_the_tf_formula() {
    // (len, k, s, d) -> SAME_UPPER pads
    for ((len, k, s, d), want) in [
        ((20, 3, 2, 1), (0, 1)),
        ((5, 3, 2, 1), (1, 1)),
        ((10, 1, 2, 1), (0, 0)),
        ((10, 3, 1, 1), (1, 1)),
        ((10, 4, 1, 1), (1, 2)),
        ((7, 3, 1, 2), (2, 2)),
        ((8, 5, 3, 1), (1, 2)),
        ((7, 5, 3, 1), (2, 2)),
        ((5, 1, 3, 1), (0, 0)),
    ] {
        assert_eq!(same_pads(len, k, s, d, true), want, "SAME_UPPER len {len} k {k} s {s} d {d}");
        assert_eq!(same_pads(len, k, s, d, false), (want.1, want.0), "SAME_LOWER len {len} k {k} s {s} d {d}");
        // the output has ceil(len / s) elements
        let conv = AffineConv::new(
            ArrayD::ones(IxDyn(&[1, 1, k as usize])),
            None,
            1,
            vec![s as usize],
            vec![d as usize],
            vec![want.0],
            vec![want.1],
        );
        let x = ArrayD::ones(IxDyn(&[1, 1, len as usize]));
        assert_eq!(conv.apply(&x).shape()[2] as i64, (len + s - 1) / s, "len {len} k {k} s {s} d {d}");
    }
}

// ---------------------------------------------------------------------------------------------
// offset_in refusals

fn refused(small: &AffineConv, big: &AffineConv, phrase: &str) {
    match small.offset_in(big) {
        Ok(o) => panic!("expected a refusal containing {phrase:?}, got offsets {o:?}"),
        Err(e) => assert!(e.to_string().contains(phrase), "reason {e:?} does not contain {phrase:?}"),
    }
}

#[test]
fn case_offset_in_refuses_different_stride() {
    let mut rng = StdRng::seed_from_u64(20);
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &[2, 2], &[1, 1], &[1, 1], &[1, 1]);
    let small = conv(&mut rng, 3, 2, 1, &[1, 1], &[1, 1], &[1, 1], &[0, 0], &[0, 0]);
    refused(&small, &big, "stride");
    // a stride differing on the second axis only
    let small = conv(&mut rng, 3, 2, 1, &[1, 3], &[2, 1], &[1, 1], &[0, 1], &[0, 1]);
    refused(&small, &big, "stride 1 vs 2 on axis 1");
}

#[test]
fn case_offset_in_refuses_different_dilation() {
    let mut rng = StdRng::seed_from_u64(21);
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &[1, 1], &[2, 2], &[2, 2], &[2, 2]);
    let small = conv(&mut rng, 3, 2, 1, &[3, 1], &[1, 1], &[1, 1], &[1, 0], &[1, 0]);
    refused(&small, &big, "dilation 1 vs 2 on axis 0");
    let small = conv(&mut rng, 3, 2, 1, &[3, 3], &[1, 1], &[1, 1], &[1, 1], &[1, 1]);
    refused(&small, &big, "dilation");
    // while a one-tap axis may have any dilation
    let ok = conv(&mut rng, 3, 2, 1, &[3, 1], &[1, 1], &[2, 3], &[2, 0], &[2, 0]);
    assert_eq!(ok.offset_in(&big).map(|p| p.offset), Ok(vec![0, 1]));
}

#[test]
fn case_offset_in_refuses_different_groups_and_channels() {
    let mut rng = StdRng::seed_from_u64(22);
    let (s1, d1) = ([1, 1], [1, 1]);
    let big = conv(&mut rng, 4, 4, 1, &[3, 3], &s1, &d1, &[1, 1], &[1, 1]);
    let g2 = conv(&mut rng, 4, 4, 2, &[1, 1], &s1, &d1, &[0, 0], &[0, 0]);
    refused(&g2, &big, "groups 2 vs 1");
    let o2 = conv(&mut rng, 2, 4, 1, &[1, 1], &s1, &d1, &[0, 0], &[0, 0]);
    refused(&o2, &big, "2 vs 4 output channels");
    let c3 = conv(&mut rng, 4, 3, 1, &[1, 1], &s1, &d1, &[0, 0], &[0, 0]);
    refused(&c3, &big, "input channels per group");
    let r1 = conv(&mut rng, 4, 4, 1, &[1], &[1], &[1], &[0], &[0]);
    refused(&r1, &big, "1-d and 2-d");
    // the identity on a grouped conv with other groups
    refused(&AffineConv::identity(4, 1, 2), &conv(&mut rng, 4, 4, 2, &[3, 3], &s1, &d1, &[1, 1], &[1, 1]), "groups");
}

#[test]
fn case_offset_in_refuses_kernels_that_do_not_fit() {
    let mut rng = StdRng::seed_from_u64(23);
    let big = plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]);
    // 1x5 with pads keeping the output size: would start one tap left of the 3x3
    let wide = plain(&mut rng, 3, 2, &[1, 5], &[0, 2], &[0, 2]);
    refused(&wide, &big, "does not fit");
    // 5x5 into 3x3
    let k5 = plain(&mut rng, 3, 2, &[5, 5], &[2, 2], &[2, 2]);
    refused(&k5, &big, "does not fit");
    // a 3x1 shifted past the end of the 3x3 (pads (2,0) on H, same output size)
    let low = plain(&mut rng, 3, 2, &[3, 1], &[0, 0], &[2, 0]);
    refused(&low, &big, "does not fit");
}

#[test]
fn case_offset_in_refuses_paddings_changing_output_size() {
    let mut rng = StdRng::seed_from_u64(24);
    let big = plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]);
    let hor = plain(&mut rng, 3, 2, &[1, 3], &[0, 0], &[0, 0]);
    refused(&hor, &big, "paddings give a different output size on axis 1");
    let one = plain(&mut rng, 3, 2, &[1, 1], &[1, 1], &[1, 1]);
    refused(&one, &big, "different output size");
    // a crop that shrinks the output
    let mut ver = plain(&mut rng, 3, 2, &[3, 1], &[1, 0], &[1, 0]);
    ver.crop_end = vec![0, 1];
    refused(&ver, &big, "different output size");
}

#[test]
fn case_offset_in_refuses_crop_and_pad_on_the_same_side() {
    let mut rng = StdRng::seed_from_u64(25);
    let big = plain(&mut rng, 3, 2, &[3, 3], &[1, 1], &[1, 1]);
    let mut one = plain(&mut rng, 3, 2, &[1, 1], &[0, 1], &[0, 0]);
    one.crop_begin = vec![0, 1];
    refused(&one, &big, "crop and padding on the same side of axis 1");
    let mut one = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[1, 0]);
    one.crop_end = vec![1, 0];
    refused(&one, &big, "crop and padding on the same side of axis 0");
    let mut neg = plain(&mut rng, 3, 2, &[1, 1], &[0, 0], &[0, 0]);
    neg.crop_begin = vec![-1, 0];
    refused(&neg, &big, "negative crop");
}

#[test]
fn case_offset_in_refuses_taps_between_dilated_taps() {
    let mut rng = StdRng::seed_from_u64(26);
    let big = conv(&mut rng, 3, 2, 1, &[3, 3], &[1, 1], &[2, 2], &[2, 2], &[2, 2]);
    // same dilation and output size, but shifted by one input pixel: offset 1/2 tap
    let odd = conv(&mut rng, 3, 2, 1, &[3, 3], &[1, 1], &[2, 2], &[1, 2], &[3, 2]);
    refused(&odd, &big, "taps fall between");
    // a one-tap branch shifted by one pixel (pad 1 at the start, crop 1 at the end)
    let mut one = conv(&mut rng, 3, 2, 1, &[1, 1], &[1, 1], &[1, 1], &[1, 0], &[0, 0]);
    one.crop_end = vec![1, 0];
    refused(&one, &big, "taps fall between");
    // ... while shifted by two pixels it lands on a tap and merges
    let mut two = conv(&mut rng, 3, 2, 1, &[1, 1], &[1, 1], &[1, 1], &[2, 0], &[0, 0]);
    two.crop_end = vec![2, 0];
    let x = rand_arr(&mut rng, &[1, 2, 6, 6]);
    assert_eq!(check_merge(&big, &[&two], &x, "shift by 2 under dilation 2"), vec![vec![0, 1]]);
}

#[test]
fn a_large_kernel_gets_each_small_tap_added_once_at_its_offset() {
    // large enough to be added a piece at a time on every core
    let mut rng = StdRng::seed_from_u64(41);
    let (o, c) = (96, 96);
    let big = plain(&mut rng, o, c, &[3, 3], &[1, 1], &[1, 1]);
    let ver = plain(&mut rng, o, c, &[3, 1], &[1, 0], &[1, 0]);
    let hor = plain(&mut rng, o, c, &[1, 3], &[0, 1], &[0, 1]);
    assert!(big.weight.len() >= 1 << 16);
    let mut merged = big.clone();
    for s in [&ver, &hor] {
        let offs = s.offset_in(&big).unwrap();
        merged.add_at(s, &offs);
    }
    let (b, v, h) = (big.weight.view().into_dimensionality::<Ix4>().unwrap(), &ver.weight, &hor.weight);
    for ((oo, cc, i, j), &got) in merged.weight.view().into_dimensionality::<Ix4>().unwrap().indexed_iter() {
        let mut want = b[[oo, cc, i, j]];
        if j == 1 {
            want += v[[oo, cc, i, 0]];
        }
        if i == 1 {
            want += h[[oo, cc, 0, j]];
        }
        assert_eq!(got.to_bits(), want.to_bits(), "[{oo}, {cc}, {i}, {j}]");
    }
    for k in 0..o {
        assert_eq!(merged.bias[k].to_bits(), (big.bias[k] + ver.bias[k] + hor.bias[k]).to_bits());
    }
}
