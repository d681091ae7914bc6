//! What the two fixture harnesses (`exports.rs`: fixtures with a `cases.json`; `third_party.rs`:
//! the timm fixtures) share: element types for counting float nodes, and the nothing-lost check.

use acnet_onnx::proto::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto};
use std::collections::HashMap;

/// What the fused model lost of the original: graph inputs or outputs, model metadata.
pub fn lost(original: &ModelProto, fused: &ModelProto) -> Vec<String> {
    let mut why = vec![];
    let (g, og) = (fused.graph.as_ref().unwrap(), original.graph.as_ref().unwrap());
    if g.input != og.input || g.output != og.output {
        why.push("graph inputs or outputs changed".into());
    }
    if fused.metadata_props != original.metadata_props
        || fused.opset_import != original.opset_import
        || fused.producer_name != original.producer_name
    {
        why.push("model metadata changed".into());
    }
    why
}

/// Element types of tensors, as far as the node counts need: integer tensors are shape arithmetic.
pub struct ElemTypes<'a> {
    g: &'a GraphProto,
    producer: HashMap<&'a str, &'a NodeProto>,
}

impl<'a> ElemTypes<'a> {
    pub fn new(g: &'a GraphProto) -> Self {
        let producer = g.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
        ElemTypes { g, producer }
    }

    pub fn is_int(&self, t: &str) -> bool {
        let ints = [DataType::Int64, DataType::Int32, DataType::Int8, DataType::Uint8, DataType::Bool];
        self.elem(t, 0).is_some_and(|e| ints.iter().any(|&d| d as i32 == e))
    }

    fn elem(&self, t: &str, depth: usize) -> Option<i32> {
        if depth > 200 {
            return None;
        }
        if let Some(init) = self.g.initializer.iter().find(|i| i.name() == t) {
            return Some(init.data_type());
        }
        for v in self.g.input.iter().chain(&self.g.value_info) {
            if v.name() == t {
                if let Some(acnet_onnx::proto::type_proto::Value::TensorType(tt)) = v.r#type.as_ref()?.value.as_ref() {
                    return tt.elem_type;
                }
            }
        }
        let n = self.producer.get(t)?;
        let attr = |name: &str| n.attribute.iter().find(|a| a.name() == name);
        match n.op_type() {
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Some(DataType::Int64 as i32),
            "Cast" => attr("to").and_then(|a| a.i).map(|v| v as i32),
            "Constant" => attr("value").and_then(|a| a.t.as_ref()).map(|t| t.data_type()),
            "ConstantOfShape" => {
                Some(attr("value").and_then(|a| a.t.as_ref()).map_or(DataType::Float as i32, |t| t.data_type()))
            }
            "Equal" | "Less" | "Greater" | "Not" | "And" | "Or" => Some(DataType::Bool as i32),
            "Where" => self.elem(n.input.get(1)?, depth + 1),
            _ => n.input.iter().filter(|i| !i.is_empty()).find_map(|i| self.elem(i, depth + 1)),
        }
    }
}
