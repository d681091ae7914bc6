//! Reading operators into the kernel algebra: Conv and BatchNormalization as [`AffineConv`] and
//! [`BatchNorm`], Slice and Pad as crops and paddings. Each reader says why when it cannot.

use super::{same_pads, AffineConv, BatchNorm};
use crate::graph::{attr, attr_float, attr_int, attr_ints, attr_string, ConstError, Consts};
use crate::model::tensor::FloatType;
use crate::proto::NodeProto;
use ndarray::{Array1, ArrayD, Ix1};
use std::fmt;

/// Why an operator cannot be read into the kernel algebra.
#[derive(Clone, Debug, PartialEq)]
pub enum ReadError {
    /// A parameter that is not a usable constant.
    Const(ConstError),
    /// The Conv's weight (or bias) is not a usable constant.
    Weight(ConstError),
    Bias(ConstError),
    /// A Slice's starts/ends/axes/steps, or a Pad's amounts or value, is not a usable constant.
    SliceParam(ConstError),
    PadAmounts(ConstError),
    PadValue(ConstError),
    /// A per-channel vector of another shape: (name, shape, expected channels).
    Channels(String, Vec<usize>, usize),
    /// The node does not have the form the algebra handles (the text says how).
    Form(Form),
}

/// Forms of Conv, BatchNormalization, Slice and Pad the kernel algebra does not handle.
#[derive(Clone, Debug, PartialEq)]
pub enum Form {
    ConvWithoutWeight,
    WeightRank(usize),
    BiasDtype,
    GroupsDivide {
        groups: i64,
        out: usize,
    },
    KernelShape {
        attr: Vec<i64>,
        weight: Vec<usize>,
    },
    /// An attribute (`strides`, `dilations`, `pads`) invalid for a kernel of this rank.
    Attribute {
        name: &'static str,
        value: Vec<i64>,
        rank: usize,
    },
    AutoPadWithStride(String),
    /// `auto_pad` SAME_* with a stride > 1, on an input whose size is not fixed.
    AutoPadSizeNotFixed(String),
    AutoPadUnknown(String),
    BnTrainingMode,
    BnTrainingOutputs,
    BnIsTest,
    BnNotSpatial,
    BnFewInputs,
    SliceWithout(&'static str),
    SliceLengths,
    SliceAxis(i64),
    SliceStep,
    SliceBatchOrChannel,
    SliceStartFromEnd(i64),
    SliceEndBySize(i64),
    PadMode(String),
    PadWithout,
    PadAxes,
    PadValue(f64),
    PadLength,
    PadBatchOrChannel,
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Form::ConvWithoutWeight => f.write_str("Conv without weight"),
            Form::WeightRank(r) => write!(f, "weight of rank {r}"),
            Form::BiasDtype => f.write_str("bias and weight have different dtypes"),
            Form::GroupsDivide { groups, out } => write!(f, "group = {groups} does not divide {out} output channels"),
            Form::KernelShape { attr, weight } => {
                write!(f, "kernel_shape {attr:?} does not match the weight {weight:?}")
            }
            Form::Attribute { name, value, rank } => write!(f, "{name} {value:?} invalid for a {rank}-d kernel"),
            Form::AutoPadWithStride(a) => write!(f, "auto_pad {a} with stride > 1 pads by the input size"),
            Form::AutoPadSizeNotFixed(a) => {
                write!(f, "auto_pad {a} with stride > 1 pads by the input size, which is not fixed")
            }
            Form::AutoPadUnknown(a) => write!(f, "auto_pad {a:?} unknown"),
            Form::BnTrainingMode => f.write_str("BatchNormalization in training mode"),
            Form::BnTrainingOutputs => {
                f.write_str("BatchNormalization computes batch statistics (training mode outputs)")
            }
            Form::BnIsTest => f.write_str("BatchNormalization in training mode (is_test = 0)"),
            Form::BnNotSpatial => f.write_str("BatchNormalization with spatial = 0"),
            Form::BnFewInputs => f.write_str("BatchNormalization with fewer than 5 inputs"),
            Form::SliceWithout(what) => write!(f, "Slice without {what}"),
            Form::SliceLengths => f.write_str("Slice parameters of different lengths"),
            Form::SliceAxis(a) => write!(f, "Slice axis {a} out of range"),
            Form::SliceStep => f.write_str("Slice with a step other than 1"),
            Form::SliceBatchOrChannel => f.write_str("Slice on the batch or channel axis"),
            Form::SliceStartFromEnd(s) => write!(f, "Slice start {s} counts from the end"),
            Form::SliceEndBySize(e) => write!(f, "Slice end {e} depends on the input size"),
            Form::PadMode(m) => write!(f, "Pad in {m} mode before a branch"),
            Form::PadWithout => f.write_str("Pad without pads"),
            Form::PadAxes => f.write_str("Pad with axes"),
            Form::PadValue(v) => write!(f, "Pad with value {v}, not zero"),
            Form::PadLength => f.write_str("Pad amounts of the wrong length"),
            Form::PadBatchOrChannel => f.write_str("Pad on the batch or channel axis"),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Const(e) => write!(f, "{e}"),
            ReadError::Weight(e) => write!(f, "weight {e}"),
            ReadError::Bias(e) => write!(f, "bias {e}"),
            ReadError::SliceParam(e) => write!(f, "Slice parameter {e}"),
            ReadError::PadAmounts(e) => write!(f, "Pad amounts {e}"),
            ReadError::PadValue(e) => write!(f, "Pad value {e}"),
            ReadError::Channels(name, shape, c) => write!(f, "'{name}' has shape {shape:?}, expected {c} channels"),
            ReadError::Form(form) => write!(f, "{form}"),
        }
    }
}

impl From<Form> for ReadError {
    fn from(f: Form) -> Self {
        ReadError::Form(f)
    }
}

type Read<T> = Result<T, ReadError>;

/// A per-channel vector of `c` values (any shape with one non-unit axis).
fn vec1(a: ArrayD<f64>, name: &str, c: usize) -> Read<Array1<f64>> {
    if a.len() != c || a.shape().iter().filter(|&&d| d != 1).count() > 1 {
        return Err(ReadError::Channels(name.to_string(), a.shape().to_vec(), c));
    }
    let v: Vec<f64> = a.iter().copied().collect();
    Ok(Array1::from(v).into_dimensionality::<Ix1>().expect("one axis"))
}

/// A BatchNormalization in inference mode with constant parameters.
pub(crate) fn read_bn(k: &Consts, n: &NodeProto) -> Read<(BatchNorm, FloatType)> {
    if attr_int(n, "training_mode", 0) != 0 {
        return Err(Form::BnTrainingMode.into());
    }
    if n.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(Form::BnTrainingOutputs.into());
    }
    if attr(n, "is_test").is_some() && attr_int(n, "is_test", 0) == 0 {
        return Err(Form::BnIsTest.into());
    }
    if attr_int(n, "spatial", 1) != 1 {
        return Err(Form::BnNotSpatial.into());
    }
    if n.input.len() < 5 {
        return Err(Form::BnFewInputs.into());
    }
    let (scale, ft) = k.f64(&n.input[1]).map_err(ReadError::Const)?;
    let c = scale.len();
    let get = |i: usize| -> Read<Array1<f64>> { vec1(k.f64(&n.input[i]).map_err(ReadError::Const)?.0, &n.input[i], c) };
    let bn = BatchNorm {
        scale: vec1(scale, &n.input[1], c)?,
        bias: get(2)?,
        mean: get(3)?,
        var: get(4)?,
        epsilon: attr_float(n, "epsilon", 1e-5) as f64,
    };
    Ok((bn, ft))
}

/// A Conv with constant weight (and bias) as an affine convolution with explicit pads; refused
/// when its `auto_pad` pads by the input size (SAME_* with a stride > 1): see [`read_conv_at`].
pub(crate) fn read_conv(k: &Consts, n: &NodeProto) -> Read<(AffineConv, FloatType)> {
    let (w, f, ft) = read_conv_unresolved(k, n)?;
    if let Some(a) = f.by_size {
        return Err(Form::AutoPadWithStride(a.name().into()).into());
    }
    Ok((f.conv(w), ft))
}

/// [`read_conv`] for a Conv whose input has spatial size `len()` when that size is fixed (`None`:
/// it is not): an `auto_pad` that pads by the input size is resolved at that size (`len` is asked
/// only then).
pub(crate) fn read_conv_at(
    k: &Consts,
    n: &NodeProto,
    len: impl FnOnce() -> Option<Vec<usize>>,
) -> Read<(AffineConv, FloatType)> {
    let (w, mut f, ft) = read_conv_unresolved(k, n)?;
    if f.by_size.is_some() {
        let len: Option<Vec<i64>> = len().map(|l| l.iter().map(|&v| v as i64).collect());
        f.resolve(len.as_deref())?;
    }
    Ok((f.conv(w), ft))
}

/// A Conv's weight in f64 and its form, its `auto_pad` not resolved ([`ConvForm::by_size`]): what
/// a rule that changes only the weight and bias, never the window, reads.
pub(crate) fn read_conv_unresolved(k: &Consts, n: &NodeProto) -> Read<(ArrayD<f64>, ConvForm, FloatType)> {
    if n.input.len() < 2 {
        return Err(Form::ConvWithoutWeight.into());
    }
    let (w, ft) = k.f64(&n.input[1]).map_err(ReadError::Weight)?;
    let f = read_conv_form(k, n, w.shape(), ft)?;
    Ok((w, f, ft))
}

/// A Conv's `auto_pad` SAME mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Same {
    Upper,
    Lower,
}

impl Same {
    pub fn name(self) -> &'static str {
        match self {
            Same::Upper => "SAME_UPPER",
            Same::Lower => "SAME_LOWER",
        }
    }
}

/// A Conv but for its weight's values: what [`read_conv`] reads besides them.
pub(crate) struct ConvForm {
    pub bias: Option<Array1<f64>>,
    pub groups: usize,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads_begin: Vec<i64>,
    pub pads_end: Vec<i64>,
    /// `auto_pad` SAME_* with a stride > 1: the pads depend on the input size, and `pads_begin`
    /// and `pads_end` are not known (zeros) until [`ConvForm::resolve`] computes them.
    pub by_size: Option<Same>,
}

impl ConvForm {
    /// The pads at input size `len` (per spatial axis; `None`: the size is not fixed) when they
    /// depend on it, or why they cannot be known.
    pub fn resolve(&mut self, len: Option<&[i64]>) -> Read<()> {
        let Some(same) = self.by_size else { return Ok(()) };
        let Some(len) = len else { return Err(Form::AutoPadSizeNotFixed(same.name().into()).into()) };
        for (a, &l) in len.iter().enumerate().take(self.kernel.len()) {
            let (k, s, d) = (self.kernel[a] as i64, self.strides[a] as i64, self.dilations[a] as i64);
            (self.pads_begin[a], self.pads_end[a]) = same_pads(l, k, s, d, same == Same::Upper);
        }
        self.by_size = None;
        Ok(())
    }

    /// The affine convolution of weight `w` (zero crop).
    pub fn conv(self, w: ArrayD<f64>) -> AffineConv {
        debug_assert!(self.by_size.is_none(), "pads resolved");
        AffineConv::new(w, self.bias, self.groups, self.strides, self.dilations, self.pads_begin, self.pads_end)
    }
}

/// Conv `n` whose weight has shape `shape` and type `ft`, but for the weight's values (the checks
/// and the refusals of [`read_conv`], but for an `auto_pad` that pads by the input size).
pub(crate) fn read_conv_form(k: &Consts, n: &NodeProto, shape: &[usize], ft: FloatType) -> Read<ConvForm> {
    if shape.len() < 3 {
        return Err(Form::WeightRank(shape.len()).into());
    }
    let r = shape.len() - 2;
    let o = shape[0];
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => {
            let (a, bt) = k.f64(b).map_err(ReadError::Bias)?;
            if bt != ft {
                return Err(Form::BiasDtype.into());
            }
            Some(vec1(a, b, o)?)
        }
        None => None,
    };
    let groups = attr_int(n, "group", 1);
    if groups < 1 || !o.is_multiple_of(groups as usize) {
        return Err(Form::GroupsDivide { groups, out: o }.into());
    }
    let kernel: Vec<usize> = shape[2..].to_vec();
    if let Some(ks) = attr_ints(n, "kernel_shape") {
        if ks.iter().map(|&k| k as usize).ne(kernel.iter().copied()) {
            return Err(Form::KernelShape { attr: ks, weight: kernel }.into());
        }
    }
    let pos = |name: &'static str| -> Read<Vec<usize>> {
        match attr_ints(n, name) {
            None => Ok(vec![1; r]),
            Some(v) if v.len() == r && v.iter().all(|&x| x >= 1) => Ok(v.iter().map(|&x| x as usize).collect()),
            Some(v) => Err(Form::Attribute { name, value: v, rank: r }.into()),
        }
    };
    let strides = pos("strides")?;
    let dilations = pos("dilations")?;
    let auto_pad = attr_string(n, "auto_pad").unwrap_or_default();
    let mut by_size = None;
    let (pb, pe) = match auto_pad.as_str() {
        "" | "NOTSET" => match attr_ints(n, "pads") {
            None => (vec![0; r], vec![0; r]),
            Some(p) if p.len() == 2 * r && p.iter().all(|&x| x >= 0) => (p[..r].to_vec(), p[r..].to_vec()),
            Some(p) => return Err(Form::Attribute { name: "pads", value: p, rank: r }.into()),
        },
        "VALID" => (vec![0; r], vec![0; r]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let same = if auto_pad == "SAME_UPPER" { Same::Upper } else { Same::Lower };
            if strides.iter().any(|&s| s > 1) {
                by_size = Some(same);
                (vec![0; r], vec![0; r])
            } else {
                // (at stride 1 the same at every input size)
                (0..r).map(|a| same_pads(1, kernel[a] as i64, 1, dilations[a] as i64, same == Same::Upper)).unzip()
            }
        }
        _ => return Err(Form::AutoPadUnknown(auto_pad).into()),
    };
    Ok(ConvForm { bias, groups: groups as usize, kernel, strides, dilations, pads_begin: pb, pads_end: pe, by_size })
}

/// Crop per spatial axis (begin, end) that a Slice applies to a tensor of rank `rank`.
pub(crate) fn read_slice(k: &Consts, n: &NodeProto, rank: usize, opset: i64) -> Read<(Vec<i64>, Vec<i64>)> {
    let (starts, ends, axes, steps) = if opset < 10 {
        let s = attr_ints(n, "starts").ok_or(Form::SliceWithout("starts"))?;
        let e = attr_ints(n, "ends").ok_or(Form::SliceWithout("ends"))?;
        (s, e, attr_ints(n, "axes"), None)
    } else {
        let get = |i: usize| -> Read<Option<Vec<i64>>> {
            match n.input.get(i).filter(|s| !s.is_empty()) {
                Some(name) => k.i64(name).map(Some).map_err(ReadError::SliceParam),
                None => Ok(None),
            }
        };
        let starts = get(1)?.ok_or(Form::SliceWithout("starts"))?;
        (starts, get(2)?.ok_or(Form::SliceWithout("ends"))?, get(3)?, get(4)?)
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    if axes.len() != starts.len()
        || ends.len() != starts.len()
        || steps.as_ref().is_some_and(|s| s.len() != starts.len())
    {
        return Err(Form::SliceLengths.into());
    }
    let r = rank - 2;
    let (mut cb, mut ce) = (vec![0i64; r], vec![0i64; r]);
    for i in 0..axes.len() {
        let ax = if axes[i] < 0 { axes[i] + rank as i64 } else { axes[i] };
        if ax < 0 || ax >= rank as i64 {
            return Err(Form::SliceAxis(axes[i]).into());
        }
        if steps.as_ref().is_some_and(|s| s[i] != 1) {
            return Err(Form::SliceStep.into());
        }
        let (s, e) = (starts[i], ends[i]);
        let full_end = e >= i32::MAX as i64;
        if ax < 2 {
            if s == 0 && full_end {
                continue;
            }
            return Err(Form::SliceBatchOrChannel.into());
        }
        if s < 0 {
            return Err(Form::SliceStartFromEnd(s).into());
        }
        let end_crop = if full_end {
            0
        } else if e < 0 {
            -e
        } else {
            return Err(Form::SliceEndBySize(e).into());
        };
        cb[ax as usize - 2] += s;
        ce[ax as usize - 2] += end_crop;
    }
    Ok((cb, ce))
}

/// Pads (begin, end) per spatial axis of a zero-constant Pad; negative pads crop.
pub(crate) fn read_pad(k: &Consts, n: &NodeProto, rank: usize, opset: i64) -> Read<(Vec<i64>, Vec<i64>)> {
    let mode = attr_string(n, "mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(Form::PadMode(mode).into());
    }
    let (pads, value) = if opset < 11 {
        let pads = attr_ints(n, "pads").or_else(|| attr_ints(n, "paddings")).ok_or(Form::PadWithout)?;
        (pads, attr_float(n, "value", 0.0) as f64)
    } else {
        let amounts = n.input.get(1).filter(|s| !s.is_empty()).ok_or(Form::PadWithout)?;
        let pads = k.i64(amounts).map_err(ReadError::PadAmounts)?;
        let value = match n.input.get(2).filter(|s| !s.is_empty()) {
            Some(v) => k.f64(v).map_err(ReadError::PadValue)?.0.iter().next().copied().unwrap_or(0.0),
            None => 0.0,
        };
        if n.input.get(3).is_some_and(|s| !s.is_empty()) {
            return Err(Form::PadAxes.into());
        }
        (pads, value)
    };
    if value != 0.0 {
        return Err(Form::PadValue(value).into());
    }
    if pads.len() != 2 * rank {
        return Err(Form::PadLength.into());
    }
    if pads[0] != 0 || pads[1] != 0 || pads[rank] != 0 || pads[rank + 1] != 0 {
        return Err(Form::PadBatchOrChannel.into());
    }
    Ok((pads[2..rank].to_vec(), pads[rank + 2..].to_vec()))
}
