//! The region cut out as a model of its own, in float64, for tract to evaluate.

use super::region::Region;
use super::{Cx, RegionReason};
use crate::graph::{attr_float, attr_int, is_op};
use crate::model::tensor::{from_f64, to_f64, FloatType};
use crate::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashSet;

/// The region as a model of its own computing in float64: input x (concrete shape), output y.
/// Float initializers, Constant nodes and casts to float types become float64.
pub(super) fn submodel(cx: &Cx, r: &Region, y: &str, shape: &[usize]) -> Result<ModelProto, RegionReason> {
    let mut nodes: Vec<usize> = r.dep.iter().chain(&r.stat).copied().collect();
    nodes.sort_unstable();
    let nodes = nodes.iter().map(|&p| cx.node(p).clone()).collect();
    nodes_model(cx, nodes, &[], &r.x, y, shape)
}

/// `nodes` (in an order that computes them: the graph's, say) as a model of their own computing
/// in float64, with input `x` (concrete `shape`) and output `y`: the graph's initializers they
/// read and `extra` (written as float64), Constant nodes and casts to float types in float64.
pub(crate) fn nodes_model(
    cx: &Cx,
    nodes: Vec<NodeProto>,
    extra: &[(String, ArrayD<f64>)],
    x: &str,
    y: &str,
    shape: &[usize],
) -> Result<ModelProto, RegionReason> {
    let g = cx.g;
    // tract runs a Gemm in float32 only (its alpha and beta are float32): one of constant
    // operands is written as a MatMul and an Add of float64 constants
    let mut extra = extra.to_vec();
    let mut lowered = Vec::with_capacity(nodes.len());
    for n in nodes {
        match gemm_as_matmul(cx, &n, &mut extra) {
            Some(ns) => lowered.extend(ns),
            None => lowered.push(n),
        }
    }
    let nodes = lowered;
    let needed: HashSet<&str> = nodes.iter().flat_map(|n| n.input.iter().map(|s| s.as_str())).collect();
    let mut inits: Vec<_> = extra.iter().map(|(name, a)| from_f64(name, a, FloatType::F64)).collect();
    for t in &g.initializer {
        if needed.contains(t.name()) && extra.iter().all(|(name, _)| name != t.name()) {
            let mut t = cx.settled(t).unwrap_or_else(|| t.clone());
            cx.model.inline_tensor(&mut t).map_err(|e| RegionReason::Tract(e.to_string()))?;
            inits.push(to_double(t)?);
        }
    }
    let mut region_nodes = Vec::with_capacity(nodes.len());
    let written: HashSet<String> = nodes.iter().flat_map(|n| n.output.iter().cloned()).collect();
    for mut n in nodes {
        // the Shape (or Size) of a tensor from outside the region (dynamo's dynamic exports take
        // the batch from the graph input once, for every block): a constant at the shapes the
        // model runs at
        if (is_op(&n, "Shape") || is_op(&n, "Size"))
            && n.input.first().is_some_and(|i| i != x && !written.contains(i))
            && cx.ix.constant(g, &n.input[0]).is_none()
        {
            region_nodes.push(shape_constant(cx, &n)?);
            continue;
        }
        let cast = is_op(&n, "Cast");
        for a in &mut n.attribute {
            if let Some(t) = a.t.take() {
                a.t = Some(to_double(t)?);
            }
            let floats = [DataType::Float, DataType::Float16, DataType::Bfloat16].map(|d| d as i64);
            if a.name() == "to" && a.i.is_some_and(|v| floats.contains(&v)) && cast {
                a.i = Some(DataType::Double as i64);
            }
        }
        if is_op(&n, "Constant") {
            // value_float(s) make float32 tensors: write them as float64 tensors
            if let Some(k) = n.attribute.iter().position(|a| a.name() == "value_float" || a.name() == "value_floats") {
                let a = n.attribute.remove(k);
                let v: Vec<f64> = a.f.map(|f| vec![f as f64]).unwrap_or_else(|| a.floats.iter().map(|&f| f as f64).collect());
                let dims: Vec<usize> = if a.name() == "value_float" { vec![] } else { vec![v.len()] };
                let arr = ArrayD::from_shape_vec(IxDyn(&dims), v).map_err(|e| RegionReason::Tract(e.to_string()))?;
                n.attribute.push(AttributeProto {
                    name: Some("value".into()),
                    t: Some(from_f64("", &arr, FloatType::F64)),
                    r#type: Some(AttributeType::Tensor as i32),
                    ..Default::default()
                });
            }
        }
        region_nodes.push(n);
    }
    let tensor_type = |dims: Option<&[usize]>| TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(DataType::Double as i32),
            shape: dims.map(|d| TensorShapeProto {
                dim: d
                    .iter()
                    .map(|&v| tensor_shape_proto::Dimension {
                        value: Some(tensor_shape_proto::dimension::Value::DimValue(v as i64)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: cx.model.proto.ir_version,
        opset_import: cx.model.proto.opset_import.clone(),
        graph: Some(GraphProto {
            name: Some("region".into()),
            node: region_nodes,
            initializer: inits,
            input: vec![ValueInfoProto { name: Some(x.to_string()), r#type: Some(tensor_type(Some(shape))), ..Default::default() }],
            output: vec![ValueInfoProto { name: Some(y.to_string()), r#type: Some(tensor_type(None)), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Gemm node `n` of constant B (and C: constants of the graph or of `extra`) as a MatMul (after a
/// Transpose of A, if it is transposed) and an Add: alpha and beta in B and C, written to `extra`.
fn gemm_as_matmul(cx: &Cx, n: &NodeProto, extra: &mut Vec<(String, ArrayD<f64>)>) -> Option<Vec<NodeProto>> {
    if !is_op(n, "Gemm") || n.input.len() < 2 || n.output.len() != 1 {
        return None;
    }
    // (a constant of the graph, or one of `extra`)
    let value = |t: &str| match extra.iter().find(|(name, _)| name == t) {
        Some((_, a)) => Some(a.clone()),
        None => cx.consts.f64(t).ok().map(|(a, _)| a),
    };
    let b = value(&n.input[1])?;
    if b.ndim() != 2 {
        return None;
    }
    let (alpha, beta) = (attr_float(n, "alpha", 1.0) as f64, attr_float(n, "beta", 1.0) as f64);
    let b = if attr_int(n, "transB", 0) != 0 { b.t().to_owned() } else { b } * alpha;
    let c = match n.input.get(2).filter(|c| !c.is_empty()) {
        Some(c) => Some(value(c)? * beta),
        None => None,
    };
    let out = &n.output[0];
    let name = |s: &str| format!("{out}.gemm_{s}");
    let node = |op: &str, input: Vec<String>, output: String, attribute: Vec<AttributeProto>| NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{}.{op}", n.name())),
        input,
        output: vec![output],
        attribute,
        ..Default::default()
    };
    let mut nodes = Vec::new();
    let mut a = n.input[0].clone();
    if attr_int(n, "transA", 0) != 0 {
        let perm = AttributeProto {
            name: Some("perm".into()),
            ints: vec![1, 0],
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        };
        nodes.push(node("Transpose", vec![a], name("a"), vec![perm]));
        a = name("a");
    }
    extra.push((name("b"), b));
    let mm = if c.is_some() { name("mm") } else { out.clone() };
    nodes.push(node("MatMul", vec![a, name("b")], mm.clone(), vec![]));
    if let Some(c) = c {
        extra.push((name("c"), c));
        nodes.push(node("Add", vec![mm, name("c")], out.clone(), vec![]));
    }
    Some(nodes)
}

/// A float tensor as float64 (others as they are).
fn to_double(t: crate::proto::TensorProto) -> Result<crate::proto::TensorProto, RegionReason> {
    if FloatType::from_onnx(t.data_type.unwrap_or(0)).is_none_or(|ft| ft == FloatType::F64) {
        return Ok(t);
    }
    let a = to_f64(&t, t.raw_data.as_deref()).map_err(RegionReason::Tract)?;
    Ok(from_f64(t.name(), &a, FloatType::F64))
}

/// A Shape or Size node of a tensor whose shape the model's facts know, as a Constant node.
fn shape_constant(cx: &Cx, n: &crate::proto::NodeProto) -> Result<crate::proto::NodeProto, RegionReason> {
    let t = &n.input[0];
    let shape = cx.shape_of(t).ok_or_else(|| RegionReason::SizeUnknown { tensor: t.clone(), why: cx.facts().incomplete.clone() })?;
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let value = if is_op(n, "Size") {
        crate::model::tensor::from_i64("", &[], &[dims.iter().product()])
    } else {
        let r = dims.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (a, b) = (clamp(crate::graph::attr_int(n, "start", 0)), clamp(crate::graph::attr_int(n, "end", r)));
        let v: Vec<i64> = if a < b { dims[a..b].to_vec() } else { vec![] };
        crate::model::tensor::from_i64("", &[v.len() as i64], &v)
    };
    Ok(crate::proto::NodeProto {
        op_type: Some("Constant".into()),
        name: n.name.clone(),
        output: n.output.clone(),
        attribute: vec![AttributeProto {
            name: Some("value".into()),
            t: Some(value),
            r#type: Some(AttributeType::Tensor as i32),
            ..Default::default()
        }],
        ..Default::default()
    })
}
