//! Constant subgraphs evaluated: a tensor computed only from constants (initializers, Constant
//! nodes) by deterministic operators is a constant too. Exporters leave such subgraphs in the
//! graph: TorchScript keeps `Sigmoid → Reshape → Gather` of a parameter (EfficientViM's gates) and
//! computes a Pad's amounts by `ConstantOfShape → Concat → Reshape → Slice → Transpose → Cast`.
//!
//! A Shape or Size of a constant is a constant too (opset-11 TorchScript computes a Pad's amounts
//! from the Shape of the constant list of amounts).
//!
//! Floats are evaluated in f64 (the exact value of the operator on the stored parameters), integers
//! in i64. Only small tensors are evaluated ([`MAX_ELEMS`]), at most [`MAX_NODES`] nodes per call.

use super::attrs::{attr, attr_float, attr_int, attr_ints, attr_string, is_default_domain};
use super::consts::{ConstError, Consts};
use super::linalg;
use crate::model::tensor::{to_f64, to_i64, FloatType};
use crate::proto::{tensor_proto::DataType, NodeProto, TensorProto};
use ndarray::{ArrayD, Axis, IxDyn};
use std::collections::HashMap;

/// Largest tensor evaluated (elements).
pub(crate) const MAX_ELEMS: usize = 1 << 22;
/// Most nodes evaluated for one constant.
pub(crate) const MAX_NODES: usize = 256;

/// A constant's value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Float(ArrayD<f64>, FloatType),
    Int(ArrayD<i64>),
}

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Float(a, _) => a.shape(),
            Value::Int(a) => a.shape(),
        }
    }
    fn len(&self) -> usize {
        self.shape().iter().product()
    }
    /// The same elements in another shape (row-major order).
    fn reshaped(self, shape: &[usize]) -> Option<Value> {
        let sh = IxDyn(shape);
        Some(match self {
            Value::Float(a, ft) => {
                Value::Float(a.as_standard_layout().into_owned().into_shape_with_order(sh).ok()?, ft)
            }
            Value::Int(a) => Value::Int(a.as_standard_layout().into_owned().into_shape_with_order(sh).ok()?),
        })
    }
    /// Apply the same shape operation to either kind.
    fn map_shape(
        self,
        f: impl Fn(ArrayD<f64>) -> Option<ArrayD<f64>>,
        g: impl Fn(ArrayD<i64>) -> Option<ArrayD<i64>>,
    ) -> Option<Value> {
        Some(match self {
            Value::Float(a, ft) => Value::Float(f(a)?, ft),
            Value::Int(a) => Value::Int(g(a)?),
        })
    }
    fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Int(a) => Some(a.iter().copied().collect()),
            Value::Float(..) => None,
        }
    }
}

/// Decode a stored tensor.
pub(crate) fn decode(t: &TensorProto, raw: Option<&[u8]>) -> Result<Value, String> {
    let code = t.data_type.unwrap_or(0);
    if let Some(ft) = FloatType::from_onnx(code) {
        return Ok(Value::Float(to_f64(t, raw)?, ft));
    }
    let v = to_i64(t, raw)?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), v).map(Value::Int).map_err(|e| e.to_string())
}

/// Evaluates constant subgraphs of one graph (a memo per evaluation).
pub(crate) struct Folder<'c, 'a> {
    consts: &'c Consts<'a>,
    memo: HashMap<String, Result<Value, ConstError>>,
    visited: usize,
}

impl<'c, 'a> Folder<'c, 'a> {
    pub fn new(consts: &'c Consts<'a>) -> Self {
        Folder { consts, memo: HashMap::new(), visited: 0 }
    }

    /// The value of tensor `name`, or why it is not a constant.
    pub fn value(&mut self, name: &str) -> Result<Value, ConstError> {
        if let Some(v) = self.memo.get(name) {
            return v.clone();
        }
        let v = self.compute(name);
        // (a stored constant is decoded again when read again: as cheap as a copy of the memo's,
        // and the usual read — one weight, once — copies nothing)
        if self.consts.ix.constant(self.consts.model.graph(), name).is_none() {
            self.memo.insert(name.to_string(), v.clone());
        }
        v
    }

    fn compute(&mut self, name: &str) -> Result<Value, ConstError> {
        let (model, ix) = (self.consts.model, self.consts.ix);
        let g = model.graph();
        if let Some(t) = ix.constant(g, name) {
            let code = t.data_type.unwrap_or(0);
            if let (Some(ft), Some(a)) = (FloatType::from_onnx(code), self.consts.exact.get(name)) {
                if ix.initializer.contains_key(name) {
                    return Ok(Value::Float(a.to_f64(), ft));
                }
            }
            let ok_type = FloatType::from_onnx(code).is_some()
                || code == DataType::Int64 as i32
                || code == DataType::Int32 as i32;
            if !ok_type {
                return Err(ConstError::Dtype { name: name.to_string(), code });
            }
            let raw = model.raw_bytes(t).map_err(|e| ConstError::Data(e.to_string()))?;
            return decode(t, raw.as_deref()).map_err(ConstError::Data);
        }
        let computed = || {
            if ix.inputs.contains(name) {
                ConstError::GraphInput(name.to_string())
            } else {
                ConstError::Computed(name.to_string())
            }
        };
        let Some(n) = ix.producer_node(g, name) else { return Err(computed()) };
        self.visited += 1;
        if self.visited > MAX_NODES || !is_default_domain(n) || n.output.first().map(|o| o.as_str()) != Some(name) {
            return Err(computed());
        }
        // operators we evaluate; anything else is not a constant here
        if !EVALUATED.contains(&n.op_type()) {
            return Err(computed());
        }
        let mut ins = Vec::with_capacity(n.input.len());
        for i in &n.input {
            ins.push(if i.is_empty() { None } else { Some(self.value(i)?) });
        }
        let opset = super::default_opset(&model.proto);
        match eval(n, ins, opset) {
            Some(v) if v.len() <= MAX_ELEMS => Ok(v),
            _ => Err(computed()),
        }
    }
}

const EVALUATED: &[&str] = &[
    "Identity",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Transpose",
    "Concat",
    "Slice",
    "Gather",
    "Cast",
    "ConstantOfShape",
    "Sigmoid",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Abs",
    "Tanh",
    "Relu",
    "Floor",
    "Ceil",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Shape",
    "Size",
    "MatMul",
    "Gemm",
    "Einsum",
    "Conv",
    "Pad",
    "Expand",
    "Tile",
    "Sum",
    "Max",
    "Min",
];

fn axis_of(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

fn ints_input(ins: &[Option<Value>], k: usize) -> Option<Option<Vec<i64>>> {
    match ins.get(k) {
        None | Some(None) => Some(None),
        Some(Some(v)) => Some(Some(v.ints()?)),
    }
}

/// One operator on constant inputs; `None` when it is not evaluated here.
fn eval(n: &NodeProto, mut ins: Vec<Option<Value>>, opset: i64) -> Option<Value> {
    let x = ins.first().cloned().flatten();
    let op = n.op_type();
    match op {
        "Identity" => x,
        "Reshape" => {
            let x = x?;
            let target = ins.get(1)?.as_ref()?.ints()?;
            let allowzero = attr_int(n, "allowzero", 0) != 0;
            let mut out: Vec<i64> = target
                .iter()
                .enumerate()
                .map(|(i, &d)| if d == 0 && !allowzero { x.shape().get(i).map_or(-2, |&v| v as i64) } else { d })
                .collect();
            let known = out.iter().filter(|&&d| d >= 0).try_fold(1i64, |a, &d| a.checked_mul(d))?;
            if let Some(p) = out.iter().position(|&d| d == -1) {
                if known == 0 || x.len() as i64 % known != 0 {
                    return None;
                }
                out[p] = x.len() as i64 / known;
            }
            if out.iter().any(|&d| d < 0) {
                return None;
            }
            let shape: Vec<usize> = out.iter().map(|&d| d as usize).collect();
            x.reshaped(&shape)
        }
        "Unsqueeze" | "Squeeze" => {
            let x = x?;
            let axes = match attr_ints(n, "axes") {
                Some(a) => Some(a),
                None => ints_input(&ins, 1)?,
            };
            let mut shape = x.shape().to_vec();
            if op == "Squeeze" {
                let r = shape.len();
                let axes: Option<Vec<usize>> = match axes {
                    Some(v) => Some(v.iter().map(|&a| axis_of(a, r)).collect::<Option<Vec<usize>>>()?),
                    None => None,
                };
                shape = shape
                    .iter()
                    .enumerate()
                    .filter(|&(i, &d)| !(d == 1 && axes.as_ref().is_none_or(|a| a.contains(&i))))
                    .map(|(_, &d)| d)
                    .collect();
            } else {
                let axes = axes?;
                let r = shape.len() + axes.len();
                let mut axes: Vec<usize> = axes.iter().map(|&a| axis_of(a, r)).collect::<Option<_>>()?;
                axes.sort_unstable();
                for a in axes {
                    if a > shape.len() {
                        return None;
                    }
                    shape.insert(a, 1);
                }
            }
            x.reshaped(&shape)
        }
        "Flatten" => {
            let x = x?;
            let r = x.shape().len();
            let a = attr_int(n, "axis", 1);
            let a = if a < 0 { a + r as i64 } else { a };
            if !(0..=r as i64).contains(&a) {
                return None;
            }
            let a = a as usize;
            let (p, q) = (x.shape()[..a].iter().product(), x.shape()[a..].iter().product());
            x.reshaped(&[p, q])
        }
        "Transpose" => {
            let x = x?;
            let r = x.shape().len();
            let perm: Vec<usize> = match attr_ints(n, "perm") {
                Some(p) => p.iter().map(|&a| axis_of(a, r)).collect::<Option<_>>()?,
                None => (0..r).rev().collect(),
            };
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if sorted != (0..r).collect::<Vec<_>>() {
                return None;
            }
            x.map_shape(
                |a| Some(a.permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()),
                |a| Some(a.permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()),
            )
        }
        "Concat" => {
            let vals: Vec<Value> = ins.into_iter().collect::<Option<_>>()?;
            let first = vals.first()?;
            let ax = axis_of(attr_int(n, "axis", 0), first.shape().len())?;
            match first {
                Value::Float(_, ft) => {
                    let ft = *ft;
                    let arrs: Vec<ArrayD<f64>> = vals
                        .into_iter()
                        .map(|v| match v {
                            Value::Float(a, t) if t == ft => Some(a),
                            _ => None,
                        })
                        .collect::<Option<_>>()?;
                    let views: Vec<_> = arrs.iter().map(|a| a.view()).collect();
                    Some(Value::Float(ndarray::concatenate(Axis(ax), &views).ok()?, ft))
                }
                Value::Int(_) => {
                    let arrs: Vec<ArrayD<i64>> = vals
                        .into_iter()
                        .map(|v| match v {
                            Value::Int(a) => Some(a),
                            _ => None,
                        })
                        .collect::<Option<_>>()?;
                    let views: Vec<_> = arrs.iter().map(|a| a.view()).collect();
                    Some(Value::Int(ndarray::concatenate(Axis(ax), &views).ok()?))
                }
            }
        }
        "Slice" => {
            let x = x?;
            let r = x.shape().len();
            let (starts, ends, axes, steps) = if opset < 10 {
                (attr_ints(n, "starts")?, attr_ints(n, "ends")?, attr_ints(n, "axes"), None)
            } else {
                (ints_input(&ins, 1)??, ints_input(&ins, 2)??, ints_input(&ins, 3)?, ints_input(&ins, 4)?)
            };
            let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
            if ends.len() != starts.len() || axes.len() != starts.len() {
                return None;
            }
            let mut picks: Vec<(usize, Vec<usize>)> = vec![];
            for i in 0..starts.len() {
                let ax = axis_of(axes[i], r)?;
                let dim = x.shape()[ax] as i64;
                let step = steps.as_ref().map_or(1, |s| s[i]);
                if step == 0 {
                    return None;
                }
                let clampi = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
                let norm = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
                let idx: Vec<usize> = if step > 0 {
                    let (s, e) = (clampi(norm(starts[i]), 0, dim), clampi(norm(ends[i]), 0, dim));
                    (s..e).step_by(step as usize).map(|v| v as usize).collect()
                } else {
                    let (s, e) = (clampi(norm(starts[i]), -1, dim - 1), clampi(norm(ends[i]), -1, dim - 1));
                    let mut v = vec![];
                    let mut k = s;
                    while k > e {
                        v.push(k as usize);
                        k += step;
                    }
                    v
                };
                picks.push((ax, idx));
            }
            x.map_shape(
                |mut a| {
                    for (ax, idx) in &picks {
                        a = a.select(Axis(*ax), idx);
                    }
                    Some(a)
                },
                |mut a| {
                    for (ax, idx) in &picks {
                        a = a.select(Axis(*ax), idx);
                    }
                    Some(a)
                },
            )
        }
        "Gather" => {
            let x = x?;
            let idx = ins.get(1)?.as_ref()?;
            let ishape = idx.shape().to_vec();
            let r = x.shape().len();
            let ax = axis_of(attr_int(n, "axis", 0), r)?;
            let dim = x.shape()[ax] as i64;
            let flat: Vec<usize> = idx
                .ints()?
                .iter()
                .map(|&i| {
                    let i = if i < 0 { i + dim } else { i };
                    (0..dim).contains(&i).then_some(i as usize)
                })
                .collect::<Option<_>>()?;
            let mut shape: Vec<usize> = x.shape()[..ax].to_vec();
            shape.extend(&ishape);
            shape.extend(&x.shape()[ax + 1..]);
            x.map_shape(|a| Some(a.select(Axis(ax), &flat)), |a| Some(a.select(Axis(ax), &flat)))?.reshaped(&shape)
        }
        "Cast" => {
            let x = x?;
            let to = attr_int(n, "to", 0) as i32;
            if let Some(ft) = FloatType::from_onnx(to) {
                let a = match x {
                    Value::Float(a, _) => a,
                    Value::Int(a) => a.mapv(|v| v as f64),
                };
                // the cast rounds to the target type
                let a = match ft {
                    FloatType::F32 => a.mapv(|v| v as f32 as f64),
                    FloatType::F16 => a.mapv(|v| half::f16::from_f64(v).to_f64()),
                    FloatType::BF16 => a.mapv(|v| half::bf16::from_f64(v).to_f64()),
                    FloatType::F64 => a,
                };
                Some(Value::Float(a, ft))
            } else if to == DataType::Int64 as i32 || to == DataType::Int32 as i32 {
                Some(Value::Int(match x {
                    Value::Int(a) => a,
                    Value::Float(a, _) => {
                        if a.iter().any(|v| !v.is_finite() || v.abs() >= 9.0e15) {
                            return None;
                        }
                        a.mapv(|v| v.trunc() as i64)
                    }
                }))
            } else {
                None
            }
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = x?.ints()?.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
            if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))? > MAX_ELEMS {
                return None;
            }
            let t = attr(n, "value").and_then(|a| a.t.as_ref());
            let v = match t {
                None => Value::Float(ArrayD::zeros(IxDyn(&[1])), FloatType::F32),
                Some(t) => decode(t, t.raw_data.as_deref()).ok()?,
            };
            match v {
                Value::Float(a, ft) => Some(Value::Float(ArrayD::from_elem(IxDyn(&shape), *a.iter().next()?), ft)),
                Value::Int(a) => Some(Value::Int(ArrayD::from_elem(IxDyn(&shape), *a.iter().next()?))),
            }
        }
        "Shape" => {
            // of a constant (opset 15: start / end)
            let shape: Vec<i64> = x?.shape().iter().map(|&d| d as i64).collect();
            let r = shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (a, b) = (clamp(attr_int(n, "start", 0)), clamp(attr_int(n, "end", r)));
            let v = if a < b { shape[a..b].to_vec() } else { vec![] };
            Some(Value::Int(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).ok()?))
        }
        "Size" => Some(Value::Int(ndarray::arr0(x?.len() as i64).into_dyn())),
        "Sigmoid" | "Neg" | "Exp" | "Log" | "Sqrt" | "Reciprocal" | "Abs" | "Tanh" | "Relu" | "Floor" | "Ceil" => {
            let f: fn(f64) -> f64 = match op {
                "Sigmoid" => |v| 1.0 / (1.0 + (-v).exp()),
                "Neg" => |v| -v,
                "Exp" => f64::exp,
                "Log" => f64::ln,
                "Sqrt" => f64::sqrt,
                "Reciprocal" => |v| 1.0 / v,
                "Abs" => f64::abs,
                "Tanh" => f64::tanh,
                "Relu" => |v| v.max(0.0),
                "Floor" => f64::floor,
                _ => f64::ceil,
            };
            match x? {
                Value::Float(a, ft) => Some(Value::Float(a.mapv(f), ft)),
                Value::Int(a) if op == "Neg" => Some(Value::Int(a.mapv(|v| -v))),
                Value::Int(a) if op == "Abs" => Some(Value::Int(a.mapv(|v| v.abs()))),
                Value::Int(a) if op == "Relu" => Some(Value::Int(a.mapv(|v| v.max(0)))),
                Value::Int(_) => None,
            }
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" => {
            let b = ins.get_mut(1)?.take()?;
            match (x?, b) {
                (Value::Float(a, ft), Value::Float(b, fb)) if ft == fb || op == "Pow" => {
                    let f: fn(f64, f64) -> f64 = match op {
                        "Add" => |p, q| p + q,
                        "Sub" => |p, q| p - q,
                        "Mul" => |p, q| p * q,
                        "Div" => |p, q| p / q,
                        _ => f64::powf,
                    };
                    Some(Value::Float(zip(&a, &b, f)?, ft))
                }
                (Value::Int(a), Value::Int(b)) if op != "Pow" => {
                    if op == "Div" && b.iter().any(|&q| q == 0) {
                        return None;
                    }
                    let f: fn(i64, i64) -> Option<i64> = match op {
                        "Add" => i64::checked_add,
                        "Sub" => i64::checked_sub,
                        "Mul" => i64::checked_mul,
                        _ => |p, q| p.checked_div(q),
                    };
                    let out = zip(&a, &b, f)?;
                    if out.iter().any(|v| v.is_none()) {
                        return None;
                    }
                    Some(Value::Int(out.mapv(|v| v.expect("checked"))))
                }
                _ => None,
            }
        }
        "MatMul" | "Gemm" | "Einsum" | "Conv" => {
            // linear algebra: in f64, the type of the first float operand
            let vals: Vec<Option<(ArrayD<f64>, FloatType)>> = ins
                .into_iter()
                .map(|v| match v {
                    Some(Value::Float(a, ft)) => Some((a, ft)),
                    _ => None,
                })
                .collect();
            let ft = vals.iter().flatten().next()?.1;
            let arr = |k: usize| vals.get(k).and_then(|v| v.as_ref()).map(|v| &v.0);
            let y = match op {
                "MatMul" => linalg::matmul(arr(0)?, arr(1)?)?,
                "Gemm" => linalg::gemm(
                    arr(0)?,
                    arr(1)?,
                    arr(2),
                    attr_float(n, "alpha", 1.0) as f64,
                    attr_float(n, "beta", 1.0) as f64,
                    attr_int(n, "transA", 0) != 0,
                    attr_int(n, "transB", 0) != 0,
                )?,
                "Einsum" => {
                    let ops: Vec<ArrayD<f64>> = (0..vals.len()).map(|k| arr(k).cloned()).collect::<Option<_>>()?;
                    linalg::einsum(&attr_string(n, "equation")?, &ops)?
                }
                _ => {
                    let (x, w) = (arr(0)?, arr(1)?);
                    let r = w.ndim().checked_sub(2)?;
                    if attr_string(n, "auto_pad").is_some_and(|a| a != "NOTSET" && a != "VALID") {
                        return None;
                    }
                    let get = |name: &str| attr_ints(n, name).unwrap_or_else(|| vec![1; r]);
                    let to_u =
                        |v: Vec<i64>| v.into_iter().map(|d| usize::try_from(d).ok()).collect::<Option<Vec<usize>>>();
                    let pads = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 2 * r]);
                    if pads.len() != 2 * r {
                        return None;
                    }
                    let attrs = linalg::ConvAttrs {
                        groups: usize::try_from(attr_int(n, "group", 1)).ok()?,
                        strides: to_u(get("strides"))?,
                        dilations: to_u(get("dilations"))?,
                        pads_begin: to_u(pads[..r].to_vec())?,
                        pads_end: to_u(pads[r..].to_vec())?,
                    };
                    linalg::conv(x, w, arr(2), &attrs)?
                }
            };
            Some(Value::Float(y, ft))
        }
        "Pad" => {
            let x = x?;
            let r = x.shape().len();
            if attr_string(n, "mode").is_some_and(|m| m != "constant") {
                return None;
            }
            let amounts = if opset < 11 { attr_ints(n, "pads")? } else { ins.get(1)?.as_ref()?.ints()? };
            let axes: Vec<usize> = match ints_input(&ins, 3)? {
                Some(a) => a.iter().map(|&v| axis_of(v, r)).collect::<Option<_>>()?,
                None => (0..r).collect(),
            };
            if amounts.len() != 2 * axes.len() {
                return None;
            }
            let (mut b, mut e) = (vec![0; r], vec![0; r]);
            for (k, &a) in axes.iter().enumerate() {
                b[a] = amounts[k];
                e[a] = amounts[k + axes.len()];
            }
            let value = if opset < 11 { None } else { ins.get(2).cloned().flatten() };
            match x {
                Value::Float(a, ft) => {
                    let v = match value {
                        Some(Value::Float(v, _)) => *v.iter().next()?,
                        None => attr_float(n, "value", 0.0) as f64,
                        _ => return None,
                    };
                    Some(Value::Float(linalg::pad(&a, &b, &e, v)?, ft))
                }
                Value::Int(a) => {
                    let v = match value {
                        Some(Value::Int(v)) => *v.iter().next()?,
                        None => 0,
                        _ => return None,
                    };
                    Some(Value::Int(linalg::pad(&a, &b, &e, v)?))
                }
            }
        }
        "Expand" | "Tile" => {
            let k = ins.get(1)?.as_ref()?.ints()?;
            let f = |a: ArrayD<f64>| if op == "Expand" { linalg::expand(&a, &k) } else { linalg::tile(&a, &k) };
            let g = |a: ArrayD<i64>| if op == "Expand" { linalg::expand(&a, &k) } else { linalg::tile(&a, &k) };
            x?.map_shape(f, g)
        }
        "Sum" | "Max" | "Min" => {
            let vals: Vec<Value> = ins.into_iter().collect::<Option<_>>()?;
            let mut it = vals.into_iter();
            let mut acc = it.next()?;
            for v in it {
                acc = match (acc, v) {
                    (Value::Float(a, ft), Value::Float(b, fb)) if ft == fb => {
                        let f: fn(f64, f64) -> f64 = match op {
                            "Sum" => |p, q| p + q,
                            "Max" => f64::max,
                            _ => f64::min,
                        };
                        Value::Float(zip(&a, &b, f)?, ft)
                    }
                    (Value::Int(a), Value::Int(b)) => {
                        let f: fn(i64, i64) -> Option<i64> = match op {
                            "Sum" => i64::checked_add,
                            "Max" => |p, q| Some(p.max(q)),
                            _ => |p, q| Some(p.min(q)),
                        };
                        let out = zip(&a, &b, f)?;
                        if out.iter().any(|v| v.is_none()) {
                            return None;
                        }
                        Value::Int(out.mapv(|v| v.expect("checked")))
                    }
                    _ => return None,
                };
            }
            Some(acc)
        }
        _ => None,
    }
}

/// Element-wise `f(a, b)` with numpy broadcasting.
fn zip<T: Copy, U>(a: &ArrayD<T>, b: &ArrayD<T>, f: impl Fn(T, T) -> U) -> Option<ArrayD<U>> {
    let r = a.ndim().max(b.ndim());
    let dim = |s: &[usize], i: usize| if i + s.len() >= r { s[i + s.len() - r] } else { 1 };
    let mut shape = Vec::with_capacity(r);
    for i in 0..r {
        let (p, q) = (dim(a.shape(), i), dim(b.shape(), i));
        shape.push(if p == q || q == 1 {
            p
        } else if p == 1 {
            q
        } else {
            return None;
        });
    }
    if shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))? > MAX_ELEMS {
        return None;
    }
    let (av, bv) = (a.broadcast(IxDyn(&shape))?, b.broadcast(IxDyn(&shape))?);
    Some(ndarray::Zip::from(&av).and(&bv).map_collect(|&p, &q| f(p, q)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::GraphIndex;
    use crate::support::{attr_int, attr_ints, Builder};

    fn value_of(b: &Builder, name: &str) -> Result<Value, ConstError> {
        let m = b.build();
        let ix = GraphIndex::new(m.graph());
        let exact = HashMap::new();
        let consts = Consts { model: &m, ix: &ix, exact: &exact };
        Folder::new(&consts).value(name)
    }

    #[test]
    fn a_gate_computed_from_a_parameter_is_a_constant() {
        // EfficientViM (TorchScript): Gather(Reshape(Sigmoid(alpha[2,3]), [2,-1,1,1]), 1, axis 0)
        let mut b = Builder::new(3, 4, 4);
        let alpha = b.rand(&[2, 3]);
        let a = b.initializer("alpha", &alpha);
        let s = b.node("Sigmoid", "sig", &[&a], &[], vec![]);
        let shape = b.initializer_i64("shape", &[2, -1, 1, 1]);
        let r = b.node("Reshape", "r", &[&s, &shape], &[], vec![]);
        let i = b.initializer_i64("one", &[1]);
        let g = b.node("Gather", "g", &[&r, &i], &[], vec![attr_int("axis", 0)]);
        let Ok(Value::Float(v, FloatType::F32)) = value_of(&b, &g) else { panic!("not a constant") };
        assert_eq!(v.shape(), [1, 3, 1, 1]);
        for c in 0..3 {
            let want = 1.0 / (1.0 + (-alpha[[1, c]]).exp());
            assert!((v[[0, c, 0, 0]] - want).abs() < 1e-15);
        }
    }

    #[test]
    fn torchscript_pad_amounts_are_a_constant() {
        // F.pad(x, [1, 1, 2, 2]) as TorchScript writes the amounts
        let mut b = Builder::new(3, 4, 4);
        let four = b.initializer_i64("four", &[4]);
        let zeros = b.node("ConstantOfShape", "zeros", &[&four], &[], vec![]);
        let zeros = {
            // ConstantOfShape without value gives float zeros; TorchScript writes int64 zeros
            let n = b.graph.node.last_mut().unwrap();
            n.attribute.push(crate::proto::AttributeProto {
                name: Some("value".into()),
                t: Some(crate::model::tensor::from_i64("", &[1], &[0])),
                r#type: Some(crate::proto::attribute_proto::AttributeType::Tensor as i32),
                ..Default::default()
            });
            zeros
        };
        let given = b.initializer_i64("given", &[1, 1, 2, 2]);
        let cat = b.node("Concat", "cat", &[&given, &zeros], &[], vec![attr_int("axis", 0)]);
        let sh = b.initializer_i64("sh", &[-1, 2]);
        let r = b.node("Reshape", "r", &[&cat, &sh], &[], vec![]);
        let (s0, e0, a0, st) = (
            b.initializer_i64("s", &[-1]),
            b.initializer_i64("e", &[i64::MIN + 1]),
            b.initializer_i64("a", &[0]),
            b.initializer_i64("st", &[-1]),
        );
        let sl = b.node("Slice", "sl", &[&r, &s0, &e0, &a0, &st], &[], vec![]);
        let t = b.node("Transpose", "t", &[&sl], &[], vec![attr_ints("perm", &[1, 0])]);
        let m1 = b.initializer_i64("m1", &[-1]);
        let flat = b.node("Reshape", "flat", &[&t, &m1], &[], vec![]);
        let c = b.node("Cast", "c", &[&flat], &[], vec![attr_int("to", DataType::Int64 as i64)]);
        let Ok(Value::Int(v)) = value_of(&b, &c) else { panic!("not a constant") };
        // rows reversed: [[0,0],[0,0],[2,2],[1,1]] → transposed, flattened: begins then ends (N, C, H, W)
        assert_eq!(v.iter().copied().collect::<Vec<_>>(), [0, 0, 2, 1, 0, 0, 2, 1]);
    }

    #[test]
    fn a_graph_input_is_not_a_constant() {
        let mut b = Builder::new(3, 4, 4);
        let s = b.node("Sigmoid", "sig", &["x"], &[], vec![]);
        assert_eq!(value_of(&b, &s), Err(ConstError::GraphInput("x".into())));
    }
}
