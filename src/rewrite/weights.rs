//! What merged weights look like to the precisions users deploy in: whether they fit float16,
//! and whether per-tensor int8 quantisation would crush most output channels. Re-parameterised
//! models are known to quantise badly; the report says so per merged Conv.

use crate::model::tensor::FloatType;
use ndarray::ArrayD;
use serde::Serialize;

/// float16's largest finite value.
const F16_MAX: f64 = 65504.0;
/// Below half of float16's smallest subnormal (2^-24), a value rounds to zero.
const F16_ZERO: f64 = 2.980_232_238_769_531_2e-8;
/// A channel is crushed by per-tensor int8 when its largest |w| is below this fraction of the
/// tensor's: it gets fewer than 8 of int8's 127 levels (under 3 bits).
pub const INT8_CRUSH: f64 = 1.0 / 16.0;

/// Ranges of one merged weight tensor.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightStats {
    /// The merged Conv.
    pub conv: String,
    pub min: f64,
    pub max: f64,
    /// Over output channels (axis 0), the smallest and largest of each channel's max |w|.
    pub channel_max_abs_min: f64,
    pub channel_max_abs_max: f64,
    pub channels: usize,
    /// Channels whose max |w| is below [`INT8_CRUSH`] times the tensor's.
    pub int8_crushed_channels: usize,
    /// Weights beyond float16's range (±65504).
    pub float16_overflow: usize,
    /// Non-zero weights that round to zero in float16.
    pub float16_flush: usize,
}

/// Per output channel: min, max, max |w|, count beyond float16's range, count flushed by it.
#[derive(Clone, Copy)]
struct Channel(f64, f64, f64, usize, usize);

impl Channel {
    fn of(c: &[f64]) -> Channel {
        let mut s = Channel(f64::INFINITY, f64::NEG_INFINITY, 0.0, 0, 0);
        for &v in c {
            s.0 = s.0.min(v);
            s.1 = s.1.max(v);
            s.2 = s.2.max(v.abs());
            s.3 += (v.abs() > F16_MAX) as usize;
            s.4 += (v != 0.0 && v.abs() < F16_ZERO) as usize;
        }
        s
    }
}

/// Tensors at least this big are scanned on every core.
const PARALLEL: usize = 1 << 16;

/// `a`'s values in logical order, borrowed when it is in standard layout.
fn standard(a: &ArrayD<f64>) -> std::borrow::Cow<'_, [f64]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    }
}

impl WeightStats {
    pub fn of(conv: &str, w: &ArrayD<f64>) -> WeightStats {
        use rayon::prelude::*;
        let values = standard(w);
        let per = if w.ndim() == 0 { 1 } else { w.shape()[1..].iter().product::<usize>().max(1) };
        let channel: Vec<Channel> = if values.len() >= PARALLEL {
            values.par_chunks(per).map(Channel::of).collect()
        } else {
            values.chunks(per).map(Channel::of).collect()
        };
        let all = channel.iter().fold(Channel(f64::INFINITY, f64::NEG_INFINITY, 0.0, 0, 0), |a, c| {
            Channel(a.0.min(c.0), a.1.max(c.1), a.2.max(c.2), a.3 + c.3, a.4 + c.4)
        });
        let top = all.2;
        WeightStats {
            conv: conv.to_string(),
            min: all.0,
            max: all.1,
            channel_max_abs_min: channel.iter().fold(f64::INFINITY, |m, c| m.min(c.2)),
            channel_max_abs_max: top,
            channels: channel.len(),
            int8_crushed_channels: channel.iter().filter(|c| c.2 < top * INT8_CRUSH).count(),
            float16_overflow: all.3,
            float16_flush: all.4,
        }
    }

    /// One line per problem.
    pub fn warnings(&self) -> Vec<String> {
        let conv = &self.conv;
        let mut w = Vec::new();
        if self.float16_overflow > 0 {
            w.push(format!(
                "Conv '{conv}': {} merged weight(s) beyond float16's range (±65504)",
                self.float16_overflow
            ));
        }
        if self.float16_flush > 0 {
            w.push(format!("Conv '{conv}': {} non-zero merged weight(s) flush to zero in float16", self.float16_flush));
        }
        if self.int8_crushed_channels * 2 > self.channels {
            w.push(format!(
                "Conv '{conv}': per-tensor int8 would crush {} of {} output channels (their largest weight is under 1/16 of the tensor's: fewer than 8 of 127 levels); quantise per channel",
                self.int8_crushed_channels, self.channels
            ));
        }
        w
    }
}

/// Values of `a` that `ft` cannot hold: (beyond its range, non-zero but rounding to zero).
pub(crate) fn unrepresentable(a: &ArrayD<f64>, ft: FloatType) -> (usize, usize) {
    let (max, zero) = match ft {
        FloatType::F16 => (F16_MAX, F16_ZERO),
        FloatType::BF16 => (3.389_531_389_251_535_5e38, 4.591_774_807_899_561e-41),
        FloatType::F32 => (f32::MAX as f64, 7.006_492_321_624_085e-46),
        FloatType::F64 => (f64::MAX, 0.0),
    };
    // (a non-finite value is counted as beyond the range: no rewrite may introduce one)
    let count = |c: &[f64]| {
        c.iter().fold((0, 0), |(o, u), &v| {
            (o + (!v.is_finite() || v.abs() > max) as usize, u + (v != 0.0 && v.abs() < zero) as usize)
        })
    };
    let values = standard(a);
    if values.len() < PARALLEL {
        return count(&values);
    }
    use rayon::prelude::*;
    values.par_chunks(PARALLEL).map(count).reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn stats_flag_float16_and_int8_problems() {
        // 4 channels: one large, three tiny
        let w = ArrayD::from_shape_vec(IxDyn(&[4, 1]), vec![70000.0, 1e-9, -0.5, 1.0]).unwrap();
        let s = WeightStats::of("c", &w);
        assert_eq!((s.float16_overflow, s.float16_flush, s.int8_crushed_channels, s.channels), (1, 1, 3, 4));
        assert_eq!(s.warnings().len(), 3);
        let ok = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.0, -0.5]).unwrap();
        assert!(WeightStats::of("c", &ok).warnings().is_empty());
    }

    #[test]
    fn unrepresentable_counts_overflow_and_underflow_per_type() {
        let a = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1e5, 1e-9, 1.0]).unwrap();
        assert_eq!(unrepresentable(&a, FloatType::F16), (1, 1));
        assert_eq!(unrepresentable(&a, FloatType::F32), (0, 0));
    }
}
