//! Which constants are weights: the tensors the noise criterion moves by one rounding to measure
//! how much rounding of the weights moves the outputs.

use crate::graph::{is_default_domain, GraphIndex};
use crate::model::tensor::FloatType;
use crate::model::Model;
use std::collections::HashMap;

/// The inputs of an operator that carry weights (learned parameters and the constants that
/// scale or shift activations). Shape, index, size and exponent inputs are not: moving them
/// would change what is computed, not how it rounds.
fn weight_inputs(op: &str) -> &'static [usize] {
    match op {
        "Conv" | "ConvTranspose" => &[1, 2],
        "Gemm" => &[0, 1, 2],
        "MatMul" | "Add" | "Sub" | "Mul" | "Div" | "Sum" | "Max" | "Min" => &[0, 1, 2, 3, 4, 5, 6, 7],
        "BatchNormalization" => &[1, 2, 3, 4],
        "PRelu" => &[1],
        "LayerNormalization" | "InstanceNormalization" | "GroupNormalization" => &[1, 2],
        _ => &[],
    }
}

/// Operators that pass a constant through without changing its values.
fn passes_values(op: &str) -> bool {
    matches!(op, "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" | "Transpose" | "Cast" | "Expand")
}

/// The float constants of `model` that are weights, by the name tract gives them (the
/// initializer's name; a Constant node's name, or its output's when it has none), with the type
/// they are stored in.
pub(crate) fn weights(model: &Model) -> HashMap<String, FloatType> {
    let g = model.graph();
    let ix = GraphIndex::new(g);
    let mut out = HashMap::new();
    // walk back from every weight input through value-preserving operators to a constant
    let mut stack: Vec<&str> = Vec::new();
    for n in g.node.iter().filter(|n| is_default_domain(n)) {
        for &k in weight_inputs(n.op_type()) {
            if let Some(i) = n.input.get(k).filter(|i| !i.is_empty()) {
                stack.push(i);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) {
            continue;
        }
        if let Some(&k) = ix.initializer.get(t) {
            if let Some(ft) = FloatType::from_onnx(g.initializer[k].data_type()) {
                out.insert(t.to_string(), ft);
            }
            continue;
        }
        let Some(p) = ix.producer_node(g, t) else { continue };
        if p.op_type() == "Constant" && is_default_domain(p) {
            let ft = p.attribute.iter().find(|a| a.name() == "value").and_then(|a| a.t.as_ref());
            if let Some(ft) = ft.and_then(|t| FloatType::from_onnx(t.data_type())) {
                let name = if p.name().is_empty() { t } else { p.name() };
                out.insert(name.to_string(), ft);
            }
        } else if passes_values(p.op_type()) && is_default_domain(p) {
            if let Some(i) = p.input.first() {
                stack.push(i);
            }
        }
    }
    out
}
