//! Constant tensors as numbers: float constants as f64 arrays, integer constants as i64, through
//! the constant subgraphs exporters put around them (`Reshape(weight, [1, C, 1, 1])`, `Unsqueeze`,
//! `Cast`, TorchScript's `Sigmoid → Reshape → Gather` of a parameter, ...; see [`super::fold`]).

use super::fold::{Folder, Value};
use super::GraphIndex;
use crate::model::tensor::{FloatType, Scaled, Summed};
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

/// The f64 values of a tensor the rewrite wrote: held, or a stored tensor scaled along axis 0,
/// or a sum of such (both computed when read; the graph holds an initializer without data until
/// the rewrite ends: they are *deferred*).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Exact {
    Values(ArrayD<f64>),
    Scaled(Scaled),
    Summed(Summed),
}

impl Exact {
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Exact::Values(a) => a.clone(),
            Exact::Scaled(s) => s.to_f64(),
            Exact::Summed(s) => s.to_f64(),
        }
    }

    /// Whether the values are computed when the rewrite ends (the graph's initializer has no
    /// data until then); else they are held, and the graph holds them rounded.
    pub fn deferred(&self) -> bool {
        match self {
            Exact::Values(_) => false,
            Exact::Scaled(_) => true,
            Exact::Summed(s) => !s.is_written(),
        }
    }

    /// The stored bytes a deferred tensor reads.
    pub fn stored(&self) -> Vec<&bytes::Bytes> {
        match self {
            Exact::Values(_) => vec![],
            Exact::Scaled(s) => vec![&s.raw],
            Exact::Summed(s) => s.stored().collect(),
        }
    }

    /// The tensor `name` of the values rounded once to `ft`, unless they are held in f64.
    pub fn encode(&self, name: &str, ft: FloatType) -> Option<crate::proto::TensorProto> {
        match self {
            Exact::Values(_) => None,
            Exact::Scaled(s) => Some(s.encode(name, ft)),
            Exact::Summed(s) => Some(s.encode(name, ft)),
        }
    }
}

impl From<ArrayD<f64>> for Exact {
    fn from(a: ArrayD<f64>) -> Exact {
        Exact::Values(a)
    }
}

/// Reads the constants of a model's graph. `exact` holds the f64 values of tensors the rewrite
/// wrote (the graph holds them rounded to their dtype, or not yet: see [`Exact::Scaled`]), so
/// that a kernel folded and then merged is rounded once.
pub(crate) struct Consts<'a> {
    pub model: &'a Model,
    pub ix: &'a GraphIndex,
    pub exact: &'a HashMap<String, Exact>,
}

impl Consts<'_> {
    /// A constant tensor (or one computed from constants only, see [`super::fold`]).
    pub fn value(&self, name: &str) -> Result<Value, ConstError> {
        Folder::new(self).value(name)
    }

    /// A constant float tensor as f64, and its dtype.
    pub fn f64(&self, name: &str) -> Result<(ArrayD<f64>, FloatType), ConstError> {
        match self.value(name)? {
            Value::Float(a, ft) => Ok((a, ft)),
            Value::Int(_) => {
                let code = self.ix.constant(self.model.graph(), name).and_then(|t| t.data_type).unwrap_or(7);
                Err(ConstError::Dtype { name: name.to_string(), code })
            }
        }
    }

    /// A constant integer tensor (INT64/INT32, or computed from such), flattened.
    pub fn i64(&self, name: &str) -> Result<Vec<i64>, ConstError> {
        match self.value(name) {
            Ok(Value::Int(a)) => Ok(a.iter().copied().collect()),
            Err(e @ (ConstError::Data(_) | ConstError::Dtype { .. })) => Err(e),
            _ => Err(ConstError::NotConstant(name.to_string())),
        }
    }
}
