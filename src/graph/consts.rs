//! Constant tensors as numbers: float constants as f64 arrays, integer constants as i64, looking
//! through the shape-only operators exporters put around them (`Reshape(weight, [1, C, 1, 1])`,
//! `Unsqueeze`, `Squeeze`, `Identity`, `Cast`).

use super::attrs::{attr_ints, is_default_domain, is_op};
use super::GraphIndex;
use crate::model::tensor::{to_f64, to_i64, FloatType};
use crate::model::Model;
use ndarray::ArrayD;
use std::collections::HashMap;
use std::fmt;

/// Why a tensor cannot be read as a constant.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstError {
    /// An initializer also listed as a graph input (a runtime may override it), or a graph input.
    GraphInput(String),
    /// The output of a node that is not a constant.
    Computed(String),
    /// Not a constant integer tensor.
    NotConstant(String),
    /// A tensor of a type the kernel maths does not handle (the ONNX data type code).
    Dtype { name: String, code: i32 },
    /// The tensor's data cannot be decoded.
    Data(String),
}

impl fmt::Display for ConstError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConstError::GraphInput(n) => write!(f, "'{n}' is a graph input, not a constant"),
            ConstError::Computed(n) => write!(f, "'{n}' is computed, not a constant"),
            ConstError::NotConstant(n) => write!(f, "'{n}' is not a constant"),
            ConstError::Dtype { name, code } => {
                write!(f, "'{name}' has data type {code}, which the kernel maths does not handle")
            }
            ConstError::Data(msg) => f.write_str(msg),
        }
    }
}

/// Reads the constants of a model's graph. `exact` holds the f64 values of tensors the rewrite
/// wrote (the graph holds them rounded to their dtype), so that a kernel folded and then merged
/// is rounded once.
pub(crate) struct Consts<'a> {
    pub model: &'a Model,
    pub ix: &'a GraphIndex,
    pub exact: &'a HashMap<String, ArrayD<f64>>,
}

impl Consts<'_> {
    /// A constant float tensor as f64, and its dtype.
    pub fn f64(&self, name: &str) -> Result<(ArrayD<f64>, FloatType), ConstError> {
        let g = self.model.graph();
        let Some(t) = self.ix.constant(g, name) else {
            if let Some(n) = self.ix.producer_node(g, name) {
                if let Some(r) = self.through(n) {
                    return r;
                }
            }
            return Err(if self.ix.inputs.contains(name) {
                ConstError::GraphInput(name.to_string())
            } else {
                ConstError::Computed(name.to_string())
            });
        };
        let code = t.data_type.unwrap_or(0);
        let ft = FloatType::from_onnx(code).ok_or_else(|| ConstError::Dtype { name: name.to_string(), code })?;
        if let Some(a) = self.exact.get(name) {
            if self.ix.initializer.contains_key(name) {
                return Ok((a.clone(), ft));
            }
        }
        let raw = self.model.raw_bytes(t).map_err(|e| ConstError::Data(e.to_string()))?;
        Ok((to_f64(t, raw.as_deref()).map_err(ConstError::Data)?, ft))
    }

    /// Shape-only operators on a constant: Identity, Reshape, Unsqueeze, Squeeze.
    fn through(&self, n: &crate::proto::NodeProto) -> Option<Result<(ArrayD<f64>, FloatType), ConstError>> {
        let op = n.op_type();
        if !is_default_domain(n)
            || !matches!(op, "Identity" | "Reshape" | "Unsqueeze" | "Squeeze")
            || n.input.is_empty()
        {
            return None;
        }
        let (a, ft) = match self.f64(&n.input[0]) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let shape: Vec<usize> = match op {
            "Identity" => a.shape().to_vec(),
            "Reshape" => {
                let target = self.i64(n.input.get(1)?).ok()?;
                let mut out: Vec<i64> = target
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if d == 0 { a.shape().get(i).map_or(-2, |&x| x as i64) } else { d })
                    .collect();
                // a target no tensor could have (its product overflows) is no reshape of this one
                let known: i64 = out.iter().filter(|&&d| d > 0).try_fold(1i64, |acc, &d| acc.checked_mul(d))?;
                if let Some(p) = out.iter().position(|&d| d == -1) {
                    if known == 0 {
                        return None;
                    }
                    out[p] = a.len() as i64 / known;
                }
                if out.iter().any(|&d| d < 0) {
                    return None;
                }
                out.iter().map(|&d| d as usize).collect()
            }
            "Unsqueeze" | "Squeeze" => {
                let axes = match attr_ints(n, "axes") {
                    Some(a) => a,
                    None => match n.input.get(1).filter(|s| !s.is_empty()) {
                        Some(s) => self.i64(s).ok()?,
                        None if op == "Squeeze" => vec![],
                        None => return None,
                    },
                };
                let mut shape = a.shape().to_vec();
                if op == "Squeeze" {
                    let r = shape.len() as i64;
                    let axes: Vec<usize> =
                        axes.iter().map(|&x| if x < 0 { (x + r) as usize } else { x as usize }).collect();
                    shape = shape
                        .iter()
                        .enumerate()
                        .filter(|(i, &d)| !(d == 1 && (axes.is_empty() || axes.contains(i))))
                        .map(|(_, &d)| d)
                        .collect();
                } else {
                    let r = (shape.len() + axes.len()) as i64;
                    let mut axes: Vec<usize> =
                        axes.iter().map(|&x| if x < 0 { (x + r) as usize } else { x as usize }).collect();
                    axes.sort_unstable();
                    for ax in axes {
                        if ax > shape.len() {
                            return None;
                        }
                        shape.insert(ax, 1);
                    }
                }
                shape
            }
            _ => return None,
        };
        let v: Vec<f64> = a.iter().copied().collect();
        Some(
            ArrayD::from_shape_vec(ndarray::IxDyn(&shape), v)
                .map(|a| (a, ft))
                .map_err(|e| ConstError::Data(e.to_string())),
        )
    }

    /// A constant integer tensor (INT64/INT32), looking through Unsqueeze/Identity/Cast/Reshape.
    pub fn i64(&self, name: &str) -> Result<Vec<i64>, ConstError> {
        let g = self.model.graph();
        if let Some(t) = self.ix.constant(g, name) {
            let raw = self.model.raw_bytes(t).map_err(|e| ConstError::Data(e.to_string()))?;
            return to_i64(t, raw.as_deref()).map_err(ConstError::Data);
        }
        match self.ix.producer_node(g, name) {
            Some(n)
                if (is_op(n, "Unsqueeze") || is_op(n, "Identity") || is_op(n, "Cast") || is_op(n, "Reshape"))
                    && !n.input.is_empty() =>
            {
                self.i64(&n.input[0])
            }
            _ => Err(ConstError::NotConstant(name.to_string())),
        }
    }
}
