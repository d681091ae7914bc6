//! Comparing the two models' outputs element by element, in f64, aggregated over samples.

use super::report::OutputReport;
use crate::tract::{dt_name, errors::chain_msg};
use tract_onnx::prelude::*;

/// The denominator floor of relative differences: `|a - b| / max(|a|, TINY)`
/// (the smallest positive normal f32, numpy's `finfo(float32).tiny`).
pub const REL_TINY: f64 = f32::MIN_POSITIVE as f64;

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
    failing: usize,
    problems: Vec<String>,
}

/// The values of a tensor as f64, in row-major order.
fn values_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    let c = t.cast_to::<f64>().map_err(|e| chain_msg(&e))?;
    let v = c.try_as_plain_ram().map_err(|e| chain_msg(&e))?;
    Ok(v.as_slice::<f64>().map_err(|e| chain_msg(&e))?.to_vec())
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

pub(crate) fn compare_into(acc: &mut Acc, sample: usize, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    acc.shape = a.shape().to_vec();
    acc.dtype = dt_name(a.datum_type());
    if a.shape() != b.shape() {
        acc.problems.push(format!(
            "shape mismatch in sample {sample}: reference {:?}, candidate {:?}",
            a.shape(),
            b.shape()
        ));
        acc.max_abs = f64::INFINITY;
        acc.max_rel = f64::INFINITY;
        acc.min_rtol = f64::INFINITY;
        return;
    }
    if a.datum_type() != b.datum_type() {
        let p = format!(
            "dtype differs: reference {}, candidate {} (compared in float64)",
            dt_name(a.datum_type()),
            dt_name(b.datum_type())
        );
        if !acc.problems.contains(&p) {
            acc.problems.push(p);
        }
    }
    let (va, vb) = match (values_f64(a), values_f64(b)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            acc.problems.push(format!("cannot compare as numbers: {e}"));
            acc.max_abs = f64::NAN;
            return;
        }
    };
    let mut sum = 0.0;
    let mut count = 0usize;
    for (i, (&x, &y)) in va.iter().zip(&vb).enumerate() {
        let (xn, yn) = (x.is_nan(), y.is_nan());
        if xn || yn {
            acc.nan_a += xn as usize;
            acc.nan_b += yn as usize;
            acc.failing += 1;
            continue;
        }
        let diff = if x == y { 0.0 } else { (x - y).abs() }; // equal infinities: 0
        let ax = x.abs();
        if ax.is_finite() {
            acc.max_ref = acc.max_ref.max(ax);
        } else {
            acc.max_ref = f64::INFINITY;
        }
        sum += diff;
        count += 1;
        let rel = if diff.is_infinite() { f64::INFINITY } else { diff / ax.max(REL_TINY) };
        if rel > acc.max_rel || rel.is_nan() {
            acc.max_rel = rel;
        }
        if acc.worst.is_none() || diff > acc.max_abs {
            acc.max_abs = diff;
            acc.worst = Some((sample, unravel(i, a.shape()), x, y));
        }
        // (diff == 0 first: equal infinities with rtol = 0 would give 0 <= NaN)
        let within = diff == 0.0 || diff <= atol + rtol * ax;
        if !within {
            acc.failing += 1;
        }
        if diff > atol {
            let need = if ax > 0.0 && diff.is_finite() { (diff - atol) / ax } else { f64::INFINITY };
            if need > acc.min_rtol || need.is_nan() {
                acc.min_rtol = need;
            }
        }
    }
    acc.sum_means += if count > 0 { sum / count as f64 } else { 0.0 };
    acc.n_means += 1;
}

pub(crate) fn finish(name: &str, acc: Acc) -> OutputReport {
    let mut problems = acc.problems;
    if acc.nan_a > 0 || acc.nan_b > 0 {
        problems.insert(0, format!("NaN values: {} in the reference, {} in the candidate", acc.nan_a, acc.nan_b));
    }
    let hard_fail = acc.nan_a > 0
        || acc.nan_b > 0
        || problems.iter().any(|p| p.starts_with("shape mismatch") || p.starts_with("cannot compare"));
    let (worst_sample, worst_index, wa, wb) = acc.worst.unwrap_or((0, vec![], f64::NAN, f64::NAN));
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
        passed: !hard_fail && acc.failing == 0,
        problem: if problems.is_empty() { None } else { Some(problems.join("; ")) },
    }
}
