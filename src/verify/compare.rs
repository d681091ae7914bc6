//! Comparing outputs element by element, in f64, aggregated over samples, and judging them by
//! the chosen criterion (see the module docs of [`super`]).

use super::report::OutputReport;
use super::{Criterion, Stat};
use crate::tract::{dt_name, errors::chain_msg};
use tract_onnx::prelude::*;

/// The denominator floor of relative differences: `|a - b| / max(|a|, TINY)`
/// (the smallest positive normal f32, numpy's `finfo(float32).tiny`).
pub const REL_TINY: f64 = f32::MIN_POSITIVE as f64;

/// One output's comparison, accumulated over samples.
#[derive(Default)]
pub(crate) struct Acc {
    shape: Vec<usize>,
    dtype: String,
    max_abs: f64,
    max_rel: f64,
    sum_means: f64,
    n_means: usize,
    worst: Option<(usize, Vec<usize>, f64, f64)>,
    max_ref: f64,
    min_rtol: f64,
    nan_a: usize,
    nan_b: usize,
    /// elements outside `atol + rtol·|a|` (non-finite disagreements included)
    failing: usize,
    /// elements where one side is NaN or infinite and the other is not the same
    nonfinite: usize,
    /// per sample: the statistic of |a − b| and of |a − b|/|a|
    stat_abs: Vec<f64>,
    stat_rel: Vec<f64>,
    /// per sample: the largest statistic of |a − ã| over the perturbed references
    noise: Vec<f64>,
    /// per sample: the statistic of |golden − reference| (with golden outputs)
    reference_error: Vec<f64>,
    problems: Vec<String>,
}

/// The values of a tensor as f64, in row-major order.
fn values_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    let c = t.cast_to::<f64>().map_err(|e| chain_msg(&e))?;
    let v = c.try_as_plain_ram().map_err(|e| chain_msg(&e))?;
    Ok(v.as_slice::<f64>().map_err(|e| chain_msg(&e))?.to_vec())
}

/// How many elements of an output can show the weights' movement: its non-zero ones (an element
/// that is exactly zero, cut off by a Relu or on a zero border, moves with no weight).
pub(crate) fn moving_elements(t: &Tensor) -> usize {
    values_f64(t).map_or(t.len(), |v| v.iter().filter(|&&x| x != 0.0).count())
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, d) in shape.iter().enumerate().rev() {
        if *d > 0 {
            idx[i] = flat % d;
            flat /= d;
        }
    }
    idx
}

impl Stat {
    /// The statistic of `v` (0 for no values); `Elementwise` is the maximum.
    pub fn of(self, v: &mut [f64]) -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        match self {
            Stat::Max | Stat::Elementwise => v.iter().fold(0.0, |m, &x| m.max(x)),
            Stat::Mean => v.iter().sum::<f64>() / v.len() as f64,
            Stat::Median => quantile(v, 0.5),
            Stat::Quantile(q) => quantile(v, q),
        }
    }
}

/// The `q` quantile of `v` (linear between the two nearest ranks, as numpy's default).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// |a − b| and |a − b| / max(|a|, tiny) for the pairs where both are finite; the pairs where
/// exactly one is non-finite, or both are but differ, are counted instead.
fn differences(va: &[f64], vb: &[f64]) -> (Vec<f64>, Vec<f64>, usize) {
    let (mut abs, mut rel, mut bad) = (Vec::with_capacity(va.len()), Vec::with_capacity(va.len()), 0);
    for (&x, &y) in va.iter().zip(vb) {
        if x.is_finite() && y.is_finite() {
            let d = (x - y).abs();
            abs.push(d);
            rel.push(d / x.abs().max(REL_TINY));
        } else if !(x.is_nan() && y.is_nan() || x == y) {
            bad += 1;
        }
    }
    (abs, rel, bad)
}

impl Acc {
    /// Compare one sample: `a` is what the candidate is judged against (the reference's output,
    /// or the golden output), `b` the candidate's. `atol`/`rtol` are the output's tolerances
    /// (the statistics a user may want are computed whatever the criterion).
    pub fn compare(&mut self, sample: usize, a: &Tensor, b: &Tensor, atol: f64, rtol: f64, stat: Stat) {
        self.shape = a.shape().to_vec();
        self.dtype = dt_name(a.datum_type());
        if a.shape() != b.shape() {
            self.problems.push(format!(
                "shape mismatch in sample {sample}: reference {:?}, candidate {:?}",
                a.shape(),
                b.shape()
            ));
            self.max_abs = f64::INFINITY;
            self.max_rel = f64::INFINITY;
            self.min_rtol = f64::INFINITY;
            return;
        }
        // (golden outputs are often float64: that is no difference worth a note)
        if a.datum_type() != b.datum_type() && a.datum_type() != DatumType::F64 {
            let p = format!(
                "dtype differs: reference {}, candidate {} (compared in float64)",
                dt_name(a.datum_type()),
                dt_name(b.datum_type())
            );
            if !self.problems.contains(&p) {
                self.problems.push(p);
            }
        }
        let (va, vb) = match (values_f64(a), values_f64(b)) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => {
                self.problems.push(format!("cannot compare as numbers: {e}"));
                self.max_abs = f64::NAN;
                return;
            }
        };
        let mut sum = 0.0;
        let mut count = 0usize;
        for (i, (&x, &y)) in va.iter().zip(&vb).enumerate() {
            let (xf, yf) = (x.is_finite(), y.is_finite());
            self.nan_a += x.is_nan() as usize;
            self.nan_b += y.is_nan() as usize;
            if !xf || !yf {
                // non-finite values agree only when both are NaN or the same infinity
                if !(x.is_nan() && y.is_nan() || x == y) {
                    self.nonfinite += 1;
                    self.failing += 1;
                }
                if x.is_infinite() {
                    self.max_ref = f64::INFINITY;
                }
                continue;
            }
            let diff = (x - y).abs();
            let ax = x.abs();
            self.max_ref = self.max_ref.max(ax);
            sum += diff;
            count += 1;
            let rel = diff / ax.max(REL_TINY);
            if rel > self.max_rel {
                self.max_rel = rel;
            }
            if self.worst.is_none() || diff > self.max_abs {
                self.max_abs = diff;
                self.worst = Some((sample, unravel(i, a.shape()), x, y));
            }
            if !(diff == 0.0 || diff <= atol + rtol * ax) {
                self.failing += 1;
            }
            if diff > atol {
                let need = if ax > 0.0 { (diff - atol) / ax } else { f64::INFINITY };
                if need > self.min_rtol {
                    self.min_rtol = need;
                }
            }
        }
        self.sum_means += if count > 0 { sum / count as f64 } else { 0.0 };
        self.n_means += 1;
        let (mut abs, mut rel, _) = differences(&va, &vb);
        self.stat_abs.push(stat.of(&mut abs));
        self.stat_rel.push(stat.of(&mut rel));
    }

    /// One perturbed reference `p` of sample `sample` against the reference `a`: how far a
    /// copy of the reference with every weight moved by one rounding lands.
    pub fn noise(&mut self, sample: usize, a: &Tensor, p: &Tensor, stat: Stat) {
        let n = match (values_f64(a), values_f64(p)) {
            (Ok(va), Ok(vp)) if a.shape() == p.shape() => stat.of(&mut differences(&va, &vp).0),
            _ => return,
        };
        if self.noise.len() <= sample {
            self.noise.resize(sample + 1, 0.0);
        }
        self.noise[sample] = self.noise[sample].max(n);
    }

    /// With golden outputs: how far the reference model `r` is from the golden `g`.
    pub fn reference_error(&mut self, g: &Tensor, r: &Tensor, stat: Stat) {
        if let (Ok(vg), Ok(vr)) = (values_f64(g), values_f64(r)) {
            if g.shape() == r.shape() {
                let mut abs = differences(&vg, &vr).0;
                self.reference_error.push(stat.of(&mut abs));
            }
        }
    }
}

/// How an output is judged.
pub(crate) struct Judge {
    pub criterion: Criterion,
    pub factor: f64,
    pub atol: f64,
    pub rtol: f64,
    pub stat: Stat,
    /// the floor of the noise criterion per unit of max|reference|: the unit roundoff of the
    /// output's precision times the square root of the reference's depth to this output
    pub unit: f64,
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m: f64, &x| m.max(x))
}

pub(crate) fn finish(name: &str, acc: Acc, j: &Judge) -> OutputReport {
    let mut problems = acc.problems;
    if acc.nonfinite > 0 {
        problems.insert(
            0,
            format!(
                "non-finite values disagree at {} element(s) (NaN: {} in the reference, {} in the candidate)",
                acc.nonfinite, acc.nan_a, acc.nan_b
            ),
        );
    }
    let hard_fail = acc.nonfinite > 0
        || problems.iter().any(|p| p.starts_with("shape mismatch") || p.starts_with("cannot compare"));
    let (worst_sample, worst_index, wa, wb) = acc.worst.unwrap_or((0, vec![], f64::NAN, f64::NAN));
    let error = max_of(&acc.stat_abs);
    let (noise, floor, ratio, within) = match j.criterion {
        Criterion::Noise => {
            let floor = j.unit * if acc.max_ref.is_finite() { acc.max_ref } else { 0.0 };
            let noise = max_of(&acc.noise).max(max_of(&acc.reference_error));
            let scale = noise.max(floor);
            let ratio = if error == 0.0 { 0.0 } else { error / scale };
            (Some(noise), Some(floor), Some(ratio), ratio <= j.factor)
        }
        Criterion::Tolerance => {
            let within = match j.stat {
                Stat::Elementwise => acc.failing == 0,
                _ => acc.stat_abs.iter().zip(&acc.stat_rel).all(|(&a, &r)| a <= j.atol || r <= j.rtol),
            };
            (None, None, None, within)
        }
    };
    OutputReport {
        name: name.to_string(),
        shape: acc.shape,
        dtype: acc.dtype,
        max_abs_diff: acc.max_abs,
        max_rel_diff: acc.max_rel,
        mean_abs_diff: if acc.n_means > 0 { acc.sum_means / acc.n_means as f64 } else { f64::NAN },
        worst_index,
        worst_sample,
        worst_reference: wa,
        worst_candidate: wb,
        max_abs_reference: acc.max_ref,
        min_atol: acc.max_abs,
        min_rtol: acc.min_rtol,
        nan_reference: acc.nan_a,
        nan_candidate: acc.nan_b,
        failing_elements: acc.failing,
        error,
        noise,
        noise_floor: floor,
        reference_error: (!acc.reference_error.is_empty()).then(|| max_of(&acc.reference_error)),
        ratio,
        atol: j.atol,
        rtol: j.rtol,
        passed: !hard_fail && within,
        part: None,
        problem: if problems.is_empty() { None } else { Some(problems.join("; ")) },
    }
}
