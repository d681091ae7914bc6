//! The graph as the rules see it: an index of producers and consumers ([`GraphIndex`]), operator
//! attributes with their defaults, constants as numbers, and fresh names.

pub(crate) mod attrs;
pub(crate) mod consts;
pub(crate) mod fold;
mod index;
mod linalg;
pub(crate) use linalg::broadcast;
pub(crate) mod names;

pub(crate) use attrs::{
    attr, attr_float, attr_int, attr_ints, attr_string, check_arity, default_opset, is_default_domain, is_op,
};
pub(crate) use consts::{ConstError, Consts, Exact};
pub(crate) use index::{node_reads, GraphIndex};
pub(crate) use names::{graph_names, Names};

use crate::proto::{tensor_shape_proto::dimension::Value, type_proto, NodeProto, ValueInfoProto};

/// How every message names a node: by its name, or — a node without one — by its first output
/// tensor, which users can find in their model (tract names unnamed nodes the same way).
pub(crate) trait Label {
    fn label(&self) -> &str;
}

impl Label for NodeProto {
    fn label(&self) -> &str {
        match self.name() {
            "" => self.output.iter().find(|o| !o.is_empty()).map_or("", String::as_str),
            name => name,
        }
    }
}

/// The dims a value declares, each `Some(size)` or `None` (symbolic or unknown); `None` when it
/// declares no tensor shape at all.
pub(crate) fn declared_dims(v: &ValueInfoProto) -> Option<Vec<Option<i64>>> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    let dims = &t.shape.as_ref()?.dim;
    Some(
        dims.iter()
            .map(|d| match d.value {
                Some(Value::DimValue(x)) => Some(x),
                _ => None,
            })
            .collect(),
    )
}

/// The declared dims of a value info: `Ok(value)`, or `Err(name)` for a symbolic dim (its
/// `dim_param`, empty when it has none). `None` when it declares no shape.
pub(crate) fn declared_dim_names(v: &ValueInfoProto) -> Option<Vec<std::result::Result<usize, String>>> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    let dims = &t.shape.as_ref()?.dim;
    Some(
        dims.iter()
            .map(|d| match &d.value {
                Some(Value::DimValue(x)) if *x >= 0 => Ok(*x as usize),
                Some(Value::DimParam(p)) => Err(p.clone()),
                _ => Err(String::new()),
            })
            .collect(),
    )
}
