//! The geometry of the convolution a region may be: the largest Conv reading x, or the window
//! the region's operators read x through.

use super::region::Region;
use super::Cx;
use crate::graph::{attr_ints, is_op};
use crate::kernel::read::{read_conv_at, read_pad, read_slice};
use crate::kernel::{same_pads, AffineConv};
use std::collections::HashMap;

/// Where the region's output reads its input, per spatial axis: y[j] reads x[j·stride + lo ..=
/// j·stride + hi] (the union over the region's paths).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Win {
    pub stride: i64,
    pub lo: i64,
    pub hi: i64,
    /// the gcd of the distances between the positions read (0: one position)
    pub step: i64,
}

pub(super) fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// The window of tensor `t` in x, from the operators between (Conv, AveragePool, Pad, Slice, and
/// element-wise operators joining paths); `None` when an operator on the way moves positions
/// some other way (Transpose, Reshape, ScatterND, ...).
fn window(cx: &Cx, r: &Region, t: &str, rank: usize, memo: &mut HashMap<String, Option<Vec<Win>>>, depth: usize) -> Option<Vec<Win>> {
    if t == r.x {
        return Some(vec![Win { stride: 1, lo: 0, hi: 0, step: 0 }; rank]);
    }
    if let Some(v) = memo.get(t) {
        return v.clone();
    }
    let v = (|| {
        if depth > 256 {
            return None;
        }
        let p = cx.producer(t)?;
        if !r.dep.contains(&p) {
            return None;
        }
        let n = cx.node(p);
        let inner = |memo: &mut HashMap<String, Option<Vec<Win>>>| window(cx, r, &n.input[0], rank, memo, depth + 1);
        match n.op_type() {
            "Conv" | "AveragePool" => {
                let (k, s, d, pb) = if is_op(n, "Conv") {
                    let (c, _) = read_conv_at(&cx.consts, n, || cx.fixed_spatial(&n.input[0])).ok()?;
                    (c.kernel().to_vec(), c.strides.clone(), c.dilations.clone(), c.pads_begin.clone())
                } else {
                    let ks: Vec<usize> = attr_ints(n, "kernel_shape")?.iter().map(|&v| v as usize).collect();
                    let get = |name: &str, d: i64| attr_ints(n, name).unwrap_or_else(|| vec![d; ks.len()]);
                    let (s, d) = (get("strides", 1), get("dilations", 1));
                    let pb = match crate::graph::attr_string(n, "auto_pad").unwrap_or_default().as_str() {
                        "" | "NOTSET" => {
                            let p = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 2 * ks.len()]);
                            p[..p.len() / 2].to_vec()
                        }
                        "VALID" => vec![0; ks.len()],
                        same @ ("SAME_UPPER" | "SAME_LOWER") => {
                            // (the same at every input size at stride 1)
                            let len = match s.iter().all(|&v| v == 1) {
                                true => vec![1; ks.len()],
                                false => cx.fixed_spatial(&n.input[0])?,
                            };
                            if len.len() != ks.len() || s.len() != ks.len() || d.len() != ks.len() {
                                return None;
                            }
                            (0..ks.len())
                                .map(|a| same_pads(len[a] as i64, ks[a] as i64, s[a], d[a], same == "SAME_UPPER").0)
                                .collect()
                        }
                        _ => return None,
                    };
                    (ks, s.iter().map(|&v| v as usize).collect(), d.iter().map(|&v| v as usize).collect(), pb)
                };
                let w = inner(memo)?;
                if k.len() != rank || s.len() != rank || d.len() != rank || pb.len() != rank {
                    return None;
                }
                Some(
                    (0..rank)
                        .map(|a| {
                            let (si, lo0) = (w[a].stride, -pb[a] * w[a].stride);
                            let taps = if k[a] > 1 { d[a] as i64 * si } else { 0 };
                            Win {
                                stride: s[a] as i64 * si,
                                lo: lo0 + w[a].lo,
                                hi: lo0 + (d[a] * (k[a] - 1)) as i64 * si + w[a].hi,
                                step: gcd(taps, w[a].step),
                            }
                        })
                        .collect(),
                )
            }
            "Pad" | "Slice" => {
                let (b, _) = if is_op(n, "Pad") {
                    let (pb, pe) = read_pad(&cx.consts, n, rank + 2, cx.opset).ok()?;
                    (pb.iter().map(|v| -v).collect::<Vec<_>>(), pe)
                } else {
                    read_slice(&cx.consts, n, rank + 2, cx.opset).ok()?
                };
                let w = inner(memo)?;
                // y[j] reads the inner tensor at j + b
                Some(
                    (0..rank)
                        .map(|a| Win { lo: w[a].lo + b[a] * w[a].stride, hi: w[a].hi + b[a] * w[a].stride, ..w[a] })
                        .collect(),
                )
            }
            "BatchNormalization" | "Identity" | "Cast" | "Neg" | "Mul" | "Div" | "Add" | "Sub" | "Sum" => {
                let mut acc: Option<Vec<Win>> = None;
                for i in n.input.iter().filter(|i| !i.is_empty()) {
                    if cx.consts.value(i).is_ok() || cx.ix.constant(cx.g, i).is_some() {
                        continue;
                    }
                    let w = window(cx, r, i, rank, memo, depth + 1)?;
                    acc = Some(match acc {
                        None => w,
                        Some(a) => {
                            if a.iter().zip(&w).any(|(p, q)| p.stride != q.stride) {
                                return None;
                            }
                            a.iter().zip(&w).map(|(p, q)| union(p, q)).collect()
                        }
                    });
                }
                acc
            }
            _ => None,
        }
    })();
    memo.insert(t.to_string(), v.clone());
    v
}

/// The geometry of the convolution a region may be: kernel, strides, dilations, begin pads, and
/// the Conv whose node it takes (with its groups and output channels), if one reads x.
pub(super) struct Geometry {
    pub(super) kernel: Vec<usize>,
    pub(super) strides: Vec<usize>,
    pub(super) dilations: Vec<usize>,
    pub(super) pads_begin: Vec<i64>,
    /// `None`: from the region's output size
    pub(super) pads_end: Option<Vec<i64>>,
    pub(super) base: Option<(usize, AffineConv)>,
}

/// The largest Conv reading x (by kernel volume), whose node the recovered Conv takes.
pub(super) fn base_conv(cx: &Cx, r: &Region, rank: usize) -> Option<(usize, AffineConv)> {
    let mut base: Option<(usize, AffineConv)> = None;
    for &p in &r.dep {
        let n = cx.node(p);
        if is_op(n, "Conv") && n.input[0] == r.x {
            // a conv whose weight is computed (e.g. DBB's weight + identity) is evaluated, not read
            let Ok((k, _)) = read_conv_at(&cx.consts, n, || cx.fixed_spatial(&r.x)) else { continue };
            let vol: usize = k.kernel().iter().product();
            if k.rank() == rank && base.as_ref().is_none_or(|(_, b)| vol > b.kernel().iter().product()) {
                base = Some((p, k));
            }
        }
    }
    base
}

/// The geometry: the base Conv's (see [`base_conv`]), or else the window the region's operators
/// give. Where an operator on the way gives no window (Transpose, Reshape, ScatterND), `probe`
/// is asked for the window the region's responses show at the given strides (the base Conv's;
/// `None` when it cannot tell).
pub(super) fn geometry(
    cx: &Cx,
    r: &Region,
    y: &str,
    rank: usize,
    base: Option<(usize, AffineConv)>,
    probe: &dyn Fn(&[i64]) -> Option<Vec<Win>>,
) -> Option<Geometry> {
    let w = window(cx, r, y, rank, &mut HashMap::new(), 0);
    if let Some((p, b)) = base {
        // the Conv's own geometry, unless the region's operators read past its window (then
        // their union, undilated)
        let own: Vec<Win> = (0..rank)
            .map(|a| {
                let lo = -b.pads_begin[a];
                let (k, d) = (b.kernel()[a] as i64, b.dilations[a] as i64);
                Win { stride: b.strides[a] as i64, lo, hi: lo + d * (k - 1), step: if k > 1 { d } else { 0 } }
            })
            .collect();
        let w = w.or_else(|| probe(&own.iter().map(|w| w.stride).collect::<Vec<_>>()));
        // inside the Conv's window, on its taps
        let inside = |w: &[Win]| {
            (0..rank).all(|a| {
                let (o, d) = (own[a], b.dilations[a] as i64);
                w[a].lo >= o.lo && w[a].hi <= o.hi && (w[a].lo - o.lo) % d == 0 && w[a].step % d == 0
            })
        };
        let same_stride = |w: &[Win]| (0..rank).all(|a| w[a].stride == own[a].stride);
        match w.filter(|w| same_stride(w) && !inside(w)) {
            None => {
                return Some(Geometry {
                    kernel: b.kernel().to_vec(),
                    strides: b.strides.clone(),
                    dilations: b.dilations.clone(),
                    pads_begin: b.pads_begin.clone(),
                    pads_end: Some(b.pads_end.clone()),
                    base: Some((p, b)),
                })
            }
            Some(w) => {
                let w: Vec<Win> = (0..rank).map(|a| union(&w[a], &own[a])).collect();
                return Some(Geometry { base: Some((p, b)), ..of_window(&w) });
            }
        }
    }
    Some(of_window(&w?))
}

/// Two windows' union (the same stride).
fn union(p: &Win, q: &Win) -> Win {
    Win { stride: p.stride, lo: p.lo.min(q.lo), hi: p.hi.max(q.hi), step: gcd(gcd(p.step, q.step), p.lo - q.lo) }
}

/// The geometry of a window: dilated by its step, starting at most at position 0 (the end pads
/// from the region's output size).
fn of_window(w: &[Win]) -> Geometry {
    let lo: Vec<i64> = w.iter().map(|w| w.lo.min(0)).collect();
    let dil: Vec<i64> = w.iter().zip(&lo).map(|(w, &l)| gcd(w.step, w.lo - l).max(1)).collect();
    Geometry {
        kernel: (0..w.len()).map(|a| ((w[a].hi - lo[a]) / dil[a] + 1).max(1) as usize).collect(),
        strides: w.iter().map(|w| w.stride.max(1) as usize).collect(),
        dilations: dil.iter().map(|&d| d as usize).collect(),
        pads_begin: lo.iter().map(|l| -l).collect(),
        pads_end: None,
        base: None,
    }
}
