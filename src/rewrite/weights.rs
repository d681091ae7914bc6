//! What merged weights look like to the precisions users deploy in: whether they fit float16,
//! and whether per-tensor int8 quantisation would crush most output channels. Re-parameterised
//! models are known to quantise badly; the report says so per merged Conv.

use crate::graph::Exact;
use crate::model::tensor::{FloatType, Scaled};
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

/// What one pass over a tensor's values finds, per output channel (axis 0) and in all.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Part {
    min: f64,
    max: f64,
    max_abs: f64,
    /// beyond float16's range / non-zero but flushed to zero by float16
    f16_overflow: usize,
    f16_flush: usize,
    /// not finite or beyond the range of the tensor's own type / non-zero but rounding to zero in it
    overflow: usize,
    underflow: usize,
}

impl Part {
    const EMPTY: Part = Part {
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        max_abs: 0.0,
        f16_overflow: 0,
        f16_flush: 0,
        overflow: 0,
        underflow: 0,
    };

    /// `c`'s values against the limits `(largest, smallest non-zero)` of the tensor's type. A NaN
    /// is left out of the min and max (as `f64::min` does) and counted as an overflow.
    ///
    /// One vectorised pass finds the min, the max, the smallest non-zero |v| and whether any value
    /// is not finite; when these show that nothing can be counted (the usual case), that is the
    /// answer, else the values are counted one by one.
    fn of(c: &[f64], (largest, zero): (f64, f64)) -> Part {
        let Quick { min, max, smallest, finite } = quick(c);
        let max_abs = (-min).max(max).max(0.0);
        if finite && max_abs <= largest.min(F16_MAX) && smallest >= zero.max(F16_ZERO) {
            return Part { min, max, max_abs, ..Part::EMPTY };
        }
        c.iter().fold(Part::EMPTY, |mut p, &v| {
            let a = v.abs();
            p.min = p.min.min(v);
            p.max = p.max.max(v);
            p.max_abs = p.max_abs.max(a);
            p.f16_overflow += (a > F16_MAX) as usize;
            p.f16_flush += (v != 0.0 && a < F16_ZERO) as usize;
            p.overflow += (!a.is_finite() || a > largest) as usize;
            p.underflow += (v != 0.0 && a < zero) as usize;
            p
        })
    }

    fn and(self, b: Part) -> Part {
        Part {
            min: self.min.min(b.min),
            max: self.max.max(b.max),
            max_abs: self.max_abs.max(b.max_abs),
            f16_overflow: self.f16_overflow + b.f16_overflow,
            f16_flush: self.f16_flush + b.f16_flush,
            overflow: self.overflow + b.overflow,
            underflow: self.underflow + b.underflow,
        }
    }
}

/// What one vectorised pass finds: the min and max (NaNs left out), the smallest non-zero |v|,
/// and whether every value is finite.
struct Quick {
    min: f64,
    max: f64,
    smallest: f64,
    finite: bool,
}

/// [`Quick`] with SSE2 (part of every x86-64 CPU): two values per instruction, two accumulators
/// of each kind. `min_pd(v, m)` is `v < m ? v : m`, so a NaN in `v` leaves `m` as it is.
#[cfg(target_arch = "x86_64")]
fn quick(c: &[f64]) -> Quick {
    // SAFETY: SSE2 is part of the x86-64 baseline: every CPU this code runs on has it
    unsafe { quick_sse2(c) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn quick_sse2(c: &[f64]) -> Quick {
    use std::arch::x86_64::*;
    let (inf, zero) = (_mm_set1_pd(f64::INFINITY), _mm_setzero_pd());
    let abs = _mm_castsi128_pd(_mm_set1_epi64x(i64::MAX));
    let mut mn = [inf; 2];
    let mut mx = [_mm_set1_pd(f64::NEG_INFINITY); 2];
    let mut nz = [inf; 2];
    let mut nan = [zero; 2];
    let mut step = |k: usize, v: __m128d| {
        mn[k] = _mm_min_pd(v, mn[k]);
        mx[k] = _mm_max_pd(v, mx[k]);
        // |v|, or infinity where v is ±0
        let a = _mm_or_pd(_mm_and_pd(v, abs), _mm_and_pd(_mm_cmpeq_pd(v, zero), inf));
        nz[k] = _mm_min_pd(a, nz[k]);
        // (NaN, and infinity times zero, make the sum NaN)
        nan[k] = _mm_add_pd(nan[k], _mm_mul_pd(v, zero));
    };
    let mut quads = c.chunks_exact(4);
    for q in &mut quads {
        step(0, _mm_set_pd(q[1], q[0]));
        step(1, _mm_set_pd(q[3], q[2]));
    }
    let mut tail = quads.remainder().chunks_exact(2);
    for p in &mut tail {
        step(0, _mm_set_pd(p[1], p[0]));
    }
    if let [v] = tail.remainder() {
        // (the lone last value twice: min, max, smallest and the NaN test are the same)
        step(1, _mm_set1_pd(*v));
    }
    let lanes = |a: [__m128d; 2]| -> [f64; 4] {
        let (mut x, mut y) = ([0f64; 2], [0f64; 2]);
        // SAFETY: each store writes two f64 into a two-element array
        unsafe {
            _mm_storeu_pd(x.as_mut_ptr(), a[0]);
            _mm_storeu_pd(y.as_mut_ptr(), a[1]);
        }
        [x[0], x[1], y[0], y[1]]
    };
    Quick {
        min: lanes(mn).into_iter().fold(f64::INFINITY, f64::min),
        max: lanes(mx).into_iter().fold(f64::NEG_INFINITY, f64::max),
        smallest: lanes(nz).into_iter().fold(f64::INFINITY, f64::min),
        finite: lanes(nan).into_iter().all(|v| !v.is_nan()),
    }
}

/// The [`Part`] of channel `c` of a scaled float32 tensor without computing its values, when
/// nothing in it can be counted: one pass over the stored float32 values finds their min, max and
/// smallest non-zero |v|, and those of the products follow, exactly: rounding is monotone, so
/// `v ≤ w` gives `fl(v·s) ≤ fl(w·s)` for `s > 0` (and the order flips for `s < 0`). `None` sends
/// the channel to the full count (a stored value not finite, a factor zero or not finite, or a
/// product near a limit).
fn scaled_f32(s: &Scaled, c: usize, per: usize, (largest, zero): (f64, f64)) -> Option<Part> {
    let k = s.scale[c];
    if s.ft != FloatType::F32 || per == 0 || k == 0.0 || !k.is_finite() {
        return None;
    }
    let q = quick_f32(&s.raw[c * per * 4..(c + 1) * per * 4]);
    if !q.finite {
        return None;
    }
    let (a, b) = (q.min * k, q.max * k);
    let (min, max) = if k > 0.0 { (a, b) } else { (b, a) };
    let max_abs = (-min).max(max).max(0.0);
    // (a product that rounds to zero would change which value is the smallest non-zero one)
    let smallest = q.smallest * k.abs();
    let quiet = max_abs <= largest.min(F16_MAX) && smallest >= zero.max(F16_ZERO) && smallest > 0.0;
    quiet.then_some(Part { min, max, max_abs, ..Part::EMPTY })
}

/// [`Quick`] of little-endian float32 values, four per SSE instruction.
#[cfg(target_arch = "x86_64")]
fn quick_f32(raw: &[u8]) -> Quick {
    // SAFETY: SSE2 is part of the x86-64 baseline: every CPU this code runs on has it
    unsafe { quick_f32_sse2(raw) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn quick_f32_sse2(raw: &[u8]) -> Quick {
    use std::arch::x86_64::*;
    let (inf, zero) = (_mm_set1_ps(f32::INFINITY), _mm_setzero_ps());
    let abs = _mm_castsi128_ps(_mm_set1_epi32(i32::MAX));
    let (mut mn, mut mx, mut nz, mut nan) = (inf, _mm_set1_ps(f32::NEG_INFINITY), inf, zero);
    let mut quads = raw.chunks_exact(16);
    for q in &mut quads {
        // SAFETY: `q` holds 16 readable bytes; the load has no alignment requirement (and x86 is
        // little-endian, as the stored values are)
        let v = unsafe { _mm_loadu_ps(q.as_ptr().cast::<f32>()) };
        mn = _mm_min_ps(v, mn);
        mx = _mm_max_ps(v, mx);
        let a = _mm_or_ps(_mm_and_ps(v, abs), _mm_and_ps(_mm_cmpeq_ps(v, zero), inf));
        nz = _mm_min_ps(a, nz);
        nan = _mm_add_ps(nan, _mm_mul_ps(v, zero));
    }
    let lanes = |a: __m128| -> [f32; 4] {
        let mut x = [0f32; 4];
        // SAFETY: the store writes four f32 into a four-element array
        unsafe { _mm_storeu_ps(x.as_mut_ptr(), a) };
        x
    };
    let mut q = Quick {
        min: lanes(mn).into_iter().fold(f32::INFINITY, f32::min) as f64,
        max: lanes(mx).into_iter().fold(f32::NEG_INFINITY, f32::max) as f64,
        smallest: lanes(nz).into_iter().fold(f32::INFINITY, f32::min) as f64,
        finite: lanes(nan).into_iter().all(|v| !v.is_nan()),
    };
    for b in quads.remainder().chunks_exact(4) {
        let v = f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64;
        q.min = if v < q.min { v } else { q.min };
        q.max = if v > q.max { v } else { q.max };
        if v != 0.0 && v.abs() < q.smallest {
            q.smallest = v.abs();
        }
        q.finite &= v.is_finite();
    }
    q
}

/// [`Quick`] of little-endian float32 values, one at a time.
#[cfg(not(target_arch = "x86_64"))]
fn quick_f32(raw: &[u8]) -> Quick {
    let v: Vec<f64> = raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect();
    quick(&v)
}

/// [`Quick`], one value at a time.
#[cfg(not(target_arch = "x86_64"))]
fn quick(c: &[f64]) -> Quick {
    let mut q = Quick { min: f64::INFINITY, max: f64::NEG_INFINITY, smallest: f64::INFINITY, finite: true };
    for &v in c {
        q.min = if v < q.min { v } else { q.min };
        q.max = if v > q.max { v } else { q.max };
        if v != 0.0 && v.abs() < q.smallest {
            q.smallest = v.abs();
        }
        q.finite &= v.is_finite();
    }
    q
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

/// The largest finite value of `ft` and, below it, half its smallest subnormal (rounds to zero).
fn limits(ft: FloatType) -> (f64, f64) {
    match ft {
        FloatType::F16 => (F16_MAX, F16_ZERO),
        FloatType::BF16 => (3.389_531_389_251_535_5e38, 4.591_774_807_899_561e-41),
        FloatType::F32 => (f32::MAX as f64, 7.006_492_321_624_085e-46),
        FloatType::F64 => (f64::MAX, 0.0),
    }
}

/// One pass over a tensor about to be written in type `ft`: whether `ft` holds every value, and
/// the ranges the report shows.
pub(crate) struct Scan {
    channels: Vec<Part>,
    all: Part,
}

impl Scan {
    pub fn of(w: &ArrayD<f64>, ft: FloatType) -> Scan {
        use rayon::prelude::*;
        let values = standard(w);
        let per = if w.ndim() == 0 { 1 } else { w.shape()[1..].iter().product::<usize>().max(1) };
        let lim = limits(ft);
        let channels: Vec<Part> = if values.len() >= PARALLEL {
            values.par_chunks(per).map(|c| Part::of(c, lim)).collect()
        } else {
            values.chunks(per).map(|c| Part::of(c, lim)).collect()
        };
        let all = channels.iter().fold(Part::EMPTY, |a, &c| a.and(c));
        Scan { channels, all }
    }

    /// [`Scan::of`] the values a rewrite writes, computing a deferred tensor's one output
    /// channel at a time (no copy of the whole).
    pub fn of_exact(e: &Exact, ft: FloatType) -> Scan {
        let lim = limits(ft);
        match e {
            Exact::Values(a) => Scan::of(a, ft),
            Exact::Scaled(s) => {
                let per = s.dims[1..].iter().product::<usize>();
                Scan::by_channel(s.scale.len(), per, |buf, c| {
                    if let Some(p) = scaled_f32(s, c, per, lim) {
                        return p;
                    }
                    s.slice_to(c, buf);
                    Part::of(buf, lim)
                })
            }
            Exact::Summed(s) => Scan::by_channel(s.dims()[0], s.dims()[1..].iter().product(), |buf, c| {
                s.slice_to(c, buf);
                Part::of(buf, lim)
            }),
        }
    }

    /// [`Scan::of_exact`], and a sum's values rounded to `ft` computed in the same pass (kept
    /// with it: each of its slices is summed once, for both).
    pub fn of_written(e: &mut Exact, ft: FloatType) -> Scan {
        let Exact::Summed(s) = e else { return Scan::of_exact(e, ft) };
        let lim = limits(ft);
        let channels = s.write(ft, |v| Part::of(v, lim));
        let all = channels.iter().fold(Part::EMPTY, |a, &c| a.and(c));
        Scan { channels, all }
    }

    /// The scan of `channels` output channels of `per` values each, channel `c`'s part found by
    /// `part(buf, c)` (`buf`: a buffer its thread keeps); on every core for large tensors.
    fn by_channel(channels: usize, per: usize, part: impl Fn(&mut Vec<f64>, usize) -> Part + Sync) -> Scan {
        use rayon::prelude::*;
        let channels: Vec<Part> = if channels * per >= PARALLEL {
            (0..channels).into_par_iter().map_init(Vec::new, |buf, c| part(buf, c)).collect()
        } else {
            let mut buf = Vec::new();
            (0..channels).map(|c| part(&mut buf, c)).collect()
        };
        let all = channels.iter().fold(Part::EMPTY, |a, &c| a.and(c));
        Scan { channels, all }
    }

    /// Values `ft` cannot hold: (not finite or beyond its range, non-zero but rounding to zero).
    pub fn unrepresentable(&self) -> (usize, usize) {
        (self.all.overflow, self.all.underflow)
    }

    /// The report's ranges of the weight of Conv `conv`.
    pub fn stats(&self, conv: &str) -> WeightStats {
        let top = self.all.max_abs;
        WeightStats {
            conv: conv.to_string(),
            min: self.all.min,
            max: self.all.max,
            channel_max_abs_min: self.channels.iter().fold(f64::INFINITY, |m, c| m.min(c.max_abs)),
            channel_max_abs_max: top,
            channels: self.channels.len(),
            int8_crushed_channels: self.channels.iter().filter(|c| c.max_abs < top * INT8_CRUSH).count(),
            float16_overflow: self.all.f16_overflow,
            float16_flush: self.all.f16_flush,
        }
    }
}

/// What merged weights can do wrong where they are deployed: one kind per line of the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    Float16Overflow,
    Float16Flush,
    Int8Crush,
}

impl Problem {
    const ALL: [Problem; 3] = [Problem::Float16Overflow, Problem::Float16Flush, Problem::Int8Crush];

    /// The line of one Conv (`detail`: its count).
    fn one(self, conv: &str, detail: &str) -> String {
        match self {
            Problem::Float16Overflow => format!("Conv '{conv}': {detail} merged weight(s) beyond float16's range (±65504)"),
            Problem::Float16Flush => format!("Conv '{conv}': {detail} non-zero merged weight(s) flush to zero in float16"),
            Problem::Int8Crush => format!(
                "Conv '{conv}': per-tensor int8 would crush {detail} output channels (their largest weight is under 1/16 of the tensor's: fewer than 8 of 127 levels); quantise per channel"
            ),
        }
    }

    /// The line of several Convs: the count, what they have, and the first few.
    fn many(self, convs: &[(&str, String)]) -> String {
        let what = match self {
            Problem::Float16Overflow => "have merged weights beyond float16's range (±65504)",
            Problem::Float16Flush => "have non-zero merged weights that flush to zero in float16",
            Problem::Int8Crush => "would have most of their output channels crushed by per-tensor int8 (their largest weight is under 1/16 of the tensor's: fewer than 8 of 127 levels); quantise per channel",
        };
        let shown: Vec<String> = convs.iter().take(SHOWN).map(|(c, d)| format!("'{c}' ({d})")).collect();
        let mut line = format!("{} merged Convs {what}: {}", convs.len(), shown.join(", "));
        if convs.len() > SHOWN {
            line.push_str(&format!(" and {} more (the JSON report lists each)", convs.len() - SHOWN));
        }
        line
    }
}

/// How many Convs a summarised warning names.
const SHOWN: usize = 3;

impl WeightStats {
    /// The problems of this tensor, each with its count (`3`, `30 of 64`).
    fn problems(&self) -> Vec<(Problem, String)> {
        let mut p = Vec::new();
        if self.float16_overflow > 0 {
            p.push((Problem::Float16Overflow, self.float16_overflow.to_string()));
        }
        if self.float16_flush > 0 {
            p.push((Problem::Float16Flush, self.float16_flush.to_string()));
        }
        if self.int8_crushed_channels * 2 > self.channels {
            p.push((Problem::Int8Crush, format!("{} of {}", self.int8_crushed_channels, self.channels)));
        }
        p
    }

    /// One line per problem.
    pub fn warnings(&self) -> Vec<String> {
        self.problems().into_iter().map(|(p, d)| p.one(&self.conv, &d)).collect()
    }
}

/// The warnings of many merged weights, one line per kind of problem: a Conv's own line when it
/// is the only one, else the count of Convs and the first few.
pub(crate) fn summarise<'a>(stats: impl IntoIterator<Item = &'a WeightStats>) -> Vec<String> {
    let mut by_kind: Vec<Vec<(&str, String)>> = vec![Vec::new(); Problem::ALL.len()];
    for s in stats {
        for (p, d) in s.problems() {
            let k = Problem::ALL.iter().position(|&q| q == p).expect("every kind is listed");
            by_kind[k].push((s.conv.as_str(), d));
        }
    }
    Problem::ALL
        .iter()
        .zip(by_kind)
        .filter_map(|(&p, convs)| match convs.as_slice() {
            [] => None,
            [(c, d)] => Some(p.one(c, d)),
            _ => Some(p.many(&convs)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn stats_flag_float16_and_int8_problems() {
        // 4 channels: one large, three tiny
        let w = ArrayD::from_shape_vec(IxDyn(&[4, 1]), vec![70000.0, 1e-9, -0.5, 1.0]).unwrap();
        let s = Scan::of(&w, FloatType::F32).stats("c");
        assert_eq!((s.float16_overflow, s.float16_flush, s.int8_crushed_channels, s.channels), (1, 1, 3, 4));
        assert_eq!(s.warnings().len(), 3);
        let ok = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.0, -0.5]).unwrap();
        assert!(Scan::of(&ok, FloatType::F32).stats("c").warnings().is_empty());
    }

    #[test]
    fn unrepresentable_counts_overflow_and_underflow_per_type() {
        let a = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1e5, 1e-9, 1.0]).unwrap();
        assert_eq!(Scan::of(&a, FloatType::F16).unrepresentable(), (1, 1));
        assert_eq!(Scan::of(&a, FloatType::F32).unrepresentable(), (0, 0));
    }

    /// The straightforward scan the lane-wise one must equal.
    fn naive(c: &[f64], (largest, zero): (f64, f64)) -> (f64, f64, f64, [usize; 4]) {
        let mut n = [0; 4];
        let (mut mn, mut mx, mut ab) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
        for &v in c {
            mn = mn.min(v);
            mx = mx.max(v);
            ab = ab.max(v.abs());
            n[0] += (v.abs() > F16_MAX) as usize;
            n[1] += (v != 0.0 && v.abs() < F16_ZERO) as usize;
            n[2] += (!v.is_finite() || v.abs() > largest) as usize;
            n[3] += (v != 0.0 && v.abs() < zero) as usize;
        }
        (mn, mx, ab, n)
    }

    #[test]
    fn scan_equals_the_straightforward_one_with_and_without_special_values_at_every_tail_length() {
        let special = [0.0, -0.0, 1e-9, -3e-46, 7e4, -1e39, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 0.5, -2.0];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (channels, specials) in [(1usize, true), (3, true), (70, true), (3, false), (70, false)] {
            for per in [1usize, 7, 8, 9, 17, 1000] {
                let v: Vec<f64> = (0..channels * per)
                    .map(|_| {
                        let r = next();
                        if specials && r % 5 == 0 {
                            special[(r >> 8) as usize % special.len()]
                        } else {
                            ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0
                        }
                    })
                    .collect();
                let w = ArrayD::from_shape_vec(IxDyn(&[channels, per]), v.clone()).unwrap();
                for ft in [FloatType::F16, FloatType::BF16, FloatType::F32, FloatType::F64] {
                    let scan = Scan::of(&w, ft);
                    let (mn, mx, ab, n) = naive(&v, limits(ft));
                    let s = scan.stats("c");
                    assert_eq!((s.min, s.max, s.channel_max_abs_max), (mn, mx, ab), "{channels}x{per} {ft:?}");
                    assert_eq!((s.float16_overflow, s.float16_flush), (n[0], n[1]));
                    assert_eq!(scan.unrepresentable(), (n[2], n[3]));
                    let per_channel: Vec<f64> = v.chunks(per).map(|c| naive(c, limits(ft)).2).collect();
                    assert_eq!(s.channel_max_abs_min, per_channel.iter().fold(f64::INFINITY, |m, &c| m.min(c)));
                    assert_eq!(s.channels, channels);
                }
            }
        }
    }

    /// A scaled stored tensor is scanned (float32: from the stored values and the factors, by
    /// the order of products) exactly as its values would be: special values, every tail length,
    /// negative, zero, tiny, huge and non-finite factors, float32 and float16.
    #[test]
    fn scaled_tensors_scan_as_their_values() {
        use crate::model::tensor::{from_f64, Scaled};
        let special = [0.0, -0.0, 1e-9, -3e-39, 7e4, -1e38, f64::INFINITY, f64::NAN, 0.5, -2.0];
        let scales = [0.37, -2.5, 0.0, -0.0, 1e-30, 1e30, 3e-3, f64::INFINITY, f64::NAN, 1.0];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (channels, specials) in [(10usize, true), (10, false), (40, false)] {
            for per in [1usize, 3, 4, 5, 8, 17, 2000] {
                let v: Vec<f64> = (0..channels * per)
                    .map(|_| {
                        let r = next();
                        if specials && r % 7 == 0 {
                            special[(r >> 8) as usize % special.len()]
                        } else {
                            ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0
                        }
                    })
                    .collect();
                let w = ArrayD::from_shape_vec(IxDyn(&[channels, per]), v).unwrap();
                let scale: Vec<f64> = (0..channels).map(|c| scales[c % scales.len()]).collect();
                for stored in [FloatType::F32, FloatType::F16] {
                    let raw = from_f64("w", &w, stored).raw_data.unwrap();
                    let s = Scaled::new(raw, stored, vec![channels, per], scale.clone()).unwrap();
                    for ft in [FloatType::F32, FloatType::F16, FloatType::BF16] {
                        let (got, want) = (Scan::of_exact(&Exact::Scaled(s.clone()), ft), Scan::of(&s.to_f64(), ft));
                        assert_eq!(got.channels, want.channels, "{channels}x{per} {stored:?} -> {ft:?}");
                        assert_eq!(got.all, want.all);
                    }
                }
            }
        }
    }
}
