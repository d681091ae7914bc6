//! TensorProto ↔ ndarray. Float tensors convert to `f64` arrays (the kernel maths runs in f64)
//! from `raw_data` or from the typed fields, and are written back in their own dtype.

use crate::proto::{tensor_proto::DataType, TensorProto};
use bytes::Bytes;
use ndarray::{ArrayD, IxDyn};
use std::mem::MaybeUninit;

/// Floating-point element types the kernel maths handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
    F64,
}

impl FloatType {
    pub fn from_onnx(dt: i32) -> Option<FloatType> {
        match DataType::try_from(dt).ok()? {
            DataType::Float => Some(FloatType::F32),
            DataType::Float16 => Some(FloatType::F16),
            DataType::Bfloat16 => Some(FloatType::BF16),
            DataType::Double => Some(FloatType::F64),
            _ => None,
        }
    }
    pub fn onnx(self) -> i32 {
        (match self {
            FloatType::F32 => DataType::Float,
            FloatType::F16 => DataType::Float16,
            FloatType::BF16 => DataType::Bfloat16,
            FloatType::F64 => DataType::Double,
        }) as i32
    }
    /// The type's name, numpy's spelling.
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
            FloatType::F64 => "float64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
            FloatType::F64 => 8,
        }
    }

    /// The type's precision: the distance from 1 to the next value.
    pub fn eps(self) -> f64 {
        match self {
            FloatType::F64 => f64::EPSILON,
            FloatType::F32 => f32::EPSILON as f64,
            FloatType::F16 => 2f64.powi(-10),
            FloatType::BF16 => 2f64.powi(-7),
        }
    }
}

/// The lower-case name of an ONNX data type (`float`, `int64`, ...), for messages.
pub(crate) fn dtype_name(dt: i32) -> String {
    match DataType::try_from(dt) {
        Ok(d) => d.as_str_name().to_lowercase(),
        Err(_) => format!("data type {dt}"),
    }
}

/// Size in bytes of one element of an ONNX data type, for the fixed-size types.
pub fn elem_size(dt: i32) -> Option<usize> {
    use DataType::*;
    Some(match DataType::try_from(dt).ok()? {
        Float | Int32 | Uint32 => 4,
        Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz | Float8e8m0 => 1,
        Uint16 | Int16 | Float16 | Bfloat16 => 2,
        Int64 | Uint64 | Double | Complex64 => 8,
        Complex128 => 16,
        _ => return None,
    })
}

/// Bytes of `raw_data` a tensor of `n` elements of type `dt` must hold: `Ok(None)` for types
/// with no fixed raw layout (strings, undefined, unknown); `Err` when the size overflows.
pub fn raw_len(dt: i32, n: usize) -> Result<Option<usize>, String> {
    use DataType::*;
    let overflow = || format!("{n} elements overflow a byte count");
    let Ok(d) = DataType::try_from(dt) else { return Ok(None) };
    Ok(Some(match d {
        Undefined | String => return Ok(None),
        Uint4 | Int4 | Float4e2m1 => n.div_ceil(2),
        Uint2 | Int2 => n.div_ceil(4),
        Float6e2m3 | Float6e3m2 => n.checked_mul(6).ok_or_else(overflow)?.div_ceil(8),
        Float8e8m0 => n,
        _ => match elem_size(dt) {
            Some(sz) => n.checked_mul(sz).ok_or_else(overflow)?,
            None => return Ok(None),
        },
    }))
}

/// For a tensor whose values are in its typed fields: (field, values it holds, values `n`
/// elements need). `None` for types whose typed layout is not known here.
pub fn typed_len(t: &TensorProto, n: usize) -> Option<(&'static str, usize, usize)> {
    use DataType::*;
    let d = DataType::try_from(t.data_type.unwrap_or(0)).ok()?;
    Some(match d {
        Float => ("float_data", t.float_data.len(), n),
        Complex64 => ("float_data", t.float_data.len(), n.checked_mul(2)?),
        Double => ("double_data", t.double_data.len(), n),
        Complex128 => ("double_data", t.double_data.len(), n.checked_mul(2)?),
        Int64 => ("int64_data", t.int64_data.len(), n),
        Uint32 | Uint64 => ("uint64_data", t.uint64_data.len(), n),
        String => ("string_data", t.string_data.len(), n),
        Uint4 | Int4 | Float4e2m1 => ("int32_data", t.int32_data.len(), n.div_ceil(2)),
        Uint2 | Int2 => ("int32_data", t.int32_data.len(), n.div_ceil(4)),
        Int32 | Int16 | Int8 | Uint16 | Uint8 | Bool | Float16 | Bfloat16 | Float8e4m3fn | Float8e4m3fnuz
        | Float8e5m2 | Float8e5m2fnuz | Float8e8m0 | Float6e2m3 | Float6e3m2 => ("int32_data", t.int32_data.len(), n),
        Undefined => return None,
    })
}

/// Number of elements from the dims, refusing negative dims and overflow.
pub fn checked_numel(dims: &[i64]) -> Result<usize, String> {
    let mut n: usize = 1;
    for &d in dims {
        if d < 0 {
            return Err(format!("negative dimension {d} in {dims:?}"));
        }
        n = n.checked_mul(d as usize).ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    }
    Ok(n)
}

fn dims_of(t: &TensorProto) -> Result<Vec<usize>, String> {
    checked_numel(&t.dims)?;
    Ok(t.dims.iter().map(|&d| d as usize).collect())
}

/// Conversions of at least this many elements are split over every core (below, a thread's
/// start costs more than it saves); the pieces are independent, so the result is the same.
const PARALLEL: usize = 1 << 16;
/// Elements per piece.
const PIECE: usize = 1 << 14;

/// `n` elements written `per` at a time — chunk `c` (the last may be shorter) by `fill(c,
/// chunk)`, which returns how many of its elements it wrote — on every core when there are at
/// least [`PARALLEL`], into memory that is never zeroed first (fresh memory written once, not
/// twice). A chunk not written whole is a bug: it panics before the vector exists.
fn written<T: Copy + Send>(
    n: usize,
    per: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) -> usize + Sync,
) -> Vec<T> {
    written_with(n, per, |c, o| (fill(c, o), ())).0
}

/// [`written`], where `fill` also finds something of each chunk (returned in chunk order).
fn written_with<T: Copy + Send, P: Send>(
    n: usize,
    per: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) -> (usize, P) + Sync,
) -> (Vec<T>, Vec<P>) {
    let mut v = Vec::with_capacity(n);
    if n == 0 {
        return (v, Vec::new());
    }
    let one = |(c, o): (usize, &mut [MaybeUninit<T>])| {
        let len = o.len();
        let (wrote, found) = fill(c, o);
        assert_eq!(wrote, len, "chunk {c} of {n} elements written in part");
        found
    };
    let spare = &mut v.spare_capacity_mut()[..n];
    let found = if n >= PARALLEL {
        use rayon::prelude::*;
        spare.par_chunks_mut(per.max(1)).enumerate().map(one).collect()
    } else {
        spare.chunks_mut(per.max(1)).enumerate().map(one).collect()
    };
    // SAFETY: the first `n` elements of the capacity were written, every chunk whole (checked)
    unsafe { v.set_len(n) };
    (v, found)
}

/// Little-endian elements of `N` bytes to f64.
fn decode<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> f64 + Sync) -> Vec<f64> {
    written(raw.len() / N, PIECE, |c, o| {
        let r = &raw[c * PIECE * N..];
        for (d, s) in o.iter_mut().zip(r.chunks_exact(N)) {
            d.write(f(s.try_into().expect("N bytes")));
        }
        o.len().min(r.len() / N)
    })
}

/// f64 to little-endian elements of `N` bytes.
fn encode<const N: usize>(a: &[f64], f: impl Fn(f64) -> [u8; N] + Sync) -> Vec<u8> {
    written(a.len() * N, PIECE * N, |c, r| put(r, &a[c * PIECE..], &f))
}

/// Decode a float tensor to f64. `raw` is the tensor's bytes when stored as raw data (inline or
/// resolved from external data); otherwise the typed fields are read.
pub fn to_f64(t: &TensorProto, raw: Option<&[u8]>) -> Result<ArrayD<f64>, String> {
    let ft = FloatType::from_onnx(t.data_type.unwrap_or(0)).ok_or_else(|| {
        format!("tensor '{}' has data type {} (not a float type)", t.name(), t.data_type.unwrap_or(0))
    })?;
    let shape = dims_of(t)?;
    let n = checked_numel(&t.dims)?;
    let values: Vec<f64> = if let Some(raw) = raw {
        if n.checked_mul(ft.size()) != Some(raw.len()) {
            return Err(format!(
                "tensor '{}': {} bytes of data for {n} elements of {} bytes",
                t.name(),
                raw.len(),
                ft.size()
            ));
        }
        match ft {
            FloatType::F32 => decode(raw, |c: [u8; 4]| f32::from_le_bytes(c) as f64),
            FloatType::F64 => decode(raw, f64::from_le_bytes),
            FloatType::F16 => decode(raw, |c: [u8; 2]| half::f16::from_le_bytes(c).to_f64()),
            FloatType::BF16 => decode(raw, |c: [u8; 2]| half::bf16::from_le_bytes(c).to_f64()),
        }
    } else {
        let v: Vec<f64> = match ft {
            FloatType::F32 => t.float_data.iter().map(|&x| x as f64).collect(),
            FloatType::F64 => t.double_data.clone(),
            FloatType::F16 => t.int32_data.iter().map(|&x| half::f16::from_bits(x as u16).to_f64()).collect(),
            FloatType::BF16 => t.int32_data.iter().map(|&x| half::bf16::from_bits(x as u16).to_f64()).collect(),
        };
        if v.len() != n {
            return Err(format!("tensor '{}': {} values for {n} elements", t.name(), v.len()));
        }
        v
    };
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| e.to_string())
}

/// Decode an integer tensor (INT64 or INT32) to i64 values.
pub fn to_i64(t: &TensorProto, raw: Option<&[u8]>) -> Result<Vec<i64>, String> {
    let dt = DataType::try_from(t.data_type.unwrap_or(0)).map_err(|_| "unknown data type".to_string())?;
    let n = checked_numel(&t.dims)?;
    let v: Vec<i64> = match (dt, raw) {
        (DataType::Int64, Some(r)) if n.checked_mul(8) == Some(r.len()) => {
            r.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
        }
        (DataType::Int32, Some(r)) if n.checked_mul(4) == Some(r.len()) => {
            r.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
        }
        (DataType::Int64, None) => t.int64_data.clone(),
        (DataType::Int32, None) => t.int32_data.iter().map(|&x| x as i64).collect(),
        (DataType::Int64 | DataType::Int32, Some(r)) => {
            return Err(format!("tensor '{}': {} bytes of data for {n} elements", t.name(), r.len()))
        }
        _ => return Err(format!("tensor '{}' is not an integer tensor", t.name())),
    };
    if v.len() != n {
        return Err(format!("tensor '{}': {} values for {n} elements", t.name(), v.len()));
    }
    Ok(v)
}

/// Encode an f64 array as a tensor of type `ft`, in `raw_data` (little-endian).
pub fn from_f64(name: &str, a: &ArrayD<f64>, ft: FloatType) -> TensorProto {
    let shape = a.shape().to_vec();
    // one loop per type (the match outside the loop), over a contiguous slice
    let a: std::borrow::Cow<[f64]> = match a.as_slice() {
        Some(s) => s.into(),
        None => a.iter().copied().collect::<Vec<_>>().into(),
    };
    let a = &a[..];
    let raw = match ft {
        FloatType::F32 => encode(a, |x| (x as f32).to_le_bytes()),
        FloatType::F64 => encode(a, |x| x.to_le_bytes()),
        FloatType::F16 => encode(a, |x| half::f16::from_f64(x).to_bits().to_le_bytes()),
        FloatType::BF16 => encode(a, |x| half::bf16::from_f64(x).to_bits().to_le_bytes()),
    };
    TensorProto {
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(ft.onnx()),
        name: Some(name.to_string()),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

/// A stored float tensor times a factor per slice along axis 0 (a BatchNormalization folded into
/// the Conv that stores it), not computed until read: element `i` is the f64 product
/// `value(i) · scale[i / per]`, where `per` is the product of `dims[1..]`, the same number an f64
/// array scaled in place holds. Holding the stored bytes (a view into the model's memory map)
/// instead of the values saves a pass over the weights and the memory of an f64 copy.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaled {
    /// The stored elements, little-endian, of type `ft`.
    pub raw: Bytes,
    pub ft: FloatType,
    pub dims: Vec<usize>,
    /// One factor per slice along axis 0.
    pub scale: Vec<f64>,
}

/// The stored element type's decoder, chosen once per call (the loops stay monomorphic).
macro_rules! with_decoder {
    ($ft:expr, |$n:ident, $f:ident| $body:expr) => {
        match $ft {
            FloatType::F32 => {
                const $n: usize = 4;
                let $f = |c: [u8; 4]| f32::from_le_bytes(c) as f64;
                $body
            }
            FloatType::F64 => {
                const $n: usize = 8;
                let $f = f64::from_le_bytes;
                $body
            }
            FloatType::F16 => {
                const $n: usize = 2;
                let $f = |c: [u8; 2]| half::f16::from_le_bytes(c).to_f64();
                $body
            }
            FloatType::BF16 => {
                const $n: usize = 2;
                let $f = |c: [u8; 2]| half::bf16::from_le_bytes(c).to_f64();
                $body
            }
        }
    };
}

impl Scaled {
    /// `raw` read as `dims` of `ft`, times `scale` along axis 0; `None` unless the sizes agree
    /// (one factor per slice, the bytes of every element).
    pub fn new(raw: Bytes, ft: FloatType, dims: Vec<usize>, scale: Vec<f64>) -> Option<Scaled> {
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let ok = !dims.is_empty() && dims[0] == scale.len() && n.checked_mul(ft.size()) == Some(raw.len());
        ok.then_some(Scaled { raw, ft, dims, scale })
    }

    fn per(&self) -> usize {
        self.dims[1..].iter().product()
    }

    /// The values of slice `c` (axis 0), in `buf` (its earlier contents replaced).
    pub fn slice_to(&self, c: usize, buf: &mut Vec<f64>) {
        let per = self.per();
        buf.clear();
        buf.reserve(per);
        assert_eq!(self.slice_into(c, &mut buf.spare_capacity_mut()[..per]), per, "slice {c} written in part");
        // SAFETY: the first `per` elements of the capacity were written (checked)
        unsafe { buf.set_len(per) };
    }

    /// The values of slice `c` (axis 0) into `out` (at most `per` elements); how many it wrote.
    fn slice_into(&self, c: usize, out: &mut [MaybeUninit<f64>]) -> usize {
        let (per, s) = (self.per(), self.scale[c]);
        with_decoder!(self.ft, |N, f| {
            let raw = &self.raw[c * per * N..(c + 1) * per * N];
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(N)) {
                o.write(f(b.try_into().expect("N bytes")) * s);
            }
        });
        out.len().min(per)
    }

    /// The values, in f64.
    pub fn to_f64(&self) -> ArrayD<f64> {
        let out = written(self.raw.len() / self.ft.size(), self.per(), |c, o| self.slice_into(c, o));
        ArrayD::from_shape_vec(IxDyn(&self.dims), out).expect("the sizes were checked")
    }

    /// The tensor `name` of the values rounded once to `ft`: the bytes [`from_f64`] writes for
    /// [`Scaled::to_f64`], without the f64 copy.
    pub fn encode(&self, name: &str, ft: FloatType) -> TensorProto {
        let per = self.per();
        let n = self.raw.len() / self.ft.size();
        let piece = |c: usize, r: &mut [MaybeUninit<u8>]| -> usize {
            if (self.ft, ft) == (FloatType::F32, FloatType::F32) {
                // (the same operations as below, in one loop)
                let (k, from) = (self.scale[c], &self.raw[c * per * 4..(c + 1) * per * 4]);
                for (o, b) in r.chunks_exact_mut(4).zip(from.chunks_exact(4)) {
                    let v = f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64;
                    for (d, x) in o.iter_mut().zip(((v * k) as f32).to_le_bytes()) {
                        d.write(x);
                    }
                }
                return 4 * (r.len() / 4).min(per);
            }
            slice_bytes(ft, r, |values| self.slice_to(c, values))
        };
        tensor_of(name, &self.dims, ft, written(n * ft.size(), per * ft.size(), piece))
    }
}

/// The bytes of one slice in type `ft` into `r`, its values computed by `fill` in f64 (in a
/// buffer each thread keeps from slice to slice); how many bytes it wrote.
fn slice_bytes(ft: FloatType, r: &mut [MaybeUninit<u8>], fill: impl FnOnce(&mut Vec<f64>)) -> usize {
    slice_bytes_with(ft, r, fill, |_| ()).0
}

/// [`slice_bytes`], and what `find` finds of the slice's values.
fn slice_bytes_with<P>(
    ft: FloatType,
    r: &mut [MaybeUninit<u8>],
    fill: impl FnOnce(&mut Vec<f64>),
    find: impl FnOnce(&[f64]) -> P,
) -> (usize, P) {
    thread_local!(static VALUES: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) });
    VALUES.with_borrow_mut(|values| {
        fill(values);
        let wrote = match ft {
            FloatType::F32 => put(r, values, |x| (x as f32).to_le_bytes()),
            FloatType::F64 => put(r, values, |x| x.to_le_bytes()),
            FloatType::F16 => put(r, values, |x| half::f16::from_f64(x).to_bits().to_le_bytes()),
            FloatType::BF16 => put(r, values, |x| half::bf16::from_f64(x).to_bits().to_le_bytes()),
        };
        (wrote, find(values))
    })
}

/// The tensor `name` of `dims` and type `ft` holding `raw`.
fn tensor_of(name: &str, dims: &[usize], ft: FloatType, raw: impl Into<Bytes>) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(ft.onnx()),
        name: Some(name.to_string()),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

/// A scaled stored tensor added, element by element, into the slices of a [`Summed`] one.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub values: Scaled,
    /// Factors applied after the scale, in order: one per slice along axis 0 each.
    pub factors: Vec<Vec<f64>>,
    /// Where each element of one block of the term lands in a block of the sum (a slice along
    /// axis 0 is `dims[1]` blocks, in both).
    pub at: Vec<usize>,
}

/// A sum of scaled stored tensors (branches merged into one kernel), not computed until read:
/// slice `c` along axis 0 is `base`'s slice `c` times `factors[..][c]`, then each term's slice
/// `c`, each element times the term's factors in order, added at its place (block `j` of the
/// term into block `j` of the sum, element `t` of a block at `at[t]`). These are the f64
/// operations, in their order, of the arrays computed in full, scaled in place and added one
/// into the other, so the values are the same to the bit; the stored bytes are read once, when
/// the sum is written, instead of into an f64 copy per branch.
#[derive(Clone, Debug, PartialEq)]
pub struct Summed {
    base: Scaled,
    factors: Vec<Vec<f64>>,
    terms: Vec<Term>,
    /// The values rounded to a type, once computed ([`Summed::write`]).
    written: Option<(FloatType, Bytes)>,
}

impl Summed {
    /// `None` unless every factor has a value per slice, every term the sum's slices and blocks
    /// (non-empty, its `at` within a block of the sum), and no axis is empty.
    pub fn new(base: Scaled, factors: Vec<Vec<f64>>, terms: Vec<Term>) -> Option<Summed> {
        let d = &base.dims;
        if d.len() < 2 || d.contains(&0) || factors.iter().any(|f| f.len() != d[0]) {
            return None;
        }
        let block = base.per() / d[1];
        for t in &terms {
            let td = &t.values.dims;
            let fits = td.len() >= 2
                && !td.contains(&0)
                && td[..2] == d[..2]
                && t.at.len() * d[1] == t.values.per()
                && t.at.iter().all(|&p| p < block)
                && t.factors.iter().all(|f| f.len() == d[0]);
            if !fits {
                return None;
            }
        }
        Some(Summed { base, factors, terms, written: None })
    }

    pub fn dims(&self) -> &[usize] {
        &self.base.dims
    }

    /// Whether its values rounded to a type are computed ([`Summed::write`]).
    pub fn is_written(&self) -> bool {
        self.written.is_some()
    }

    /// The stored bytes the sum reads.
    pub fn stored(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.base.raw).chain(self.terms.iter().map(|t| &t.values.raw))
    }

    /// The values of slice `c` (axis 0), in `buf` (its earlier contents replaced).
    pub fn slice_to(&self, c: usize, buf: &mut Vec<f64>) {
        self.base.slice_to(c, buf);
        for f in &self.factors {
            let a = f[c];
            buf.iter_mut().for_each(|x| *x *= a);
        }
        let block = buf.len() / self.base.dims[1];
        for t in &self.terms {
            let (s, per, n) = (t.values.scale[c], t.values.per(), t.at.len());
            with_decoder!(t.values.ft, |N, f| {
                let raw = &t.values.raw[c * per * N..(c + 1) * per * N];
                for (dst, src) in buf.chunks_exact_mut(block).zip(raw.chunks_exact(n * N)) {
                    for (&p, b) in t.at.iter().zip(src.chunks_exact(N)) {
                        let mut x = f(b.try_into().expect("N bytes")) * s;
                        for fc in &t.factors {
                            x *= fc[c];
                        }
                        dst[p] += x;
                    }
                }
            });
        }
    }

    /// The values, in f64.
    pub fn to_f64(&self) -> ArrayD<f64> {
        let per = self.base.per();
        let n = self.base.dims[0] * per;
        let out = written(n, per, |c, o| {
            let mut buf = Vec::new();
            self.slice_to(c, &mut buf);
            for (d, &x) in o.iter_mut().zip(&buf) {
                d.write(x);
            }
            o.len().min(buf.len())
        });
        ArrayD::from_shape_vec(IxDyn(&self.base.dims), out).expect("the sizes were checked")
    }

    /// The tensor `name` of the values rounded once to `ft`: the bytes [`from_f64`] writes for
    /// [`Summed::to_f64`] (computed one slice at a time, unless [`Summed::write`] computed them).
    pub fn encode(&self, name: &str, ft: FloatType) -> TensorProto {
        if let Some((_, raw)) = self.written.as_ref().filter(|w| w.0 == ft) {
            return tensor_of(name, &self.base.dims, ft, raw.clone());
        }
        tensor_of(name, &self.base.dims, ft, self.write_with(ft, |_| ()).0)
    }

    /// Compute the values rounded once to `ft` (kept for [`Summed::encode`]) and what `find`
    /// finds of each slice's f64 values, in one pass: each slice is summed once for both.
    pub fn write<P: Send>(&mut self, ft: FloatType, find: impl Fn(&[f64]) -> P + Sync) -> Vec<P> {
        let (raw, found) = self.write_with(ft, find);
        self.written = Some((ft, Bytes::from(raw)));
        found
    }

    fn write_with<P: Send>(&self, ft: FloatType, find: impl Fn(&[f64]) -> P + Sync) -> (Vec<u8>, Vec<P>) {
        let per = self.base.per();
        let n = self.base.dims[0] * per;
        let piece = |c: usize, r: &mut [MaybeUninit<u8>]| {
            slice_bytes_with(ft, r, |values| self.slice_to(c, values), |v| find(v))
        };
        written_with(n * ft.size(), per * ft.size(), piece)
    }
}

/// `values` encoded by `f` into `raw`; how many bytes it wrote.
fn put<const N: usize>(raw: &mut [MaybeUninit<u8>], values: &[f64], f: impl Fn(f64) -> [u8; N]) -> usize {
    for (o, &x) in raw.chunks_exact_mut(N).zip(values) {
        for (d, b) in o.iter_mut().zip(f(x)) {
            d.write(b);
        }
    }
    N * (raw.len() / N).min(values.len())
}

/// Encode i64 values as an INT64 tensor.
pub fn from_i64(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    let mut raw = Vec::with_capacity(v.len() * 8);
    for x in v {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        name: Some(name.to_string()),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large tensors are converted in pieces on several threads: every element lands where an
    /// element-by-element conversion puts it, in every type.
    #[test]
    fn pieces_convert_like_one_element_at_a_time() {
        let n = PARALLEL * 2 + 12_345; // several pieces and a ragged end
        let values: Vec<f64> = (0..n).map(|i| ((i * 7919) % 10007) as f64 / 97.0 - 50.0).collect();
        let a = ArrayD::from_shape_vec(IxDyn(&[n]), values.clone()).unwrap();
        for ft in [FloatType::F32, FloatType::F64, FloatType::F16, FloatType::BF16] {
            let t = from_f64("t", &a, ft);
            let raw = t.raw_data.as_deref().unwrap();
            let one = |x: f64| -> Vec<u8> {
                match ft {
                    FloatType::F32 => (x as f32).to_le_bytes().to_vec(),
                    FloatType::F64 => x.to_le_bytes().to_vec(),
                    FloatType::F16 => half::f16::from_f64(x).to_le_bytes().to_vec(),
                    FloatType::BF16 => half::bf16::from_f64(x).to_le_bytes().to_vec(),
                }
            };
            let naive: Vec<u8> = values.iter().flat_map(|&x| one(x)).collect();
            assert_eq!(raw, &naive[..], "{ft:?} encode");
            let back = to_f64(&t, Some(raw)).unwrap();
            let naive_back: Vec<f64> = naive
                .chunks_exact(ft.size())
                .map(|c| match ft {
                    FloatType::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                    FloatType::F64 => f64::from_le_bytes(c.try_into().unwrap()),
                    FloatType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                    FloatType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
                })
                .collect();
            assert_eq!(back.as_slice().unwrap(), &naive_back[..], "{ft:?} decode");
        }
    }

    /// A scaled stored tensor reads as the stored values decoded and multiplied in place, and is
    /// written as those values rounded once: small and large (several threads; a thread's buffer
    /// reused from a large tensor to a small one), every type in and out, negative and zero factors.
    #[test]
    fn scaled_tensors_read_and_write_as_the_decoded_values_scaled_in_place() {
        for (channels, per) in [(3usize, 5usize), (37, 4099), (2, 3)] {
            let n = channels * per;
            let values: Vec<f64> = (0..n).map(|i| ((i * 7919) % 10007) as f64 / 97.0 - 50.0).collect();
            let a = ArrayD::from_shape_vec(IxDyn(&[channels, per, 1]), values).unwrap();
            let scale: Vec<f64> = (0..channels).map(|c| [0.37, -2.5, 0.0, 1e-3][c % 4] * (c + 1) as f64).collect();
            for ft in [FloatType::F32, FloatType::F64, FloatType::F16, FloatType::BF16] {
                let stored = from_f64("w", &a, ft);
                let raw = stored.raw_data.clone().unwrap();
                let mut expect = to_f64(&stored, Some(&raw)).unwrap();
                for (c, mut w) in expect.outer_iter_mut().enumerate() {
                    w *= scale[c];
                }
                let s = Scaled::new(raw.clone(), ft, vec![channels, per, 1], scale.clone()).unwrap();
                assert_eq!(s.to_f64(), expect, "{ft:?} read, {channels} channels");
                for out in [FloatType::F32, FloatType::F64, FloatType::F16, FloatType::BF16] {
                    assert_eq!(s.encode("w2", out), from_f64("w2", &expect, out), "{ft:?} -> {out:?}");
                }
                assert!(Scaled::new(raw.clone(), ft, vec![channels, per, 1], scale[1..].to_vec()).is_none());
                assert!(Scaled::new(raw.slice(1..), ft, vec![channels, per, 1], scale.clone()).is_none());
            }
        }
    }

    /// A sum of scaled stored tensors reads as the arrays computed in full, scaled in place and
    /// added one into the other at their taps, to the bit, and is written as those values rounded
    /// once: every stored type, factors after the scale, blocks of several channels, one slice and
    /// many (several threads).
    #[test]
    fn summed_tensors_read_and_write_as_the_arrays_added_in_place() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        };
        for (o, c) in [(1usize, 1usize), (3, 2), (300, 64)] {
            for ft in [FloatType::F32, FloatType::F64, FloatType::F16, FloatType::BF16] {
                let mut stored = |dims: &[usize]| {
                    let n: usize = dims.iter().product();
                    let a = ArrayD::from_shape_vec(IxDyn(dims), (0..n).map(|_| rand()).collect()).unwrap();
                    let raw = from_f64("w", &a, ft).raw_data.unwrap();
                    let scale: Vec<f64> = (0..dims[0]).map(|_| rand()).collect();
                    Scaled::new(raw, ft, dims.to_vec(), scale).unwrap()
                };
                // a 3x3 base, a 3x1 and a 1x3 on its centre column and row, a 1x1 at its centre
                let base = stored(&[o, c, 3, 3]);
                let smalls =
                    [(stored(&[o, c, 3, 1]), [0, 1]), (stored(&[o, c, 1, 3]), [1, 0]), (stored(&[o, c, 1, 1]), [1, 1])];
                let factors: Vec<Vec<f64>> = (0..2).map(|_| (0..o).map(|_| 0.5 + rand()).collect()).collect();
                let mut expect = base.to_f64();
                for f in &factors {
                    for (k, mut w) in expect.outer_iter_mut().enumerate() {
                        w *= f[k];
                    }
                }
                let mut terms = Vec::new();
                for (i, (s, offs)) in smalls.iter().enumerate() {
                    let mut w = s.to_f64();
                    let tf: Vec<Vec<f64>> = factors[..i % 3].to_vec();
                    for f in &tf {
                        for (k, mut v) in w.outer_iter_mut().enumerate() {
                            v *= f[k];
                        }
                    }
                    let (kh, kw) = (s.dims[2], s.dims[3]);
                    for (idx, v) in w.indexed_iter() {
                        expect[[idx[0], idx[1], offs[0] + idx[2], offs[1] + idx[3]].as_slice()] += *v;
                    }
                    let at = (0..kh * kw).map(|t| (offs[0] + t / kw) * 3 + offs[1] + t % kw).collect();
                    terms.push(Term { values: s.clone(), factors: tf, at });
                }
                let sum = Summed::new(base.clone(), factors.clone(), terms.clone()).unwrap();
                let bits = |a: &ArrayD<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&sum.to_f64()), bits(&expect), "{ft:?} read, {o}x{c}");
                for out in [FloatType::F32, FloatType::F64, FloatType::F16, FloatType::BF16] {
                    assert_eq!(sum.encode("w2", out), from_f64("w2", &expect, out), "{ft:?} -> {out:?}");
                }
                // written in one pass with what is found of each slice: the same bytes, and
                // each slice's values as they are read
                let mut w = sum.clone();
                let found = w.write(FloatType::F16, |v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                assert_eq!(found.concat(), bits(&expect), "{ft:?} slices found");
                assert!(w.is_written() && !sum.is_written());
                assert_eq!(w.encode("w3", FloatType::F16), from_f64("w3", &expect, FloatType::F16));
                assert_eq!(w.encode("w3", FloatType::F32), from_f64("w3", &expect, FloatType::F32));
                // terms that do not fit the sum's slices and blocks are refused
                let mut bad = terms.clone();
                bad[0].at[0] = 9;
                assert!(Summed::new(base.clone(), factors.clone(), bad).is_none());
                let mut bad = terms.clone();
                bad[1].at.pop();
                assert!(Summed::new(base.clone(), factors.clone(), bad).is_none());
                assert!(Summed::new(base.clone(), vec![vec![1.0; o + 1]], terms.clone()).is_none());
            }
        }
    }
}
