//! A tiny builder of ONNX graphs in memory for the rule tests (and the benchmark's generated
//! models), and helpers to read a rewritten model back (independently of the library's readers).
#![allow(dead_code)]

use acnet_onnx::kernel::AffineConv;
use acnet_onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use acnet_onnx::tensor::{from_f64, from_i64, to_f64, FloatType};
use acnet_onnx::Model;
use ndarray::{Array1, ArrayD, Ix1, IxDyn};
use rand::{rngs::StdRng, Rng, SeedableRng};

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(AttributeType::Float as i32),
        ..Default::default()
    }
}

pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(AttributeType::String as i32),
        ..Default::default()
    }
}

/// A tensor value info; `dims` empty means no shape.
pub fn tensor_info(name: &str, elem_type: DataType, dims: &[i64]) -> ValueInfoProto {
    let shape = (!dims.is_empty()).then(|| TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| tensor_shape_proto::Dimension {
                value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem_type as i32), shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Declare graph input `name` of `b`'s graph with `dims`, `None` for a symbolic dim (named
/// `{name}_{axis}`).
pub fn symbolic_input(b: &mut Builder, name: &str, dims: &[Option<usize>]) {
    let v = b.graph.input.iter_mut().find(|v| v.name() == name).expect("a graph input of that name");
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) else {
        panic!("a tensor input")
    };
    let dim = dims
        .iter()
        .enumerate()
        .map(|(a, d)| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                None => tensor_shape_proto::dimension::Value::DimParam(format!("{name}_{a}")),
            }),
            ..Default::default()
        })
        .collect();
    t.shape = Some(TensorShapeProto { dim });
}

/// Optional Conv attributes (`kernel_shape` is always written, from the weight).
#[derive(Clone, Debug, Default)]
pub struct ConvAttrs {
    pub pads: Option<Vec<i64>>,
    pub strides: Option<Vec<i64>>,
    pub dilations: Option<Vec<i64>>,
    pub group: Option<i64>,
}

impl ConvAttrs {
    pub fn pads(p: &[i64]) -> ConvAttrs {
        ConvAttrs { pads: Some(p.to_vec()), ..Default::default() }
    }
    pub fn strides(mut self, s: &[i64]) -> ConvAttrs {
        self.strides = Some(s.to_vec());
        self
    }
    pub fn dilations(mut self, d: &[i64]) -> ConvAttrs {
        self.dilations = Some(d.to_vec());
        self
    }
    pub fn group(mut self, g: i64) -> ConvAttrs {
        self.group = Some(g);
        self
    }
}

/// BatchNormalization parameters as the builder wrote them (values already rounded to f32).
#[derive(Clone, Debug)]
pub struct Bn {
    pub scale: Array1<f64>,
    pub bias: Array1<f64>,
    pub mean: Array1<f64>,
    pub var: Array1<f64>,
    pub epsilon: f32,
}

impl Bn {
    /// `(y - mean) / sqrt(var + eps) * gamma + beta` per channel (axis 1), by hand.
    pub fn apply(&self, y: &ArrayD<f64>) -> ArrayD<f64> {
        let mut out = y.clone();
        let eps = self.epsilon as f64;
        for (idx, v) in out.indexed_iter_mut() {
            let c = idx[1];
            *v = (*v - self.mean[c]) / (self.var[c] + eps).sqrt() * self.scale[c] + self.bias[c];
        }
        out
    }
}

pub struct Builder {
    pub graph: GraphProto,
    pub rng: StdRng,
    /// dtype of float initializers
    pub dtype: FloatType,
    pub opset: i64,
}

impl Builder {
    /// A graph with one input `x`, float `[1, c, h, w]`.
    pub fn new(c: usize, h: usize, w: usize) -> Builder {
        let mut graph = GraphProto { name: Some("test".into()), ..Default::default() };
        graph.input.push(tensor_info("x", DataType::Float, &[1, c as i64, h as i64, w as i64]));
        Builder { graph, rng: StdRng::seed_from_u64(0x5eed), dtype: FloatType::F32, opset: 17 }
    }

    /// Uniform in [-1, 1], rounded to f32 so that the initializers hold these values exactly.
    pub fn rand(&mut self, shape: &[usize]) -> ArrayD<f64> {
        let rng = &mut self.rng;
        ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(-1.0f64..=1.0) as f32 as f64)
    }

    /// Uniform in [lo, hi], rounded to f32.
    pub fn rand_in(&mut self, shape: &[usize], lo: f64, hi: f64) -> ArrayD<f64> {
        let rng = &mut self.rng;
        ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(lo..=hi) as f32 as f64)
    }

    pub fn initializer(&mut self, name: &str, a: &ArrayD<f64>) -> String {
        self.graph.initializer.push(from_f64(name, a, self.dtype));
        name.to_string()
    }

    /// A 1-D INT64 initializer.
    pub fn initializer_i64(&mut self, name: &str, v: &[i64]) -> String {
        self.graph.initializer.push(from_i64(name, &[v.len() as i64], v));
        name.to_string()
    }

    /// An initializer of any data type from raw little-endian bytes.
    pub fn initializer_raw(&mut self, name: &str, dt: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            data_type: Some(dt as i32),
            dims: dims.iter().map(|&d| d as i64).collect(),
            raw_data: Some(raw.into()),
            ..Default::default()
        });
        name.to_string()
    }

    /// A second graph input (a float tensor of shape `dims`).
    pub fn input(&mut self, name: &str, dims: &[usize]) -> String {
        let d: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.graph.input.push(tensor_info(name, DataType::Float, &d));
        name.to_string()
    }

    pub fn output(&mut self, name: &str) {
        self.graph.output.push(tensor_info(name, DataType::Float, &[]));
    }

    /// A node named `name` writing `outputs` (default: `{name}.y`); returns its first output.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        let output: Vec<String> = if outputs.is_empty() {
            vec![format!("{name}.y")]
        } else {
            outputs.iter().map(|s| s.to_string()).collect()
        };
        let first = output[0].clone();
        self.graph.node.push(NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output,
            attribute,
            ..Default::default()
        });
        first
    }

    /// A Conv reading `x` whose weight (and bias) are the initializers `{name}.w` (`{name}.b`).
    pub fn conv(&mut self, name: &str, x: &str, w: &ArrayD<f64>, bias: Option<&ArrayD<f64>>, a: ConvAttrs) -> String {
        let wn = self.initializer(&format!("{name}.w"), w);
        let mut inputs = vec![x.to_string(), wn];
        if let Some(b) = bias {
            inputs.push(self.initializer(&format!("{name}.b"), b));
        }
        self.conv_with(name, &inputs.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &w.shape()[2..], a)
    }

    /// A Conv on given input names (data, weight, optional bias), with `kernel` for kernel_shape.
    pub fn conv_with(&mut self, name: &str, inputs: &[&str], kernel: &[usize], a: ConvAttrs) -> String {
        let mut attrs = vec![attr_ints("kernel_shape", &kernel.iter().map(|&k| k as i64).collect::<Vec<_>>())];
        if let Some(p) = &a.pads {
            attrs.push(attr_ints("pads", p));
        }
        if let Some(s) = &a.strides {
            attrs.push(attr_ints("strides", s));
        }
        if let Some(d) = &a.dilations {
            attrs.push(attr_ints("dilations", d));
        }
        if let Some(g) = a.group {
            attrs.push(attr_int("group", g));
        }
        self.node("Conv", name, inputs, &[], attrs)
    }

    /// A Conv with random weight `[o, cin_per_group, k...]` and, if asked, a random bias; returns
    /// (output, weight, bias).
    #[allow(clippy::too_many_arguments)]
    pub fn conv_rand(
        &mut self,
        name: &str,
        x: &str,
        o: usize,
        cin_per_group: usize,
        k: &[usize],
        with_bias: bool,
        a: ConvAttrs,
    ) -> (String, ArrayD<f64>, Option<ArrayD<f64>>) {
        let mut shape = vec![o, cin_per_group];
        shape.extend_from_slice(k);
        let w = self.rand(&shape);
        let b = with_bias.then(|| self.rand(&[o]));
        let y = self.conv(name, x, &w, b.as_ref(), a);
        (y, w, b)
    }

    /// BatchNormalization of `c` channels with random parameters (var in [0.1, 2]), epsilon 1e-5,
    /// and `training_mode` if given.
    pub fn bn(&mut self, name: &str, x: &str, c: usize, training_mode: Option<i64>) -> (String, Bn) {
        let p = Bn {
            scale: self.rand(&[c]).into_dimensionality::<Ix1>().unwrap(),
            bias: self.rand(&[c]).into_dimensionality::<Ix1>().unwrap(),
            mean: self.rand(&[c]).into_dimensionality::<Ix1>().unwrap(),
            var: self.rand_in(&[c], 0.1, 2.0).into_dimensionality::<Ix1>().unwrap(),
            epsilon: 1e-5,
        };
        let y = self.bn_with(name, x, &p, training_mode, &[]);
        (y, p)
    }

    /// BatchNormalization with given parameters (initializers `{name}.scale`, `.B`, `.mean`, `.var`).
    pub fn bn_with(&mut self, name: &str, x: &str, p: &Bn, training_mode: Option<i64>, outputs: &[&str]) -> String {
        let s = self.initializer(&format!("{name}.scale"), &p.scale.clone().into_dyn());
        let b = self.initializer(&format!("{name}.B"), &p.bias.clone().into_dyn());
        let m = self.initializer(&format!("{name}.mean"), &p.mean.clone().into_dyn());
        let v = self.initializer(&format!("{name}.var"), &p.var.clone().into_dyn());
        let mut attrs = vec![attr_float("epsilon", p.epsilon)];
        if let Some(t) = training_mode {
            attrs.push(attr_int("training_mode", t));
        }
        self.node("BatchNormalization", name, &[x, &s, &b, &m, &v], outputs, attrs)
    }

    pub fn add(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node("Add", name, &[a, b], &[], vec![])
    }

    /// Slice (opset >= 10 form): starts/ends/axes (/steps) as INT64 initializers.
    pub fn slice(
        &mut self,
        name: &str,
        x: &str,
        starts: &[i64],
        ends: &[i64],
        axes: &[i64],
        steps: Option<&[i64]>,
    ) -> String {
        let s = self.initializer_i64(&format!("{name}.starts"), starts);
        let e = self.initializer_i64(&format!("{name}.ends"), ends);
        let a = self.initializer_i64(&format!("{name}.axes"), axes);
        let mut inputs = vec![x.to_string(), s, e, a];
        if let Some(st) = steps {
            inputs.push(self.initializer_i64(&format!("{name}.steps"), st));
        }
        self.node("Slice", name, &inputs.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[], vec![])
    }

    /// Pad (opset >= 11 form): pads as an INT64 initializer, `mode` attribute if given.
    pub fn pad(&mut self, name: &str, x: &str, pads: &[i64], mode: Option<&str>) -> String {
        let p = self.initializer_i64(&format!("{name}.pads"), pads);
        let attrs = mode.map(|m| vec![attr_string("mode", m)]).unwrap_or_default();
        self.node("Pad", name, &[x, &p], &[], attrs)
    }

    pub fn model(&self) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(self.opset) }],
            producer_name: Some("test".into()),
            graph: Some(self.graph.clone()),
            ..Default::default()
        }
    }

    pub fn build(&self) -> Model {
        Model::from_proto(self.model()).unwrap()
    }
}

/// Seeded input `[1, c, h, w]` (or any shape), uniform in [-1, 1].
pub fn rand_input(seed: u64, shape: &[usize]) -> ArrayD<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(-1.0f64..=1.0))
}

pub fn graph(m: &ModelProto) -> &GraphProto {
    m.graph.as_ref().unwrap()
}

/// A float initializer of the model as f64 (read here from raw_data or the typed fields).
pub fn init_f64(m: &ModelProto, name: &str) -> ArrayD<f64> {
    let t = graph(m).initializer.iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("no initializer '{name}'"));
    to_f64(t, t.raw_data.as_deref()).unwrap()
}

fn ints_of(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute.iter().find(|a| a.name() == name).map(|a| a.ints.clone())
}

/// The Conv node `n` of a (rewritten) model as an affine convolution, read from its attributes
/// and initializers (explicit pads only).
pub fn conv_of(m: &ModelProto, n: &NodeProto) -> AffineConv {
    assert_eq!(n.op_type(), "Conv");
    assert!(
        n.attribute.iter().all(|a| a.name() != "auto_pad" || a.s.as_deref() == Some(b"NOTSET".as_slice())),
        "auto_pad on {:?}",
        n.name()
    );
    let w = init_f64(m, &n.input[1]);
    let b = n.input.get(2).filter(|b| !b.is_empty()).map(|b| init_f64(m, b).into_dimensionality::<Ix1>().unwrap());
    let r = w.ndim() - 2;
    let us = |v: Vec<i64>| v.into_iter().map(|x| x as usize).collect::<Vec<_>>();
    let strides = ints_of(n, "strides").map(us).unwrap_or(vec![1; r]);
    let dilations = ints_of(n, "dilations").map(us).unwrap_or(vec![1; r]);
    let pads = ints_of(n, "pads").unwrap_or(vec![0; 2 * r]);
    let group = n.attribute.iter().find(|a| a.name() == "group").and_then(|a| a.i).unwrap_or(1) as usize;
    AffineConv::new(w, b, group, strides, dilations, pads[..r].to_vec(), pads[r..].to_vec())
}

/// The only Conv of the model.
pub fn only_conv(m: &ModelProto) -> AffineConv {
    let convs: Vec<&NodeProto> = graph(m).node.iter().filter(|n| n.op_type() == "Conv").collect();
    assert_eq!(
        convs.len(),
        1,
        "expected one Conv, got {:?}",
        graph(m).node.iter().map(|n| n.op_type()).collect::<Vec<_>>()
    );
    conv_of(m, convs[0])
}

/// A plain convolution from builder arrays (bias optional), for reference outputs.
pub fn affine(
    w: &ArrayD<f64>,
    b: Option<&ArrayD<f64>>,
    groups: usize,
    strides: &[usize],
    dilations: &[usize],
    pads: &[i64],
) -> AffineConv {
    let r = w.ndim() - 2;
    AffineConv::new(
        w.clone(),
        b.map(|b| b.clone().into_dimensionality::<Ix1>().unwrap()),
        groups,
        strides.to_vec(),
        dilations.to_vec(),
        pads[..r].to_vec(),
        pads[r..].to_vec(),
    )
}

pub fn max_abs_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter().zip(b.iter()).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

pub fn assert_close(got: &ArrayD<f64>, want: &ArrayD<f64>, tol: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "{what}: reference is (almost) zero, the check would be vacuous");
    let d = max_abs_diff(got, want);
    assert!(d <= tol * scale.max(1.0), "{what}: max abs diff {d} > {tol} (scale {scale})");
}

/// Run `m` in tract (typed, un-optimised plan) on `inputs` (one per graph input that is not an
/// initializer, in order; float32): its first output as f64.
pub fn run_f32(m: &Model, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    use prost::Message;
    use tract_onnx::prelude::*;
    let bytes = m.to_inline().unwrap().encode_to_vec();
    let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap();
    for (k, x) in inputs.iter().enumerate() {
        model = model.with_input_fact(k, f32::fact(x.shape()).into()).unwrap();
    }
    let plan = model.into_typed().unwrap().into_runnable().unwrap();
    let ins: TVec<TValue> = inputs.iter().map(|x| Tensor::from(x.mapv(|v| v as f32)).into()).collect();
    let out = plan.run(ins).unwrap();
    let t = out[0].clone().into_tensor();
    let v: Vec<f64> = t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().iter().map(|&v| v as f64).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}
