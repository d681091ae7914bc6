//! The linear algebra of constant subgraphs, in f64: MatMul, Gemm, Einsum, Conv over constants,
//! and the shape operators that move or repeat values (Pad, Expand, Tile). Generated weights are
//! computed so (OREPA and yolov7's RepConv_OREPA make each conv weight from parameters at run
//! time; an exporter folds some of it and leaves the rest as Einsum, MatMul and Conv nodes).
//!
//! Every function returns `None` when its inputs do not have the form it computes (the value is
//! then not a constant here), and never computes more than [`WORK`] multiply-adds.

use ndarray::{ArrayD, Axis, Dimension, IxDyn};

/// The most multiply-adds one operator may cost.
const WORK: u128 = 1 << 28;

fn numel(s: &[usize]) -> Option<usize> {
    s.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// numpy's broadcast of two shapes.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= r { s[i + s.len() - r] } else { 1 };
    (0..r)
        .map(|i| {
            let (p, q) = (dim(a, i), dim(b, i));
            if p == q || q == 1 {
                Some(p)
            } else if p == 1 {
                Some(q)
            } else {
                None
            }
        })
        .collect()
}

/// `MatMul` (numpy semantics: 1-d operands promoted, batch axes broadcast).
pub(crate) fn matmul(a: &ArrayD<f64>, b: &ArrayD<f64>) -> Option<ArrayD<f64>> {
    let (ra, rb) = (a.ndim(), b.ndim());
    if ra == 0 || rb == 0 {
        return None;
    }
    let a2 = if ra == 1 { a.clone().insert_axis(Axis(0)) } else { a.clone() };
    let b2 = if rb == 1 { b.clone().insert_axis(Axis(1)) } else { b.clone() };
    let (sa, sb) = (a2.shape(), b2.shape());
    let (m, k, k2, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 2], sb[sb.len() - 1]);
    if k != k2 {
        return None;
    }
    let batch = broadcast(&sa[..sa.len() - 2], &sb[..sb.len() - 2])?;
    let nb = numel(&batch)?;
    if (nb as u128) * (m as u128) * (n as u128) * (k as u128) > WORK {
        return None;
    }
    let mut ashape = batch.clone();
    ashape.extend([m, k]);
    let mut bshape = batch.clone();
    bshape.extend([k, n]);
    let av = a2.broadcast(IxDyn(&ashape))?.as_standard_layout().into_owned();
    let bv = b2.broadcast(IxDyn(&bshape))?.as_standard_layout().into_owned();
    let (av, bv) = (av.as_slice()?, bv.as_slice()?);
    let mut out = vec![0f64; nb * m * n];
    for t in 0..nb {
        let (ao, bo, oo) = (t * m * k, t * k * n, t * m * n);
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for q in 0..k {
                    s += av[ao + i * k + q] * bv[bo + q * n + j];
                }
                out[oo + i * n + j] = s;
            }
        }
    }
    let mut shape = batch;
    if ra > 1 {
        shape.push(m);
    }
    if rb > 1 {
        shape.push(n);
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).ok()
}

/// `Gemm`: `alpha·A'·B' + beta·C` (A', B' transposed when asked).
pub(crate) fn gemm(
    a: &ArrayD<f64>,
    b: &ArrayD<f64>,
    c: Option<&ArrayD<f64>>,
    alpha: f64,
    beta: f64,
    trans_a: bool,
    trans_b: bool,
) -> Option<ArrayD<f64>> {
    if a.ndim() != 2 || b.ndim() != 2 {
        return None;
    }
    let a = if trans_a { a.t().to_owned() } else { a.clone() };
    let b = if trans_b { b.t().to_owned() } else { b.clone() };
    let mut y = matmul(&a, &b)?.mapv(|v| v * alpha);
    if let Some(c) = c {
        let cb = c.broadcast(IxDyn(y.shape()))?;
        y.zip_mut_with(&cb, |p, &q| *p += beta * q);
    }
    Some(y)
}

/// `Einsum` of any number of operands (explicit `->` or implicit output; no ellipsis), by a loop
/// over every index.
pub(crate) fn einsum(equation: &str, ops: &[ArrayD<f64>]) -> Option<ArrayD<f64>> {
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    if eq.contains("...") {
        return None;
    }
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<Vec<char>> = lhs.split(',').map(|t| t.chars().collect()).collect();
    if terms.len() != ops.len() || terms.iter().flatten().any(|c| !c.is_ascii_alphabetic()) {
        return None;
    }
    // a letter's size: the same in every operand, or 1 in some (broadcast, as onnxruntime does)
    let mut size: std::collections::BTreeMap<char, usize> = std::collections::BTreeMap::new();
    for (t, a) in terms.iter().zip(ops) {
        if t.len() != a.ndim() {
            return None;
        }
        for (c, &d) in t.iter().zip(a.shape()) {
            let e = size.entry(*c).or_insert(d);
            if *e == 1 {
                *e = d;
            } else if d != 1 && *e != d {
                return None;
            }
        }
    }
    let out: Vec<char> = match rhs {
        Some(r) => r.chars().collect(),
        // implicit: the letters seen once, in alphabetical order
        None => size.keys().copied().filter(|c| terms.iter().flatten().filter(|d| *d == c).count() == 1).collect(),
    };
    if out.iter().any(|c| !size.contains_key(c)) {
        return None;
    }
    let letters: Vec<char> = size.keys().copied().collect();
    let dims: Vec<usize> = letters.iter().map(|c| size[c]).collect();
    let total = dims.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
    if total.saturating_mul(ops.len() as u128) > WORK {
        return None;
    }
    let pos = |c: &char| letters.iter().position(|d| d == c).expect("a letter");
    let out_pos: Vec<usize> = out.iter().map(pos).collect();
    let term_pos: Vec<Vec<usize>> = terms.iter().map(|t| t.iter().map(pos).collect()).collect();
    let out_shape: Vec<usize> = out_pos.iter().map(|&p| dims[p]).collect();
    let mut y = ArrayD::zeros(IxDyn(&out_shape));
    let ops: Vec<ArrayD<f64>> = ops.iter().map(|a| a.as_standard_layout().into_owned()).collect();
    let mut idx = vec![0usize; letters.len()];
    let mut oi = vec![0usize; out_pos.len()];
    let mut ti: Vec<Vec<usize>> = term_pos.iter().map(|t| vec![0; t.len()]).collect();
    for _ in 0..total {
        let mut v = 1.0;
        for (k, a) in ops.iter().enumerate() {
            for (j, &p) in term_pos[k].iter().enumerate() {
                ti[k][j] = if a.shape()[j] == 1 { 0 } else { idx[p] };
            }
            v *= a[IxDyn(&ti[k])];
        }
        for (j, &p) in out_pos.iter().enumerate() {
            oi[j] = idx[p];
        }
        y[IxDyn(&oi)] += v;
        // next index, last letter fastest
        for a in (0..idx.len()).rev() {
            idx[a] += 1;
            if idx[a] < dims[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    Some(y)
}

/// A convolution's attributes (explicit pads; `auto_pad` resolved by the caller).
pub(crate) struct ConvAttrs {
    pub groups: usize,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads_begin: Vec<usize>,
    pub pads_end: Vec<usize>,
}

/// `Conv` of a constant `x [N, C, ...]` with `w [O, C/groups, k...]` and an optional bias.
pub(crate) fn conv(x: &ArrayD<f64>, w: &ArrayD<f64>, b: Option<&ArrayD<f64>>, a: &ConvAttrs) -> Option<ArrayD<f64>> {
    let r = w.ndim().checked_sub(2)?;
    if x.ndim() != r + 2
        || a.strides.len() != r
        || a.dilations.len() != r
        || a.pads_begin.len() != r
        || a.pads_end.len() != r
    {
        return None;
    }
    let (n, c, o, cg) = (x.shape()[0], x.shape()[1], w.shape()[0], w.shape()[1]);
    if a.groups == 0 || c != cg * a.groups || o % a.groups != 0 || a.strides.contains(&0) || a.dilations.contains(&0) {
        return None;
    }
    let og = o / a.groups;
    let k: Vec<usize> = w.shape()[2..].to_vec();
    let len: Vec<usize> = x.shape()[2..].to_vec();
    let mut out = vec![n, o];
    for ax in 0..r {
        let span =
            (len[ax] + a.pads_begin[ax] + a.pads_end[ax]).checked_sub(a.dilations[ax] * (k[ax].max(1) - 1) + 1)?;
        out.push(span / a.strides[ax] + 1);
    }
    let work = numel(&out)? as u128 * (cg as u128) * numel(&k)? as u128;
    if work > WORK {
        return None;
    }
    let bias: Vec<f64> = match b {
        Some(b) if b.len() == o => b.iter().copied().collect(),
        Some(_) => return None,
        None => vec![0.0; o],
    };
    let mut y = ArrayD::zeros(IxDyn(&out));
    let taps: Vec<Vec<usize>> = ndarray::indices(IxDyn(&k)).into_iter().map(|t| t.slice().to_vec()).collect();
    for idx in ndarray::indices(IxDyn(&out)) {
        let idx = idx.slice().to_vec();
        let (bi, oc) = (idx[0], idx[1]);
        let g = oc / og;
        let mut acc = bias[oc];
        for ci in 0..cg {
            'tap: for t in &taps {
                let mut xi = vec![bi, g * cg + ci];
                for ax in 0..r {
                    let q = (idx[2 + ax] * a.strides[ax] + t[ax] * a.dilations[ax]) as i64 - a.pads_begin[ax] as i64;
                    if q < 0 || q >= len[ax] as i64 {
                        continue 'tap;
                    }
                    xi.push(q as usize);
                }
                let mut wi = vec![oc, ci];
                wi.extend(t);
                acc += w[IxDyn(&wi)] * x[IxDyn(&xi)];
            }
        }
        y[IxDyn(&idx)] = acc;
    }
    Some(y)
}

/// `Pad` in constant mode: `begin`/`end` amounts per axis (negative ones crop).
pub(crate) fn pad<T: Clone>(x: &ArrayD<T>, begin: &[i64], end: &[i64], value: T) -> Option<ArrayD<T>> {
    let r = x.ndim();
    if begin.len() != r || end.len() != r {
        return None;
    }
    let mut shape = Vec::with_capacity(r);
    for a in 0..r {
        let d = x.shape()[a] as i64 + begin[a] + end[a];
        if d < 0 {
            return None;
        }
        shape.push(d as usize);
    }
    if numel(&shape)? as u128 > WORK {
        return None;
    }
    Some(ArrayD::from_shape_fn(IxDyn(&shape), |i| {
        let mut src = Vec::with_capacity(r);
        for a in 0..r {
            let q = i[a] as i64 - begin[a];
            if q < 0 || q >= x.shape()[a] as i64 {
                return value.clone();
            }
            src.push(q as usize);
        }
        x[IxDyn(&src)].clone()
    }))
}

/// `Expand` to `shape` (numpy broadcast of the two shapes).
pub(crate) fn expand<T: Clone>(x: &ArrayD<T>, shape: &[i64]) -> Option<ArrayD<T>> {
    let s: Vec<usize> = shape.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
    let to = broadcast(x.shape(), &s)?;
    if numel(&to)? as u128 > WORK {
        return None;
    }
    Some(x.broadcast(IxDyn(&to))?.to_owned())
}

/// `Tile` by `repeats` per axis.
pub(crate) fn tile<T: Clone>(x: &ArrayD<T>, repeats: &[i64]) -> Option<ArrayD<T>> {
    if repeats.len() != x.ndim() || repeats.iter().any(|&r| r < 0) {
        return None;
    }
    let shape: Vec<usize> =
        x.shape().iter().zip(repeats).map(|(&d, &r)| d.checked_mul(r as usize)).collect::<Option<_>>()?;
    if numel(&shape)? as u128 > WORK {
        return None;
    }
    Some(ArrayD::from_shape_fn(IxDyn(&shape), |i| {
        let src: Vec<usize> = (0..x.ndim()).map(|a| i[a] % x.shape()[a]).collect();
        x[IxDyn(&src)].clone()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn matmul_broadcasts_batches_and_promotes_vectors() {
        let a = array![[1.0, 2.0], [3.0, 4.0]].into_dyn();
        let b = array![[5.0], [6.0]].into_dyn();
        assert_eq!(matmul(&a, &b).unwrap(), array![[17.0], [39.0]].into_dyn());
        let v = array![1.0, 1.0].into_dyn();
        assert_eq!(matmul(&a, &v).unwrap(), array![3.0, 7.0].into_dyn());
        let batch = ArrayD::from_shape_fn(IxDyn(&[3, 2, 2]), |i| (i[0] + 1) as f64 * a[[i[1], i[2]]]);
        let y = matmul(&batch, &b).unwrap();
        assert_eq!(y.shape(), [3, 2, 1]);
        assert_eq!(y[[2, 1, 0]], 3.0 * 39.0);
    }

    #[test]
    fn einsum_equals_the_products_it_names() {
        // OREPA-style: a weight from a basis and coefficients, 'oi,ihw->ohw' and an implicit 'ij,jk'
        let c = ArrayD::from_shape_fn(IxDyn(&[3, 2]), |i| (i[0] * 2 + i[1]) as f64 - 1.5);
        let basis = ArrayD::from_shape_fn(IxDyn(&[2, 2, 2]), |i| (i[0] * 4 + i[1] * 2 + i[2]) as f64 * 0.5);
        let y = einsum("oi,ihw->ohw", &[c.clone(), basis.clone()]).unwrap();
        for o in 0..3 {
            for h in 0..2 {
                for w in 0..2 {
                    let want: f64 = (0..2).map(|i| c[[o, i]] * basis[[i, h, w]]).sum();
                    assert_eq!(y[[o, h, w]], want);
                }
            }
        }
        let m = einsum("ij,jk", &[c.clone(), c.t().to_owned().into_dyn()]).unwrap();
        assert_eq!(m, matmul(&c, &c.t().to_owned().into_dyn()).unwrap());
        // a repeated index on one side is a diagonal; a summed one is a trace
        let sq = array![[1.0, 2.0], [3.0, 4.0]].into_dyn();
        assert_eq!(einsum("ii->i", std::slice::from_ref(&sq)).unwrap(), array![1.0, 4.0].into_dyn());
        assert_eq!(einsum("ii->", &[sq]).unwrap()[IxDyn(&[])], 5.0);
        assert!(einsum("ij,jk->ik", &[c.clone(), c]).is_none(), "mismatched sizes");
        // a size-1 axis broadcasts (yolov7's RepConv_OREPA: 'oihw,hw->oihw' of [16,3,1,1] and [3,3])
        let w = ArrayD::from_shape_fn(IxDyn(&[2, 1, 1, 1]), |i| i[0] as f64 + 2.0);
        let avg = ArrayD::from_shape_fn(IxDyn(&[3, 3]), |i| (i[0] * 3 + i[1]) as f64);
        let y = einsum("oihw,hw->oihw", &[w, avg.clone()]).unwrap();
        assert_eq!(y.shape(), [2, 1, 3, 3]);
        assert_eq!(y[[1, 0, 2, 1]], 3.0 * avg[[2, 1]]);
    }

    #[test]
    fn conv_of_constants_is_the_direct_sum() {
        // a 1x1 conv applied to a kernel (OREPA's conv of a weight by another): channel mixing
        let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 3, 3]), |i| (i[0] * 27 + i[1] * 9 + i[2] * 3 + i[3]) as f64);
        let w = ArrayD::from_shape_fn(IxDyn(&[4, 3, 1, 1]), |i| (i[0] as f64) - (i[1] as f64) * 0.5);
        let attrs = ConvAttrs {
            groups: 1,
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![0, 0],
            pads_end: vec![0, 0],
        };
        let y = conv(&x, &w, None, &attrs).unwrap();
        assert_eq!(y.shape(), [2, 4, 3, 3]);
        let want: f64 = (0..3).map(|c| w[[3, c, 0, 0]] * x[[1, c, 2, 1]]).sum();
        assert_eq!(y[[1, 3, 2, 1]], want);
        // padded, strided, grouped
        let w = ArrayD::from_elem(IxDyn(&[2, 1, 3, 3]), 1.0);
        let attrs = ConvAttrs {
            groups: 2,
            strides: vec![2, 2],
            dilations: vec![1, 1],
            pads_begin: vec![1, 1],
            pads_end: vec![1, 1],
        };
        let x = ArrayD::from_elem(IxDyn(&[1, 2, 3, 3]), 1.0);
        let y = conv(&x, &w, None, &attrs).unwrap();
        assert_eq!(y.shape(), [1, 2, 2, 2]);
        assert_eq!((y[[0, 0, 0, 0]], y[[0, 1, 1, 1]]), (4.0, 4.0));
    }

    #[test]
    fn pad_expand_and_tile_move_values_as_onnx_says() {
        let x = array![[1.0, 2.0]].into_dyn();
        let p = pad(&x, &[1, 0], &[0, 1], 9.0).unwrap();
        assert_eq!(p, array![[9.0, 9.0, 9.0], [1.0, 2.0, 9.0]].into_dyn());
        assert_eq!(pad(&x, &[0, -1], &[0, 0], 0.0).unwrap(), array![[2.0]].into_dyn());
        assert_eq!(expand(&x, &[2, 1]).unwrap(), array![[1.0, 2.0], [1.0, 2.0]].into_dyn());
        assert_eq!(tile(&x, &[2, 2]).unwrap(), array![[1.0, 2.0, 1.0, 2.0], [1.0, 2.0, 1.0, 2.0]].into_dyn());
    }
}
