//! The convolution a region computes, recovered from its responses (in tract, in float64) to zero
//! and to impulses, then checked against the region on random inputs.

use super::region::Region;
use super::submodel::submodel;
use super::window::{base_conv, gcd, geometry, Win};
use super::{Cx, Reason, RegionReason};
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;
use crate::tract::RegionPlan;
use ndarray::{Array1, ArrayD, Axis, IxDyn};

/// The most weights a kernel the general path recovers may hold (2^26: 512 MiB in float64; a
/// 2048x2048 3x3 conv holds 37.7 M).
const KERNEL_LIMIT: u128 = 1 << 26;

/// The multi-indices of a shape, in row-major order.
fn indices(shape: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
    let n: usize = shape.iter().product();
    (0..n).map(move |mut f| {
        let mut v = vec![0; shape.len()];
        for a in (0..shape.len()).rev() {
            v[a] = f % shape[a];
            f /= shape[a];
        }
        v
    })
}

/// The region evaluated on an input.
type Eval<'a> = dyn Fn(&ArrayD<f64>) -> Result<ArrayD<f64>, RegionReason> + 'a;

/// The window the region reads its input through, as its responses show it at the given strides:
/// an impulse on every input channel at one position near the centre, once per stride phase;
/// output position j responding to position q is a tap at q − j·s. `None` when nothing
/// responds. (Only a first guess: the kernel recovered from it is checked in full.)
fn probe_window(
    eval: &Eval,
    y0: &ArrayD<f64>,
    shape: &[usize],
    ys: &[usize],
    strides: &[i64],
    eps: f64,
) -> Option<Vec<Win>> {
    let rank = shape.len() - 2;
    if ys.len() != rank + 2 || strides.len() != rank || strides.iter().any(|&s| s < 1) {
        return None;
    }
    let phases: Vec<usize> = strides.iter().zip(&shape[2..]).map(|(&s, &l)| (s as usize).min(l)).collect();
    let mut taps: Vec<std::collections::BTreeSet<i64>> = vec![Default::default(); rank];
    for phase in indices(&phases) {
        let q: Vec<usize> = (0..rank).map(|a| ((shape[2 + a] / 2) + phase[a]).min(shape[2 + a] - 1)).collect();
        let mut x = ArrayD::zeros(IxDyn(shape));
        for ci in 0..shape[1] {
            let mut at = vec![0, ci];
            at.extend(&q);
            x[IxDyn(&at)] = 1.0;
        }
        let resp = eval(&x).ok()? - y0;
        let tol = eps * resp.iter().fold(y0.iter().fold(1f64, |m, v| m.max(v.abs())), |m, v| m.max(v.abs()));
        for pos in indices(&ys[2..]) {
            let mut at = vec![0, 0];
            at.extend(&pos);
            let hit = (0..ys[1]).any(|oc| {
                at[1] = oc;
                resp[IxDyn(&at)].abs() > tol
            });
            if hit {
                for a in 0..rank {
                    taps[a].insert(q[a] as i64 - pos[a] as i64 * strides[a]);
                }
            }
        }
    }
    if taps.iter().any(|t| t.is_empty()) {
        return None;
    }
    Some(
        (0..rank)
            .map(|a| {
                let (lo, hi) = (*taps[a].first().expect("a tap"), *taps[a].last().expect("a tap"));
                let step = taps[a].iter().fold(0, |g, &t| gcd(g, t - lo));
                Win { stride: strides[a], lo, hi, step }
            })
            .collect(),
    )
}

/// The convolution the region computes, with the node whose name and attributes it takes.
pub(super) fn recover(cx: &Cx, r: &Region, y: &str, ft: FloatType) -> Result<(AffineConv, Option<usize>), Reason> {
    let xshape = cx
        .shape_of(&r.x)
        .ok_or_else(|| RegionReason::SizeUnknown { tensor: r.x.clone(), why: cx.facts().incomplete.clone() })?;
    if xshape.len() < 3 {
        return Err(RegionReason::InputShape(xshape).into());
    }
    let rank = xshape.len() - 2;
    let c = xshape[1];
    let base = base_conv(cx, r, rank);
    if base.as_ref().is_some_and(|(_, b)| b.in_channels() != c) {
        return Err(RegionReason::InputShape(xshape).into());
    }
    // (evaluated at the model's own batch: an export's Reshape constants may fix it)
    let shape = xshape.clone();
    let batch = shape[0];
    let len: Vec<i64> = shape[2..].iter().map(|&d| d as i64).collect();
    let numel: usize = shape.iter().product();
    // how big the region's tensors may grow (never from the analysed shapes, which an absurd Pad
    // inflates too): the input times the channel ratio of the Conv reading it
    let bound = numel.saturating_mul(base.as_ref().map_or(4, |(_, b)| b.out_channels().div_ceil(c).max(1)));
    let plan = RegionPlan::new(&submodel(cx, r, y, &shape)?, &shape, bound).map_err(RegionReason::CannotEvaluate)?;
    let eval = |x: &ArrayD<f64>| plan.eval(x).map_err(RegionReason::Tract);
    // the output's shape is checked before anything is evaluated (a Pad of the batch axis can
    // make it thousands of times the Conv's output: found by fuzzing, ~1 s a region)
    let ys = plan.output_shape().to_vec();
    let o = ys.get(1).copied().unwrap_or(0);
    // (before any evaluation, the probes' included: one sample out per sample in)
    if ys.len() != rank + 2 || ys[0] != batch {
        let mut want = vec![batch as i64, o as i64];
        want.extend(ys.iter().skip(2).map(|&v| v as i64));
        return Err(RegionReason::OutputShape { got: ys, want }.into());
    }
    // Evaluated in float64, the region differs from a convolution only by the rounding of its
    // own stored constants (DBB's pad value is stored rounded to the model's dtype, the BN it
    // stands for is computed): a few units of the dtype's precision, never a float32 evaluation's.
    let eps = 16.0 * ft_eps(ft);
    let y0 = std::cell::OnceCell::new();
    let zero = || -> Result<&ArrayD<f64>, Reason> {
        if y0.get().is_none() {
            let _ = y0.set(eval(&ArrayD::zeros(IxDyn(&shape)))?);
        }
        Ok(y0.get().expect("set above"))
    };
    // (only at a Conv's stride: a region without one, whose operators give no window, may be a
    // token mixer or an FC on rearranged positions, not a convolution)
    let has_base = base.is_some();
    let probe = |strides: &[i64]| -> Option<Vec<Win>> {
        if !has_base {
            return None;
        }
        probe_window(&eval, zero().ok()?, &shape, &ys, strides, eps)
    };
    let geo = geometry(cx, r, y, rank, base, &probe).ok_or(RegionReason::NoConv)?;
    let (k, s, d, pb) = (&geo.kernel, &geo.strides, &geo.dilations, &geo.pads_begin);
    // the end pads: the Conv's, or what gives the region's output size
    let pe: Vec<i64> = match &geo.pads_end {
        Some(pe) => pe.clone(),
        None => {
            if ys.len() != rank + 2 {
                return Err(RegionReason::Geometry.into());
            }
            (0..rank)
                .map(|a| (ys[a + 2] as i64 - 1) * s[a] as i64 + (d[a] * (k[a] - 1)) as i64 + 1 - len[a] - pb[a])
                .collect()
        }
    };
    if pe.iter().chain(pb).any(|&p| p < 0) {
        return Err(RegionReason::Geometry.into());
    }
    let out: Vec<i64> =
        (0..rank).map(|a| (len[a] + pb[a] + pe[a] - (d[a] * (k[a] - 1)) as i64 - 1).div_euclid(s[a] as i64) + 1).collect();
    let mut want = vec![batch as i64, o as i64];
    want.extend(&out);
    // (the region's output channels, whatever Convs lie inside: ECBSR's widening 1x1 first)
    if ys.iter().map(|&v| v as i64).ne(want.iter().copied()) || out.iter().any(|&v| v < 1) {
        return Err(RegionReason::OutputShape { got: ys, want }.into());
    }
    let y0 = zero()?;
    let scale0 = y0.iter().fold(1f64, |m, v| m.max(v.abs()));
    let centre: Vec<i64> = out.iter().map(|&v| v / 2).collect();
    let mut bias = Array1::zeros(o);
    for oc in 0..o {
        let plane = y0.index_axis(Axis(1), oc);
        // the value inside (at the borders a padding may hold a stored, rounded value)
        let mut at = vec![0];
        at.extend(centre.iter().map(|&v| v as usize));
        let v = plane[IxDyn(&at)];
        if plane.iter().any(|&u| (u - v).abs() > eps * scale0) {
            return Err(RegionReason::BiasNotConstant.into());
        }
        bias[oc] = v;
    }
    // impulses, per input channel: at the centre, and wherever a tap the centre cannot show
    // (a stride phase, a tap past the output's edge) is seen
    let mut wshape = vec![o, c];
    wshape.extend(k.iter());
    // a tap is seen only where some output position reads a real input through it, so a kernel
    // longer than outputs x inputs on an axis cannot be probed; and the weights are bounded
    // before they are allocated (a huge stride and padding keep the output small while the
    // kernel grows: found by fuzzing)
    if (0..rank).any(|a| k[a] as u128 > out[a] as u128 * len[a].max(0) as u128) {
        return Err(RegionReason::InputTooSmall.into());
    }
    let weights = wshape.iter().fold(1u128, |n, &v| n.saturating_mul(v as u128));
    if weights > KERNEL_LIMIT {
        return Err(RegionReason::KernelTooBig { weights }.into());
    }
    let mut weight = ArrayD::zeros(IxDyn(&wshape));
    let mut seen = ArrayD::from_elem(IxDyn(&wshape[1..]), false);
    let out_u: Vec<usize> = out.iter().map(|&v| v as usize).collect();
    let mut probes: std::collections::BTreeSet<Vec<i64>> = std::collections::BTreeSet::new();
    for t in indices(k) {
        let mut q = Vec::with_capacity(rank);
        for a in 0..rank {
            let (sa, tap) = (s[a] as i64, (t[a] * d[a]) as i64 - pb[a]);
            // output position o reads input o·s + tap: the one nearest the centre with 0 <= q < L
            let lo_o = (-tap).div_euclid(sa) + i64::from((-tap).rem_euclid(sa) != 0);
            let hi_o = (len[a] - 1 - tap).div_euclid(sa);
            let (lo_o, hi_o) = (lo_o.max(0), hi_o.min(out[a] - 1));
            if lo_o > hi_o {
                return Err(RegionReason::InputTooSmall.into());
            }
            let o_a = centre[a].clamp(lo_o, hi_o);
            q.push(o_a * sa + tap);
        }
        probes.insert(q);
    }
    for ci in 0..c {
        for q in &probes {
            let mut x = ArrayD::zeros(IxDyn(&shape));
            let mut at = vec![0, ci];
            at.extend(q.iter().map(|&v| v as usize));
            x[IxDyn(&at)] = 1.0;
            let resp = eval(&x)? - y0;
            let tol = eps * resp.iter().fold(scale0, |m, v| m.max(v.abs()));
            // the impulse is in sample 0: no other sample may see it
            if resp.axis_iter(Axis(0)).skip(1).any(|r| r.iter().any(|v| v.abs() > tol)) {
                return Err(RegionReason::MixesSamples.into());
            }
            for pos in indices(&out_u) {
                // the tap of position `pos` that reads q, if it is one
                let tap: Option<Vec<usize>> = (0..rank)
                    .map(|a| {
                        let t = q[a] - pos[a] as i64 * s[a] as i64 + pb[a];
                        let dd = d[a] as i64;
                        (t >= 0 && t % dd == 0 && t / dd < k[a] as i64).then_some((t / dd) as usize)
                    })
                    .collect();
                for oc in 0..o {
                    let mut ri = vec![0, oc];
                    ri.extend(&pos);
                    let v = resp[IxDyn(&ri)];
                    match &tap {
                        Some(t) => {
                            let mut wi = vec![oc, ci];
                            wi.extend(t);
                            weight[IxDyn(&wi)] = v;
                            let mut si = vec![ci];
                            si.extend(t);
                            seen[IxDyn(&si)] = true;
                        }
                        None if v.abs() > tol => return Err(RegionReason::ReadsOutsideWindow.into()),
                        None => {}
                    }
                }
            }
        }
    }
    if seen.iter().any(|&v| !v) {
        return Err(RegionReason::InputTooSmall.into());
    }
    let groups = groups_of(&weight, geo.base.as_ref().filter(|(_, b)| b.out_channels() == o).map(|(_, b)| b.groups));
    let weight = if groups > 1 {
        let (og, cg) = (o / groups, c / groups);
        let mut gshape = wshape.clone();
        gshape[1] = cg;
        let mut gw = ArrayD::zeros(IxDyn(&gshape));
        for oc in 0..o {
            let g0 = (oc / og) * cg;
            gw.index_axis_mut(Axis(0), oc).assign(&weight.index_axis(Axis(0), oc).slice_axis(Axis(0), (g0..g0 + cg).into()));
        }
        gw
    } else {
        weight
    };
    let conv = AffineConv::new(weight, Some(bias), groups, s.clone(), d.clone(), pb.clone(), pe);
    // check on random inputs (borders included) against the region itself
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2 {
        let x: ArrayD<f64> = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.random_range(-1.0..1.0));
        let want = eval(&x)?;
        let got = conv.apply(&x);
        let mag = want.iter().fold(1f64, |a, v| a.max(v.abs()));
        let diff = want.iter().zip(got.iter()).fold(0f64, |a, (p, q)| a.max((p - q).abs()));
        if got.shape() != want.shape() || diff > 4.0 * eps * mag {
            return Err(RegionReason::NotRecovered { max_diff: diff }.into());
        }
    }
    Ok((conv, geo.base.map(|(p, _)| p)))
}

/// The precision of a float type (the distance from 1 to the next value).
fn ft_eps(ft: FloatType) -> f64 {
    match ft {
        FloatType::F64 => f64::EPSILON,
        FloatType::F32 => f32::EPSILON as f64,
        FloatType::F16 => 2f64.powi(-10),
        FloatType::BF16 => 2f64.powi(-7),
    }
}

/// The groups of a dense kernel `[O, C, k...]`: the Conv's own when the kernel is block-diagonal
/// with them, else the most blocks it is block-diagonal with (1 when it is dense).
fn groups_of(w: &ArrayD<f64>, hint: Option<usize>) -> usize {
    let (o, c) = (w.shape()[0], w.shape()[1]);
    let diagonal = |g: usize| {
        let (og, cg) = (o / g, c / g);
        (0..o).all(|oc| (0..c).all(|ci| ci / cg == oc / og || w.index_axis(Axis(0), oc).index_axis(Axis(0), ci).iter().all(|&v| v == 0.0)))
    };
    if let Some(g) = hint.filter(|&g| g > 1 && o % g == 0 && c % g == 0 && diagonal(g)) {
        return g;
    }
    if hint.is_some() {
        return 1;
    }
    (1..=o.min(c)).rev().find(|&g| o % g == 0 && c % g == 0 && diagonal(g)).unwrap_or(1)
}
