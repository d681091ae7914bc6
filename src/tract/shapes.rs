//! The shapes a model's tensors really have: tract's analysis of the whole model at the shapes
//! it runs at. Its input dims are the declared ones, or given (`--input-shape`); a symbolic dim
//! takes the value the graph itself fixes — a Reshape to a constant shape whose element count
//! holds the symbol once (an export traced at batch 2 bakes `[2, 16, 2, 36]` into its Reshapes)
//! — and only when nothing fixes it, 1. Half-precision models are analysed as their exact
//! float32 upcasts (tract types few operators in float16 and none in bfloat16, and the shapes are
//! the same).

use super::region::crashes_analysis;
use crate::error::catch;
use crate::model::Model;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModelExt};

/// Where the value of a symbolic input dim comes from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fixed {
    /// The graph fixes it: a Reshape to a constant shape (node name, the shape it reshapes to).
    ByReshape { node: String, to: Vec<i64> },
    /// Nothing fixes it: 1.
    Default,
}

/// A symbolic input dim's value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SymbolValue {
    pub value: usize,
    pub fixed: Fixed,
}

/// What the analysis found.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShapeFacts {
    /// Concrete shapes by tensor name (those tract could work out).
    pub shapes: HashMap<String, Vec<usize>>,
    /// The values of the symbolic dims of the graph inputs, by their names in the model (a dim
    /// without a name is `input:axis`).
    pub symbols: BTreeMap<String, SymbolValue>,
    /// Why the analysis stopped short of the whole graph, if it did.
    pub incomplete: Option<String>,
    /// Which dims are the same whatever the symbolic input dims nothing fixes (those set to 1).
    pub free: Free,
}

/// The symbolic input dims nothing fixes, and the dims they leave fixed.
#[derive(Clone, Debug, Default)]
pub(crate) enum Free {
    /// Not known (the analysis did not get that far).
    #[default]
    Unknown,
    /// There are none: each shape is the only one the tensor has.
    Nothing,
    /// Each tensor's dims in the analysis with the free ones as symbols, `None` for a dim that is
    /// not a known number (it depends on them, or the analysis did not find it); a tensor not
    /// listed is not known.
    Dims(HashMap<String, Vec<Option<usize>>>),
}

/// The values a symbol is tried at when its equation is not linear.
const SCAN: i64 = 256;

/// A declared input dim.
#[derive(Clone, Debug, PartialEq)]
enum Dim {
    Value(usize),
    /// a symbolic dim, by its name in the model (or `input:axis` when it has none)
    Symbol(String),
}

/// The model's tensors' shapes at its declared input shapes, with `given` shapes of inputs by
/// name overriding them. Empty (with `incomplete` saying why) when tract cannot analyse it.
pub(crate) fn analyse(model: &Model, given: &[(String, Vec<usize>)]) -> ShapeFacts {
    let upcast;
    let m = if crate::model::transform::has_half(model) {
        match crate::model::transform::upcast_half(model) {
            Ok(u) => {
                upcast = u;
                &upcast
            }
            Err(e) => return ShapeFacts { incomplete: Some(e.to_string()), ..Default::default() },
        }
    } else {
        model
    };
    if let Some(why) = crashes_analysis(m) {
        return ShapeFacts { incomplete: Some(why), ..Default::default() };
    }
    let bytes = match m.to_inline() {
        Ok(mut p) => {
            shape_preserving(&mut p);
            p.encode_to_vec()
        }
        Err(e) => return ShapeFacts { incomplete: Some(e.to_string()), ..Default::default() },
    };
    let inputs = declared_inputs(m, given);
    match catch(|| facts(&bytes, &inputs)) {
        Ok(f) => f,
        Err(p) => ShapeFacts {
            incomplete: Some(format!("tract panicked: {}", p.text.unwrap_or_default())),
            ..Default::default()
        },
    }
}

/// The model as its shapes are analysed: every BatchNormalization (inference form: one output)
/// an Identity of its input, which has the same shape. tract's BatchNormalization rules index the
/// input's channel axis unchecked, a wild read when the input turns out to have fewer than 2 axes
/// — known only once the analysis is under way (found by the structural fuzz test).
fn shape_preserving(p: &mut crate::proto::ModelProto) {
    let Some(g) = p.graph.as_mut() else { return };
    for n in &mut g.node {
        let one_output = n.output.iter().skip(1).all(|o| o.is_empty());
        if n.op_type() == "BatchNormalization"
            && crate::graph::is_default_domain(n)
            && one_output
            && !n.input.is_empty()
        {
            n.op_type = Some("Identity".into());
            n.input.truncate(1);
            n.output.truncate(1);
            n.attribute.clear();
        }
    }
}

/// The graph inputs (initializers aside) with their dims: given, else declared (a dim without a
/// value is a symbol). `None` for an input with no declared shape.
fn declared_inputs(m: &Model, given: &[(String, Vec<usize>)]) -> Vec<(String, Option<Vec<Dim>>)> {
    use crate::proto::{tensor_shape_proto::dimension::Value, type_proto};
    let g = m.graph();
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    g.input
        .iter()
        .filter(|v| !inits.contains(v.name()))
        .map(|v| {
            if let Some((_, s)) = given.iter().find(|(n, _)| n == v.name()) {
                return (v.name().to_string(), Some(s.iter().map(|&d| Dim::Value(d)).collect()));
            }
            let dims = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(type_proto::Value::TensorType(t)) => t.shape.as_ref().map(|s| {
                    s.dim
                        .iter()
                        .enumerate()
                        .map(|(k, d)| match &d.value {
                            Some(Value::DimValue(x)) if *x >= 0 => Dim::Value(*x as usize),
                            Some(Value::DimParam(p)) if !p.is_empty() => Dim::Symbol(p.clone()),
                            _ => Dim::Symbol(format!("{}:{k}", v.name())),
                        })
                        .collect()
                }),
                _ => None,
            };
            (v.name().to_string(), dims)
        })
        .collect()
}

fn msg(e: TractError) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Analyse the model (`bytes`, inline) with the symbols as tract symbols; solve what the graph
/// fixes; analyse again at the values found (1 for the others).
fn facts(bytes: &[u8], inputs: &[(String, Option<Vec<Dim>>)]) -> ShapeFacts {
    let mut symbols: BTreeMap<String, SymbolValue> = BTreeMap::new();
    let names: Vec<String> = {
        let mut v: Vec<String> = inputs
            .iter()
            .flat_map(|(_, d)| d.iter().flatten())
            .filter_map(|d| match d {
                Dim::Symbol(s) => Some(s.clone()),
                Dim::Value(_) => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    // each round fixes at least one more symbol, or ends (with the dims the free ones leave
    // fixed)
    let mut free = if names.is_empty() { Free::Nothing } else { Free::Unknown };
    for _ in 0..=names.len() {
        let open: Vec<&String> = names.iter().filter(|n| !symbols.contains_key(*n)).collect();
        if open.is_empty() {
            free = Free::Nothing;
            break;
        }
        let Ok(model) = load(bytes, inputs, &symbols) else { break };
        let (mut model, tsyms) = model;
        let _ = model.analyse(true);
        let found = solve(&model, &tsyms);
        if found.is_empty() {
            free = Free::Dims(fixed_dims(&model));
            break;
        }
        for (name, v) in found {
            symbols.entry(name).or_insert(v);
        }
    }
    if inputs.iter().any(|(_, d)| d.is_none()) {
        // (an input of no declared shape: nothing is known of what it makes)
        free = Free::Unknown;
    }
    for n in &names {
        symbols.entry(n.clone()).or_insert(SymbolValue { value: 1, fixed: Fixed::Default });
    }
    let (mut model, _) = match load(bytes, inputs, &symbols) {
        Ok(m) => m,
        Err(e) => return ShapeFacts { symbols, incomplete: Some(e), free, ..Default::default() },
    };
    let incomplete = model.analyse(true).err().map(msg);
    let mut shapes = HashMap::new();
    for node in model.nodes() {
        for slot in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, slot);
            if let (Some(label), Ok(fact)) = (model.outlet_label(outlet), model.outlet_fact(outlet)) {
                if let Ok(Some(d)) = fact.shape.as_concrete_finite() {
                    shapes.insert(label.to_string(), d.to_vec());
                }
            }
        }
    }
    ShapeFacts { shapes, symbols, incomplete, free }
}

/// Each tensor's dims in an analysis with symbolic input dims: `None` for one that is not a
/// known number (it depends on a symbol, or the analysis did not find it).
fn fixed_dims(model: &InferenceModel) -> HashMap<String, Vec<Option<usize>>> {
    let mut m = HashMap::new();
    for node in model.nodes() {
        for slot in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, slot);
            // (a graph input's outlet has no label: its node has the input's name)
            let label = model
                .outlet_label(outlet)
                .or_else(|| model.input_outlets().ok()?.contains(&outlet).then_some(&*node.name));
            if let (Some(label), Ok(fact)) = (label, model.outlet_fact(outlet)) {
                if !fact.shape.is_open() {
                    let dims = fact
                        .shape
                        .dims()
                        .map(|d| d.concretize().and_then(|d| d.to_i64().ok()).and_then(|v| usize::try_from(v).ok()))
                        .collect();
                    m.insert(label.to_string(), dims);
                }
            }
        }
    }
    m
}

/// The model with its input facts: given and declared values, the values found so far, and a
/// tract symbol for every other symbolic dim (returned by name).
fn load(
    bytes: &[u8],
    inputs: &[(String, Option<Vec<Dim>>)],
    known: &BTreeMap<String, SymbolValue>,
) -> Result<(InferenceModel, HashMap<String, Symbol>), String> {
    let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).map_err(msg)?;
    let n = model.input_outlets().map_err(msg)?.len();
    let mut tsyms: HashMap<String, Symbol> = HashMap::new();
    for (k, (_, dims)) in inputs.iter().enumerate().take(n) {
        let Some(dims) = dims else { continue };
        let shape: TVec<TDim> = dims
            .iter()
            .map(|d| match d {
                Dim::Value(v) => TDim::from(*v as i64),
                Dim::Symbol(s) => match known.get(s) {
                    Some(v) => TDim::from(v.value as i64),
                    None => {
                        let next = tsyms.len();
                        let sym =
                            tsyms.entry(s.clone()).or_insert_with(|| model.symbols.sym(&format!("acnet_s{next}")));
                        TDim::Sym(sym.clone())
                    }
                },
            })
            .collect();
        let outlet = model.input_outlets().map_err(msg)?[k];
        let mut fact = model.outlet_fact(outlet).map_err(msg)?.clone();
        fact.shape = shape.into_iter().collect();
        model = model.with_input_fact(k, fact).map_err(msg)?;
    }
    Ok((model, tsyms))
}

/// The symbols the analysed model's Reshapes fix: a Reshape whose input and target shape are
/// both known (the target may be computed, and hold symbols too: TorchScript computes it from
/// `Shape` of the input while constants baked at the traced batch shape the data) and whose
/// element counts are equal only for one value of one open symbol, linearly (`a·s + b = 0`).
fn solve(model: &InferenceModel, tsyms: &HashMap<String, Symbol>) -> Vec<(String, SymbolValue)> {
    let by_sym: HashMap<&Symbol, &String> = tsyms.iter().map(|(n, s)| (s, n)).collect();
    let mut found: Vec<(String, SymbolValue)> = vec![];
    for node in model.nodes() {
        if node.op.name() != "Reshape" || node.inputs.len() != 2 {
            continue;
        }
        let (Ok(x), Ok(s)) = (model.outlet_fact(node.inputs[0]), model.outlet_fact(node.inputs[1])) else { continue };
        let Some(target) = s.value.concretize() else { continue };
        let Ok(target) = target.cast_to::<TDim>() else { continue };
        let Ok(target) = target.try_as_plain_ram().and_then(|t| t.as_slice::<TDim>().map(|s| s.to_vec())) else {
            continue;
        };
        let Some(dims) = x.shape.concretize() else { continue };
        // (a 0 copies the input's dim; a -1 leaves the count free)
        if target.iter().any(|d| d.to_i64().is_ok_and(|v| v < 0)) {
            continue;
        }
        let mut out = TDim::from(1);
        for (i, d) in target.iter().enumerate() {
            if d.to_i64().is_ok_and(|v| v == 0) {
                match dims.get(i) {
                    Some(di) => out *= di.clone(),
                    None => continue,
                }
            } else {
                out *= d.clone();
            }
        }
        let input: TDim = dims.iter().cloned().product::<TDim>();
        let syms: std::collections::HashSet<Symbol> = input.symbols().union(&out.symbols()).cloned().collect();
        let open: Vec<&Symbol> = syms.iter().filter(|s| by_sym.contains_key(s)).collect();
        if open.len() != 1 || syms.len() != 1 {
            continue;
        }
        let s = open[0];
        // g(v) = count in - count out at s = v: zero at one whole v >= 1 — where it is linear
        // (`a·s + b`), or else the one root in 1..=SCAN (a dim of the input may be a broadcast
        // of the symbol with the traced batch: Expand of an index tensor baked at batch 2)
        let g = |v: i64| -> Option<i64> {
            let vals = SymbolValues::default().with(s, v);
            Some(input.eval(&vals).to_i64().ok()? - out.eval(&vals).to_i64().ok()?)
        };
        let linear = match (g(1), g(2), g(3)) {
            (Some(g1), Some(g2), Some(g3)) if g2 != g1 && g3 - g2 == g2 - g1 => {
                let (a, b) = (g2 - g1, g1 - (g2 - g1));
                (b % a == 0 && -b / a >= 1).then_some(-b / a)
            }
            _ => None,
        };
        let root = linear.or_else(|| {
            let roots: Vec<i64> = (1..=SCAN).filter(|&v| g(v) == Some(0)).collect();
            (roots.len() == 1).then(|| roots[0])
        });
        let Some(root) = root else { continue };
        let name = by_sym[s].clone();
        if found.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let to = target.iter().map(|d| d.eval(&SymbolValues::default().with(s, root)).to_i64().unwrap_or(-1)).collect();
        found.push((
            name,
            SymbolValue { value: root as usize, fixed: Fixed::ByReshape { node: node.name.clone(), to } },
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{tensor_proto::DataType, tensor_shape_proto, type_proto, ValueInfoProto};
    use crate::support::{Builder, ConvAttrs};

    /// `x` declared `[batch, 2, 4, 4]` (symbolic batch); a Conv, then a Reshape of its output to
    /// `to` (a constant).
    fn reshaped(to: &[i64]) -> Builder {
        let mut b = Builder::new(2, 4, 4);
        let dim = |d: tensor_shape_proto::dimension::Value| tensor_shape_proto::Dimension {
            value: Some(d),
            ..Default::default()
        };
        use tensor_shape_proto::dimension::Value as V;
        let dims =
            vec![dim(V::DimParam("batch".into())), dim(V::DimValue(2)), dim(V::DimValue(4)), dim(V::DimValue(4))];
        b.graph.input[0] = ValueInfoProto {
            name: Some("x".into()),
            r#type: Some(crate::proto::TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(DataType::Float as i32),
                    shape: Some(crate::proto::TensorShapeProto { dim: dims }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (c, _, _) = b.conv_rand("conv", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let s = b.initializer_i64("target", to);
        let r = b.node("Reshape", "reshape", &[&c, &s], &["r"], vec![]);
        b.output(&r);
        b
    }

    #[test]
    fn a_symbolic_batch_takes_the_value_a_constant_reshape_fixes() {
        // 3 channels x 16 positions x batch = 2 x 48: the batch is 2
        let f = analyse(&reshaped(&[2, 48]).build(), &[]);
        let v = &f.symbols["batch"];
        assert_eq!(v.value, 2);
        assert!(matches!(&v.fixed, Fixed::ByReshape { node, to } if node == "reshape" && to == &[2, 48]), "{v:?}");
        assert_eq!(f.shapes["conv.y"], [2, 3, 4, 4]);
        assert_eq!(f.shapes["r"], [2, 48]);
        assert!(f.incomplete.is_none(), "{:?}", f.incomplete);
    }

    #[test]
    fn a_symbolic_batch_nothing_fixes_is_one() {
        // a -1 leaves the count free
        let f = analyse(&reshaped(&[-1, 48]).build(), &[]);
        assert_eq!(f.symbols["batch"], SymbolValue { value: 1, fixed: Fixed::Default });
        assert_eq!(f.shapes["conv.y"], [1, 3, 4, 4]);
    }

    #[test]
    fn given_input_shapes_override_the_declared_ones() {
        let f = analyse(&reshaped(&[-1, 48]).build(), &[("x".into(), vec![3, 2, 4, 4])]);
        assert!(f.symbols.is_empty());
        assert_eq!(f.shapes["r"], [3, 48]);
    }

    #[test]
    fn a_batch_norm_of_a_tensor_that_turns_out_a_vector_is_analysed_without_tract_reading_wild() {
        // Reshape to [-1]: the BN's input is a vector, which only the analysis finds out (tract's
        // BatchNormalization rules would index its channel axis unchecked: SIGSEGV)
        let mut b = Builder::new(2, 4, 4);
        let flat = b.initializer_i64("flat", &[-1]);
        let v = b.node("Reshape", "flatten", &["x", &flat], &["v"], vec![]);
        let (y, _) = b.bn("bn", &v, 2, None);
        b.output(&y);
        let f = analyse(&b.build(), &[]);
        assert_eq!(f.shapes[&y], [32]);
    }

    #[test]
    fn a_half_precision_model_is_analysed_as_its_float32_upcast() {
        let mut b = reshaped(&[2, 48]);
        for t in &mut b.graph.initializer {
            if t.data_type == Some(DataType::Float as i32) {
                let a = crate::model::tensor::to_f64(t, t.raw_data.as_deref()).unwrap();
                *t = crate::model::tensor::from_f64(t.name(), &a, crate::model::tensor::FloatType::F16);
            }
        }
        for v in b.graph.input.iter_mut().chain(b.graph.output.iter_mut()) {
            if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                t.elem_type = Some(DataType::Float16 as i32);
            }
        }
        let f = analyse(&b.build(), &[]);
        assert_eq!(f.shapes["conv.y"], [2, 3, 4, 4], "{:?}", f.incomplete);
    }
}
