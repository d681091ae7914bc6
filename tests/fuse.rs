//! Every fixture export, fused, has PyTorch's deploy structure and reproduces PyTorch's outputs
//! (saved in io.npz) in tract; merged weights match PyTorch's own deploy weights.

use acnet_onnx::tensor::to_f64;
use acnet_onnx::Model;
use acnet_onnx::{fuse, Stats};
use acnet_onnx::{save, DataMode};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::NpzReader;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

const STYLES: &[&str] = &["ts_fold", "ts_nofold_op11", "dynamo_ext", "dynamo_inline", "ts_dynbatch"];
/// Every fixture model (DBB goes through the general affine-region path).
const MODELS: &[&str] = &["cifar_quick", "resnet20", "corners", "mobileone", "qarepvgg", "conv2", "repopt", "dbb"];

fn dir(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model)
}

fn npz(model: &str, key: &str) -> ArrayD<f32> {
    let mut r = NpzReader::new(std::fs::File::open(dir(model).join("io.npz")).unwrap()).unwrap();
    r.by_name(key).unwrap()
}

fn run(path: &Path, x: &ArrayD<f32>) -> ArrayD<f32> {
    let m = tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .with_input_fact(0, f32::fact(x.shape()).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let out = m.run(tvec!(Tensor::from(x.clone()).into())).unwrap();
    let t = out[0].clone().into_tensor();
    let v = t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn close(got: &ArrayD<f32>, want: &ArrayD<f32>, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let mag = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * mag, "{what}: max abs diff {diff} > 1e-4 x {mag}");
}

/// Conv weights and biases in graph order.
fn conv_params(m: &Model) -> Vec<(ArrayD<f64>, Option<ArrayD<f64>>)> {
    let g = m.proto.graph.as_ref().unwrap();
    let get = |name: &str| {
        let t = g.initializer.iter().find(|t| t.name() == name).unwrap();
        to_f64(t, m.raw_bytes(t).unwrap().as_deref()).unwrap()
    };
    g.node
        .iter()
        .filter(|n| n.op_type() == "Conv")
        .map(|n| (get(&n.input[1]), n.input.get(2).filter(|b| !b.is_empty()).map(|b| get(b))))
        .collect()
}

fn check(model: &str, style: &str) {
    let src = dir(model).join(format!("{style}.onnx"));
    let what = format!("{model}/{style}");
    let mut m = Model::load(&src).unwrap();
    let original = m.clone();
    let report = fuse(&mut m).unwrap();
    assert!(report.refused.is_empty(), "{what}: {:?}", report.refused);
    let deploy = Model::load(dir(model).join("deploy.onnx")).unwrap();
    let ds = Stats::of(&deploy);
    let fs = &report.after;
    assert_eq!(fs.op("Conv"), ds.op("Conv"), "{what}: Conv count");
    assert!(fs.op("BatchNormalization") <= ds.op("BatchNormalization"), "{what}: BN left");
    assert!(fs.op("Add") <= ds.op("Add"), "{what}: Add count {} > {}", fs.op("Add"), ds.op("Add"));
    assert_eq!(fs.op("Slice"), ds.op("Slice"), "{what}: Slice left");

    // nothing lost: graph inputs/outputs, metadata, producer, opsets
    assert_eq!(m.proto.opset_import, original.proto.opset_import);
    assert_eq!(m.proto.metadata_props, original.proto.metadata_props);
    assert_eq!(m.proto.producer_name, original.proto.producer_name);
    let (g, og) = (m.proto.graph.as_ref().unwrap(), original.proto.graph.as_ref().unwrap());
    assert_eq!(g.input, og.input);
    assert_eq!(g.output, og.output);

    // merged weights equal PyTorch's deploy weights: the convs of each shape, in graph order
    // (a merged conv sits where its sum was, so convs of different shapes may interleave)
    let by_shape = |v: Vec<(ArrayD<f64>, Option<ArrayD<f64>>)>| {
        let mut v: Vec<_> = v.into_iter().enumerate().collect();
        v.sort_by_key(|(i, (w, _))| (w.shape().to_vec(), *i));
        v.into_iter().map(|(_, p)| p).collect::<Vec<_>>()
    };
    let (ours, theirs) = (by_shape(conv_params(&m)), by_shape(conv_params(&deploy)));
    for (k, ((w, b), (dw, db))) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(w.shape(), dw.shape(), "{what}: conv {k} shape");
        let e = w.iter().zip(dw.iter()).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(e <= 1e-5, "{what}: conv {k} weight differs by {e}");
        let zero = ArrayD::zeros(IxDyn(&[w.shape()[0]]));
        let (b, db) = (b.as_ref().unwrap_or(&zero), db.as_ref().unwrap_or(&zero));
        let e = b.iter().zip(db.iter()).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(e <= 1e-5, "{what}: conv {k} bias differs by {e}");
    }

    // PyTorch's numbers, in tract
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("deploy.onnx");
    let saved = save(&m, &out, DataMode::Auto).unwrap();
    assert_eq!(saved.data.is_some(), style == "dynamo_ext", "{what}: external data kept as it came");
    close(&run(&out, &npz(model, "input")), &npz(model, "output"), &what);
    if style == "ts_dynbatch" {
        close(&run(&out, &npz(model, "input_b2")), &npz(model, "output_b2"), &format!("{what} batch 2"));
    }
}

#[test]
fn case_every_fixture_fuses_to_pytorch_deploy() {
    for model in MODELS {
        for style in STYLES {
            check(model, style);
        }
    }
}

#[test]
fn case_fuse_leaves_the_input_untouched_and_is_idempotent() {
    let src = dir("corners").join("ts_fold.onnx");
    let before = std::fs::read(&src).unwrap();
    let mut m = Model::load(&src).unwrap();
    fuse(&mut m).unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), before);
    let once = m.proto.clone();
    let again = fuse(&mut m).unwrap();
    assert!(again.rewrites.is_empty());
    assert_eq!(m.proto, once);
}

#[test]
fn case_refusals_are_empty_on_plain_deploy_models() {
    for model in MODELS {
        let mut m = Model::load(dir(model).join("deploy.onnx")).unwrap();
        let before = m.proto.clone();
        let r = fuse(&mut m).unwrap();
        assert!(r.rewrites.is_empty() && r.refused.is_empty(), "{model}");
        assert_eq!(m.proto, before, "{model}: untouched");
    }
}

/// The float conversions of large weights run on every core; the output is byte for byte the
/// single-threaded one.
#[test]
fn case_output_is_identical_to_the_single_threaded_result() {
    #[path = "support/mod.rs"]
    mod support;
    use support::{Builder, ConvAttrs};
    // an ACNet block with 128x64 channels: every kernel and the merged one past the size at
    // which conversions are split (64 Ki elements), with a BN after each branch
    let mut b = Builder::new(64, 6, 6);
    let mut sum: Option<String> = None;
    for (name, k, pads) in [("sq", [3, 3], [1, 1, 1, 1]), ("ver", [3, 1], [1, 0, 1, 0]), ("hor", [1, 3], [0, 1, 0, 1])]
    {
        let (y, _, _) = b.conv_rand(name, "x", 128, 64, &k, false, ConvAttrs::pads(&pads));
        let (z, _) = b.bn(&format!("{name}_bn"), &y, 128, None);
        sum = Some(match sum {
            None => z,
            Some(s) => b.add(&format!("{name}_add"), &s, &z),
        });
    }
    b.output(&sum.unwrap());
    let fused_with = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut m = b.build();
            let r = fuse(&mut m).unwrap();
            assert_eq!((r.blocks_merged, r.bns_folded), (1, 3), "{}", r.summary());
            prost::Message::encode_to_vec(&m.proto)
        })
    };
    assert_eq!(fused_with(1), fused_with(4));
}

/// ResNet-20 ACNet's TorchScript export with BatchNormalization nodes (opset 11), and it fused.
fn resnet20_bn_nodes_fused() -> (Model, Model) {
    let original = Model::load(dir("resnet20").join("ts_nofold_op11.onnx")).unwrap();
    let mut m = original.clone();
    fuse(&mut m).unwrap();
    (original, m)
}

/// The values of initializer `name` of `m`, in f64.
fn tensor_value(m: &Model, name: &str) -> ArrayD<f64> {
    let g = m.proto.graph.as_ref().unwrap();
    let t = g.initializer.iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("{name}"));
    to_f64(t, m.raw_bytes(t).unwrap().as_deref()).unwrap()
}

/// The Conv (no bias) of `original` that reads `weight`, folded in f64 with the
/// BatchNormalization after it, computed here from the export's parameters: (weight, bias).
fn folded_in_f64(original: &Model, weight: &str) -> (ArrayD<f64>, ArrayD<f64>) {
    let og = original.proto.graph.as_ref().unwrap();
    let conv = og.node.iter().find(|n| n.op_type() == "Conv" && n.input[1] == weight).unwrap();
    let bn = og.node.iter().find(|n| n.input.first() == conv.output.first()).unwrap();
    assert_eq!(bn.op_type(), "BatchNormalization");
    let eps = bn.attribute.iter().find(|a| a.name() == "epsilon").map_or(1e-5, |a| a.f()) as f64;
    assert_eq!(conv.input.len(), 2, "a Conv without bias");
    let p: Vec<ArrayD<f64>> = (1..5).map(|k| tensor_value(original, &bn.input[k])).collect();
    let (gamma, beta, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
    let mut w = tensor_value(original, weight);
    let mut b = beta.clone();
    for (o, mut row) in w.outer_iter_mut().enumerate() {
        let a = gamma[o] / (var[o] + eps).sqrt();
        row *= a;
        b[o] -= mean[o] * a;
    }
    (w, b)
}

#[test]
fn case_a_conv_only_folded_holds_its_weight_scaled_in_f64_and_rounded_once() {
    // ResNet-20's shortcut convs: a BatchNormalization folded, nothing merged (their
    // weights are computed from the stored bytes, ahead of the rewrite's end or at it)
    let (original, m) = resnet20_bn_nodes_fused();
    let g = m.proto.graph.as_ref().unwrap();
    let og = original.proto.graph.as_ref().unwrap();
    let mut convs = 0;
    for conv in og.node.iter().filter(|n| n.op_type() == "Conv") {
        let w = &conv.input[1];
        if ["square_conv", "ver_conv", "hor_conv"].iter().any(|b| w.contains(b)) {
            continue;
        }
        let (want, want_b) = folded_in_f64(&original, w);
        let fused = g.node.iter().find(|n| n.op_type() == "Conv" && n.input[1] == *w).unwrap_or_else(|| panic!("{w}"));
        for (name, want) in [(w, &want), (&fused.input[2], &want_b)] {
            let got = tensor_value(&m, name);
            assert_eq!(got.shape(), want.shape(), "{name}");
            let off = got.iter().zip(want.iter()).filter(|(g, w)| **g as f32 != **w as f32).count();
            assert_eq!(off, 0, "{name}: {off} of {} values are not the float64 fold rounded once", got.len());
        }
        convs += 1;
    }
    assert_eq!(convs, 2, "the two shortcut convs");
}

/// A BatchNormalization folded into each branch and the branches then merged give weights and
/// biases rounded to float32 once, from the float64 values: here each merged 3x3 Conv of
/// ResNet-20's BN-node export (TorchScript, opset 11; in the second Conv of each residual block
/// the branches' sum is read by the residual Add, so the merge happens at the fourth node from
/// the branch Convs) is computed in this test from the export's own parameters (per branch
/// W·γ/√(var+ε) and β − μ·γ/√(var+ε), the 3x1 and 1x3 kernels added onto the centre column and
/// row, the biases summed) and must equal ours bit for bit.
#[test]
fn case_a_kernel_folded_then_merged_is_rounded_once() {
    let (original, m) = resnet20_bn_nodes_fused();
    let og = original.proto.graph.as_ref().unwrap();
    let folded = |weight: &str| folded_in_f64(&original, weight);
    let mut blocks = 0;
    for t in &og.initializer {
        let Some(prefix) = t.name().strip_suffix("square_conv.weight") else { continue };
        let (mut want, sq_b) = folded(t.name());
        let ((ver, ver_b), (hor, hor_b)) =
            (folded(&format!("{prefix}ver_conv.weight")), folded(&format!("{prefix}hor_conv.weight")));
        let c = want.shape()[2] / 2;
        for o in 0..want.shape()[0] {
            for i in 0..want.shape()[1] {
                for k in 0..want.shape()[2] {
                    want[[o, i, k, c]] += ver[[o, i, k, 0]];
                }
                for k in 0..want.shape()[3] {
                    want[[o, i, c, k]] += hor[[o, i, 0, k]];
                }
            }
        }
        let got = tensor_value(&m, t.name());
        let off = got.iter().zip(want.iter()).filter(|(g, w)| **g as f32 != **w as f32).count();
        assert_eq!(off, 0, "{}: {off} of {} weights are not the float64 sum rounded once", t.name(), got.len());
        let g = m.proto.graph.as_ref().unwrap();
        let merged = g.node.iter().find(|n| n.op_type() == "Conv" && n.input[1] == t.name()).unwrap();
        let (got, want) = (tensor_value(&m, &merged.input[2]), &(&sq_b + &ver_b) + &hor_b);
        let off = got.iter().zip(want.iter()).filter(|(g, w)| **g as f32 != **w as f32).count();
        assert_eq!(off, 0, "{}: {off} of {} biases are not the float64 sum rounded once", merged.input[2], got.len());
        blocks += 1;
    }
    assert_eq!(blocks, 19, "every ACNet block of ResNet-20");
}
