//! Whole-model edits that make an export checkable or fusable: inference forms of training-mode
//! BatchNormalization and Dropout (`--eval-bn`), initializers listed as graph inputs made
//! constants (`--freeze-initializers`), and the exact float32 upcast of half-precision models
//! (what the equivalence check runs when tract cannot run them as they are).

use super::walk::for_each_tensor_mut;
use super::Model;
use crate::error::Result;
use crate::graph::{attr_int, is_op, Label};
use crate::model::tensor::{from_f64, to_f64, FloatType};
use crate::proto::{tensor_proto::DataType, type_proto, GraphProto, NodeProto, TypeProto};
use std::collections::HashSet;

/// Whether a node is a training-mode BatchNormalization (batch statistics) or Dropout (random).
fn training_node(g: &GraphProto, n: &NodeProto) -> bool {
    if is_op(n, "BatchNormalization") {
        return attr_int(n, "training_mode", 0) != 0
            || n.output.iter().skip(1).any(|o| !o.is_empty())
            || (crate::graph::attr(n, "is_test").is_some() && attr_int(n, "is_test", 0) == 0);
    }
    if is_op(n, "Dropout") {
        // opset 12+: the training_mode input; a constant false (or none) is inference
        return match n.input.get(2).filter(|s| !s.is_empty()) {
            None => attr_int(n, "is_test", 1) == 0,
            Some(t) => !const_false(g, t),
        };
    }
    false
}

/// Whether `name` is a boolean constant holding `false`.
fn const_false(g: &GraphProto, name: &str) -> bool {
    let t = g.initializer.iter().find(|t| t.name() == name).or_else(|| {
        g.node
            .iter()
            .find(|n| is_op(n, "Constant") && n.output.first().is_some_and(|o| o == name))
            .and_then(|n| n.attribute.iter().find(|a| a.name() == "value").and_then(|a| a.t.as_ref()))
    });
    t.is_some_and(|t| {
        t.data_type == Some(DataType::Bool as i32)
            && t.raw_data.as_ref().map_or(t.int32_data.iter().all(|&v| v == 0), |r| r.iter().all(|&b| b == 0))
    })
}

/// The one line naming the first training-mode node, if the model has one.
pub fn training_mode(model: &Model) -> Option<String> {
    let g = model.graph();
    let n = g.node.iter().find(|n| training_node(g, n))?;
    Some(if is_op(n, "Dropout") {
        format!(
            "Dropout '{}' is in training mode: the model was exported without model.eval(); pass --eval-bn to use its inference form (the identity)",
            n.label()
        )
    } else {
        format!(
            "BatchNormalization '{}' is in training mode: the model was exported without model.eval(); pass --eval-bn to use its running statistics",
            n.label()
        )
    })
}

/// Turn training-mode BatchNormalization and Dropout into their inference forms: a
/// BatchNormalization uses its stored running statistics (its batch-statistics outputs, which
/// nothing may read, are dropped); a Dropout becomes an Identity (its mask output, which nothing
/// may read, is dropped). Returns how many nodes changed, or why it cannot be done.
pub fn eval_mode(model: &mut Model) -> std::result::Result<usize, String> {
    let g = model.graph();
    let read: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .chain(g.output.iter().map(|o| o.name()))
        .collect();
    let mut todo = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if !training_node(g, n) {
            continue;
        }
        if let Some(o) = n.output.iter().skip(1).find(|o| !o.is_empty() && read.contains(o.as_str())) {
            return Err(format!(
                "{} '{}' in training mode: its output '{o}' is read, so it cannot be turned into its inference form",
                n.op_type(),
                n.label()
            ));
        }
        todo.push(i);
    }
    let g = model.graph_mut();
    for &i in &todo {
        let n = &mut g.node[i];
        n.output.truncate(1);
        if n.op_type() == "Dropout" {
            n.op_type = Some("Identity".into());
            n.input.truncate(1);
            n.attribute.clear();
        } else {
            n.attribute.retain(|a| a.name() != "training_mode" && a.name() != "is_test");
        }
    }
    Ok(todo.len())
}

/// Initializers that are also listed as graph inputs (`keep_initializers_as_inputs=True`).
pub fn initializer_inputs(model: &Model) -> usize {
    let g = model.graph();
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    g.input.iter().filter(|v| inits.contains(v.name())).count()
}

/// Treat initializers that are also graph inputs as constants: remove them from the graph
/// inputs. Returns how many were removed.
pub fn freeze_initializers(model: &mut Model) -> usize {
    let g = model.graph_mut();
    let inits: HashSet<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    let before = g.input.len();
    g.input.retain(|v| !inits.contains(v.name()));
    before - g.input.len()
}

fn is_half(dt: i32) -> bool {
    dt == DataType::Float16 as i32 || dt == DataType::Bfloat16 as i32
}

/// Whether the model stores or computes anything in float16 or bfloat16.
pub fn has_half(model: &Model) -> bool {
    let g = model.graph();
    let typed = |t: &Option<TypeProto>| matches!(t.as_ref().and_then(|t| t.value.as_ref()), Some(type_proto::Value::TensorType(t)) if is_half(t.elem_type()));
    g.initializer.iter().any(|t| is_half(t.data_type()))
        || g.input.iter().chain(&g.output).chain(&g.value_info).any(|v| typed(&v.r#type))
        || g.node.iter().any(|n| is_op(n, "Cast") && is_half(attr_int(n, "to", 0) as i32))
        || g.node.iter().any(|n| n.attribute.iter().any(|a| a.t.as_ref().is_some_and(|t| is_half(t.data_type()))))
}

/// The model with every float16 and bfloat16 tensor, type and Cast made float32: exactly the
/// same weights, computed without half-precision rounding of the activations.
pub fn upcast_half(model: &Model) -> Result<Model> {
    let mut m = model.clone();
    let mut err = None;
    for_each_tensor_mut(&mut m.proto, &mut |t| {
        if is_half(t.data_type()) {
            model.inline_tensor(t)?;
            let raw = t.raw_data.clone();
            match to_f64(t, raw.as_deref()) {
                Ok(a) => *t = from_f64(t.name(), &a, FloatType::F32),
                Err(e) => err = Some(e),
            }
        }
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(crate::Error::Invalid(e));
    }
    let g = m.graph_mut();
    let retype = |t: &mut Option<TypeProto>| {
        if let Some(type_proto::Value::TensorType(tt)) = t.as_mut().and_then(|t| t.value.as_mut()) {
            if is_half(tt.elem_type()) {
                tt.elem_type = Some(DataType::Float as i32);
            }
        }
    };
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        retype(&mut v.r#type);
    }
    for n in &mut g.node {
        if is_op(n, "Cast") {
            for a in n.attribute.iter_mut().filter(|a| a.name() == "to") {
                if a.i.is_some_and(|to| is_half(to as i32)) {
                    a.i = Some(DataType::Float as i64);
                }
            }
        }
    }
    Ok(m)
}
