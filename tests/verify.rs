//! Equivalence checker: tract runs every fixture export, the exports agree with PyTorch's
//! deploy models, real inputs from .npy/.npz files, broken models are caught, errors are
//! classified, the JSON report has the documented shape.

mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use acnet_onnx::verify::{verify, Criterion, Stat, VerifyOptions, VerifyReport};
use acnet_onnx::Error;
use ndarray::ArrayD;
use ndarray_npy::{NpzReader, NpzWriter, WriteNpyExt};
use prost::Message;
use tract_onnx::pb::ModelProto;

const MODELS: [&str; 8] = ["cifar_quick", "resnet20", "corners", "dbb", "mobileone", "qarepvgg", "conv2", "repopt"];
const EXPORTS: [&str; 5] = ["ts_fold", "ts_nofold_op11", "dynamo_ext", "dynamo_inline", "ts_dynbatch"];

fn fixture(model: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model).join(file)
}

fn one_sample() -> VerifyOptions {
    VerifyOptions { samples: 1, ..Default::default() }
}

fn io_array(model: &str, name: &str) -> ArrayD<f32> {
    let f = std::fs::File::open(fixture(model, "io.npz")).unwrap();
    NpzReader::new(f).unwrap().by_name(name).unwrap()
}

fn read_proto(p: &Path) -> ModelProto {
    ModelProto::decode(&*std::fs::read(p).unwrap()).unwrap()
}

fn write_proto(m: &ModelProto, p: &Path) {
    std::fs::write(p, m.encode_to_vec()).unwrap();
}

/// Every export of `model` against its deploy.onnx, default options (tolerances, 3 samples).
/// Collects all failures before asserting so one run names every broken file.
fn exports_match_deploy(model: &str) {
    let deploy = fixture(model, "deploy.onnx");
    let mut failures = vec![];
    for export in EXPORTS {
        let t = Instant::now();
        let p = fixture(model, &format!("{export}.onnx"));
        match verify(&p, &deploy, &VerifyOptions::default()) {
            Ok(r) => {
                eprintln!(
                    "{model}/{export}: {} max_abs {:.2e} ({:.1}s)",
                    if r.passed { "PASS" } else { "FAIL" },
                    r.outputs[0].max_abs_diff,
                    t.elapsed().as_secs_f64()
                );
                assert_eq!(r.outputs.len(), 1);
                assert_eq!(r.outputs[0].name, "output");
                assert_eq!(r.outputs[0].shape, vec![1, 10]);
                assert_eq!(r.inputs[0].shape, vec![1, 3, 32, 32]);
                if !r.passed {
                    failures.push(format!("{export}: not equivalent\n{}", r.table()));
                }
            }
            Err(e) => {
                eprintln!("{model}/{export}: ERROR {e}");
                failures.push(format!("{export}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{model}:\n{}", failures.join("\n"));
}

#[test]
fn case_exports_match_deploy_cifar_quick() {
    exports_match_deploy("cifar_quick");
}
#[test]
fn case_exports_match_deploy_resnet20() {
    exports_match_deploy("resnet20");
}
#[test]
fn case_exports_match_deploy_corners() {
    exports_match_deploy("corners");
}
#[test]
fn case_exports_match_deploy_dbb() {
    exports_match_deploy("dbb");
}
#[test]
fn case_exports_match_deploy_mobileone() {
    exports_match_deploy("mobileone");
}
#[test]
fn case_exports_match_deploy_qarepvgg() {
    exports_match_deploy("qarepvgg");
}
#[test]
fn case_exports_match_deploy_conv2() {
    exports_match_deploy("conv2");
}
#[test]
fn case_exports_match_deploy_repopt() {
    exports_match_deploy("repopt");
}

/// tract itself (typed plan, as the checker uses it) reproduces PyTorch's numbers on the real
/// input: deploy.onnx gives `deploy_output` and `output`, ts_fold gives `output`. Without this,
/// "export == deploy under tract" could hold with tract wrong on both.
#[test]
fn case_tract_reproduces_pytorch_outputs() {
    use tract_onnx::prelude::*;
    for model in MODELS {
        let input = io_array(model, "input");
        for (file, keys) in [("deploy.onnx", &["deploy_output", "output"][..]), ("ts_fold.onnx", &["output"][..])] {
            let plan = tract_onnx::onnx()
                .model_for_path(fixture(model, file))
                .unwrap()
                .with_input_fact(0, f32::fact([1, 3, 32, 32]).into())
                .unwrap()
                .into_typed()
                .unwrap()
                .into_runnable()
                .unwrap();
            let out = plan.run(tvec![Tensor::from(input.clone()).into_tvalue()]).unwrap();
            let got = out[0].to_plain_array_view::<f32>().unwrap().to_owned();
            for key in keys {
                let want = io_array(model, key);
                assert_eq!(got.shape(), want.shape());
                let max = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(max < 1e-4, "{model}/{file} vs io.npz {key}: max abs diff {max}");
            }
        }
    }
}

/// Real input from a .npy file and from an .npz holding only `input`: one sample, passes,
/// the report records where the data came from.
#[test]
fn case_input_files_npy_and_npz() {
    let dir = tempfile::tempdir().unwrap();
    let input = io_array("cifar_quick", "input");
    let npy = dir.path().join("input.npy");
    input.write_npy(std::fs::File::create(&npy).unwrap()).unwrap();
    let (r, c) = (fixture("cifar_quick", "ts_fold.onnx"), fixture("cifar_quick", "deploy.onnx"));

    let opts = VerifyOptions { input_files: vec![("input".into(), npy.clone())], ..Default::default() };
    let rep = verify(&r, &c, &opts).unwrap();
    assert!(rep.passed, "{}", rep.table());
    assert_eq!(rep.samples, 1, "file inputs give exactly one sample");
    assert_eq!(rep.inputs.len(), 1);
    assert_eq!(rep.inputs[0].name, "input");
    assert_eq!(rep.inputs[0].shape, vec![1, 3, 32, 32]);
    assert_eq!(rep.inputs[0].dtype, "float32");
    assert!(rep.inputs[0].source.contains("input.npy"), "{}", rep.inputs[0].source);
    assert!(rep.outputs.iter().all(|o| o.passed && o.max_abs_diff <= 1e-4));
    assert!(rep.outputs[0].max_abs_reference > 1e-3, "output is not trivially zero");

    let npz = dir.path().join("inputs.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&npz).unwrap());
    w.add_array("input", &input).unwrap();
    w.finish().unwrap();
    let opts = VerifyOptions { inputs_npz: Some(npz.clone()), ..Default::default() };
    let rep2 = verify(&r, &c, &opts).unwrap();
    assert!(rep2.passed, "{}", rep2.table());
    assert_eq!(rep2.samples, 1);
    assert!(rep2.inputs[0].source.contains("inputs.npz"), "{}", rep2.inputs[0].source);
    // same data, same models: same numbers
    assert_eq!(rep.outputs[0].max_abs_diff, rep2.outputs[0].max_abs_diff);

    // the fixture's own io.npz works too: its non-input arrays are ignored, with a note
    let opts = VerifyOptions { inputs_npz: Some(fixture("cifar_quick", "io.npz")), ..Default::default() };
    let rep3 = verify(&r, &c, &opts).unwrap();
    assert!(rep3.passed);
    assert_eq!(rep3.outputs[0].max_abs_diff, rep.outputs[0].max_abs_diff);
    assert!(rep3.notes.iter().any(|n| n.contains("ignored") && n.contains("deploy_output")), "{:?}", rep3.notes);

    // a float64 file is cast to the model's float32, with a note
    let npy64 = dir.path().join("input64.npy");
    input.mapv(|x| x as f64).write_npy(std::fs::File::create(&npy64).unwrap()).unwrap();
    let opts = VerifyOptions { input_files: vec![("input".into(), npy64)], ..Default::default() };
    let rep4 = verify(&r, &c, &opts).unwrap();
    assert!(rep4.passed);
    assert_eq!(rep4.outputs[0].max_abs_diff, rep.outputs[0].max_abs_diff);
    assert!(rep4.notes.iter().any(|n| n.contains("float64")), "{:?}", rep4.notes);
}

/// Changes with `f` the first float (raw_data or float_data) of the initializer feeding input
/// `slot` of the first (or last) node of type `op`.
fn mutate_first_float(m: &mut ModelProto, op: &str, slot: usize, last: bool, f: impl Fn(f32) -> f32) {
    let g = m.graph.as_mut().unwrap();
    let mut nodes = g.node.iter().filter(|n| n.op_type == op);
    let node = if last { nodes.next_back() } else { nodes.next() }.unwrap();
    let w = node.input[slot].clone();
    let t = g.initializer.iter_mut().find(|t| t.name == w).expect("conv weight initializer");
    if !t.raw_data.is_empty() {
        let old = f32::from_le_bytes(t.raw_data[0..4].try_into().unwrap());
        t.raw_data[0..4].copy_from_slice(&f(old).to_le_bytes());
    } else {
        t.float_data[0] = f(t.float_data[0]);
    }
}

/// One weight of deploy.onnx changed: the check runs and fails, naming `output`.
#[test]
fn case_changed_weight_fails() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = fixture("cifar_quick", "deploy.onnx");
    let mut m = read_proto(&deploy);
    mutate_first_float(&mut m, "Conv", 1, false, |w| w + 0.5);
    let bad = dir.path().join("bad.onnx");
    write_proto(&m, &bad);

    let opts = VerifyOptions::default();
    let rep = verify(&fixture("cifar_quick", "ts_fold.onnx"), &bad, &opts).unwrap();
    assert!(!rep.passed, "{}", rep.table());
    assert_eq!(rep.exit_code(), 1);
    assert_eq!(rep.samples, 3);
    let o = &rep.outputs[0];
    assert_eq!(o.name, "output");
    assert!(!o.passed);
    assert!(o.max_abs_diff > opts.atol, "{}", rep.table());
    assert_eq!(o.min_atol, o.max_abs_diff);
    assert!(o.min_rtol > 0.0);
    assert!(o.failing_elements > 0);
    assert_eq!(o.worst_index.len(), 2);
    assert_eq!(o.worst_index[0], 0);
    assert!(o.worst_index[1] < 10);
    // worst values are f64 of f32 outputs: their difference is exact
    assert_eq!((o.worst_reference - o.worst_candidate).abs(), o.max_abs_diff);
    assert!(o.mean_abs_diff > 0.0 && o.mean_abs_diff <= o.max_abs_diff);
    let table = rep.table();
    assert!(table.contains("FAIL") && table.contains("output") && table.contains("NOT EQUIVALENT"), "{table}");

    // tolerances from the report make it pass: min_atol is the smallest passing atol
    let loose = VerifyOptions { atol: o.min_atol, rtol: 0.0, criterion: Criterion::Tolerance, ..Default::default() };
    assert!(verify(&fixture("cifar_quick", "ts_fold.onnx"), &bad, &loose).unwrap().passed);
    let just_below =
        VerifyOptions { atol: o.min_atol * 0.999, rtol: 0.0, criterion: Criterion::Tolerance, ..Default::default() };
    assert!(!verify(&fixture("cifar_quick", "ts_fold.onnx"), &bad, &just_below).unwrap().passed);
    // min_rtol with the default atol
    let by_rtol = VerifyOptions { rtol: o.min_rtol * 1.0001, criterion: Criterion::Tolerance, ..Default::default() };
    assert!(verify(&fixture("cifar_quick", "ts_fold.onnx"), &bad, &by_rtol).unwrap().passed);

    // a NaN bias in the classifier: fails whatever the tolerance, and says so (a NaN in the
    // first conv's weight would not do: tract's Relu/MaxPool turn NaN into numbers)
    let mut m = read_proto(&deploy);
    mutate_first_float(&mut m, "Gemm", 2, true, |_| f32::NAN);
    let nan = dir.path().join("nan.onnx");
    write_proto(&m, &nan);
    let huge = VerifyOptions { atol: 1e30, rtol: 1e30, samples: 1, ..Default::default() };
    let rep = verify(&deploy, &nan, &huge).unwrap();
    assert!(!rep.passed);
    assert!(rep.outputs[0].nan_candidate > 0);
    assert_eq!(rep.outputs[0].nan_reference, 0);
    assert!(rep.outputs[0].problem.as_deref().unwrap_or("").contains("NaN"), "{:?}", rep.outputs[0]);
    assert!(rep.table().contains("NaN"));
}

/// A rewrite may give a tensor of the block it replaced another value: in a residual ACNet
/// block the merged Conv writes the name of the square branch it grew from, and the block's sum
/// is an Add of it and the shortcut. Such a name is not where a failure is localised (it
/// differs by design): one weight wrong after those blocks is named where it is.
#[test]
fn case_localisation_is_not_fooled_by_a_name_the_rewrite_gave_another_value() {
    let dir = tempfile::tempdir().unwrap();
    let export = fixture("resnet20", "ts_fold.onnx");
    let mut m = acnet_onnx::Model::load(&export).unwrap();
    acnet_onnx::fuse(&mut m).unwrap();
    let bad = dir.path().join("bad.onnx");
    acnet_onnx::save(&m, &bad, acnet_onnx::DataMode::Inline).unwrap();
    let mut proto = read_proto(&bad);
    let g = proto.graph.as_mut().unwrap();
    // the residual blocks before it: a merged Conv writing its square branch's name
    let renamed = "/layers/layers.0/conv2/square_conv/Conv_output_0";
    assert!(g.node.iter().any(|n| n.op_type == "Conv" && n.output[0] == renamed));
    let conv = "/layers/layers.4/conv1/square_conv/Conv";
    let w = g.node.iter().find(|n| n.name == conv).unwrap().input[1].clone();
    let t = g.initializer.iter_mut().find(|t| t.name == w).unwrap();
    let old = f32::from_le_bytes(t.raw_data[0..4].try_into().unwrap());
    t.raw_data[0..4].copy_from_slice(&(old + 0.5).to_le_bytes());
    write_proto(&proto, &bad);
    let rep = verify(&export, &bad, &one_sample()).unwrap();
    assert!(!rep.passed, "{}", rep.table());
    let d = rep.divergence.as_ref().unwrap_or_else(|| panic!("{}", rep.table()));
    assert_eq!((d.node.as_str(), d.tensor.as_str()), (conv, "/layers/layers.4/conv1/Add_1_output_0"), "{d:?}");
}

/// Same seed: same inputs, same numbers; another seed: other inputs.
#[test]
fn case_seeded_inputs_are_deterministic() {
    let (r, c) = (fixture("qarepvgg", "ts_nofold_op11.onnx"), fixture("qarepvgg", "deploy.onnx"));
    let a = verify(&r, &c, &VerifyOptions { seed: 7, samples: 2, ..Default::default() }).unwrap();
    let b = verify(&r, &c, &VerifyOptions { seed: 7, samples: 2, ..Default::default() }).unwrap();
    let d = verify(&r, &c, &VerifyOptions { seed: 8, samples: 2, ..Default::default() }).unwrap();
    assert_eq!(a.outputs, b.outputs);
    assert_ne!(a.outputs[0].max_abs_reference, d.outputs[0].max_abs_reference);
    assert_eq!((a.seed, a.samples), (7, 2));
    assert!(a.inputs[0].source.contains("random") && a.inputs[0].source.contains("seed 7"));
}

fn rename_input(m: &mut ModelProto, from: &str, to: &str) {
    let g = m.graph.as_mut().unwrap();
    for i in g.input.iter_mut().filter(|i| i.name == from) {
        i.name = to.into();
    }
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut().filter(|i| *i == from) {
            *i = to.into();
        }
    }
}

fn rename_output(m: &mut ModelProto, from: &str, to: &str) {
    let g = m.graph.as_mut().unwrap();
    for o in g.output.iter_mut().filter(|o| o.name == from) {
        o.name = to.into();
    }
    for n in g.node.iter_mut() {
        for o in n.output.iter_mut().filter(|o| *o == from) {
            *o = to.into();
        }
    }
}

fn assert_one_line(e: &Error) {
    let s = e.to_string();
    assert!(!s.contains('\n') && !s.is_empty(), "not one line: {s:?}");
    assert_eq!(e.exit_code(), 2);
}

/// Renamed input or output: Signature; missing / garbage file: Load naming the path.
#[test]
fn case_signature_and_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = fixture("conv2", "deploy.onnx");
    let ts = fixture("conv2", "ts_fold.onnx");

    let mut m = read_proto(&deploy);
    rename_input(&mut m, "input", "x");
    let renamed = dir.path().join("renamed_input.onnx");
    write_proto(&m, &renamed);
    // the renamed model itself is fine
    assert!(verify(&renamed, &renamed, &one_sample()).unwrap().passed);
    let e = verify(&ts, &renamed, &one_sample()).unwrap_err();
    assert!(matches!(&e, Error::Signature(s) if s.contains("input") && s.contains("x")), "{e}");
    assert_one_line(&e);

    let mut m = read_proto(&deploy);
    rename_output(&mut m, "output", "logits");
    let renamed = dir.path().join("renamed_output.onnx");
    write_proto(&m, &renamed);
    let e = verify(&renamed, &ts, &one_sample()).unwrap_err();
    assert!(matches!(&e, Error::Signature(s) if s.contains("logits") && s.contains("output")), "{e}");
    assert_one_line(&e);

    let missing = dir.path().join("no_such_model.onnx");
    let e = verify(&missing, &deploy, &one_sample()).unwrap_err();
    assert!(matches!(&e, Error::Load { path, .. } if *path == missing), "{e:?}");
    assert!(e.to_string().contains("no_such_model.onnx"), "{e}");
    assert_one_line(&e);
    let e = verify(&deploy, &missing, &one_sample()).unwrap_err();
    assert!(matches!(&e, Error::Load { path, .. } if *path == missing), "{e:?}");

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"\xff\xff\xff\xff not a protobuf").unwrap();
    let e = verify(&deploy, &garbage, &one_sample()).unwrap_err();
    assert!(matches!(&e, Error::Load { path, .. } if *path == garbage), "{e:?}");
    assert!(e.to_string().contains("garbage.onnx"), "{e}");
    assert_one_line(&e);

    // external data gone: Load naming the model
    let ext = dir.path().join("dynamo_ext.onnx");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx"), &ext).unwrap();
    let e = verify(&ext, &deploy, &one_sample()).unwrap_err();
    assert!(matches!(&e, Error::Load { path, .. } if *path == ext), "{e:?}");
    assert!(e.to_string().contains("dynamo_ext.onnx"), "{e}");
    assert_one_line(&e);
}

/// An ONNX operator tract has no implementation of is cut, not an error: where the candidate
/// has it in place of the reference's node, the check fails naming both; a model holding it is
/// equivalent to itself (the rest of it is run).
#[test]
fn case_unsupported_operator_is_cut_and_compared() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = fixture("qarepvgg", "deploy.onnx");
    let mut m = read_proto(&deploy);
    // Bernoulli (opset 15, one input, same shape out) is not in tract-onnx 0.23's op register
    let relu = m.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
    relu.op_type = "Bernoulli".into();
    let p = dir.path().join("bernoulli.onnx");
    write_proto(&m, &p);
    let rep = verify(&deploy, &p, &one_sample()).unwrap();
    assert!(!rep.passed && rep.exit_code() == 1, "{}", rep.table());
    let cuts = rep.cuts.as_ref().unwrap();
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].op, "Relu");
    assert!(cuts[0].why.contains("Bernoulli") && cuts[0].why.contains("no implementation"), "{:?}", cuts[0]);
    let problem = cuts[0].problem.as_deref().unwrap();
    assert!(problem.contains("Bernoulli") && problem.contains("not Relu"), "{problem}");
    // the Conv before it is compared and passes
    assert!(rep.outputs.iter().all(|o| o.passed), "{}", rep.table());
    assert!(rep.table().contains("NOT EQUIVALENT"), "{}", rep.table());

    let rep = verify(&p, &p, &one_sample()).unwrap();
    assert!(rep.passed && rep.exit_code() == 0, "{}", rep.table());
    assert_eq!(rep.cuts.as_ref().unwrap()[0].op, "Bernoulli");
    assert!(rep.cuts.as_ref().unwrap()[0].problem.is_none());
}

/// Bad input specifications are Input errors, never panics.
#[test]
fn case_bad_inputs_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (r, c) = (fixture("conv2", "ts_fold.onnx"), fixture("conv2", "deploy.onnx"));
    let check = |opts: VerifyOptions, what: &str| {
        let e = verify(&r, &c, &opts).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{what}: {e:?}");
        assert_one_line(&e);
        e.to_string()
    };
    // wrong rank
    let npy = dir.path().join("rank3.npy");
    ndarray::Array3::<f32>::zeros((3, 32, 32)).write_npy(std::fs::File::create(&npy).unwrap()).unwrap();
    let s = check(VerifyOptions { input_files: vec![("input".into(), npy)], ..Default::default() }, "rank");
    assert!(s.contains("rank"), "{s}");
    // int data for a float input
    let npy = dir.path().join("ints.npy");
    ndarray::Array4::<i64>::zeros((1, 3, 32, 32)).write_npy(std::fs::File::create(&npy).unwrap()).unwrap();
    let s = check(VerifyOptions { input_files: vec![("input".into(), npy)], ..Default::default() }, "dtype");
    assert!(s.contains("int64") && s.contains("float32"), "{s}");
    // not an input of the models
    let s =
        check(VerifyOptions { input_shapes: vec![("image".into(), vec![1, 3, 32, 32])], ..Default::default() }, "name");
    assert!(s.contains("image"), "{s}");
    // missing / not-npy file
    let s = check(
        VerifyOptions { input_files: vec![("input".into(), dir.path().join("nope.npy"))], ..Default::default() },
        "missing",
    );
    assert!(s.contains("nope.npy"), "{s}");
    let junk = dir.path().join("junk.npy");
    std::fs::write(&junk, b"hello").unwrap();
    check(VerifyOptions { input_files: vec![("input".into(), junk)], ..Default::default() }, "junk");
    // npz without any input array
    let npz = dir.path().join("other.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&npz).unwrap());
    w.add_array("something", &ndarray::Array1::<f32>::zeros(3)).unwrap();
    w.finish().unwrap();
    let s = check(VerifyOptions { inputs_npz: Some(npz), ..Default::default() }, "npz");
    assert!(s.contains("something"), "{s}");
    // --input-shape disagreeing with the file
    let npy = dir.path().join("ok.npy");
    ndarray::Array4::<f32>::zeros((1, 3, 32, 32)).write_npy(std::fs::File::create(&npy).unwrap()).unwrap();
    check(
        VerifyOptions {
            input_files: vec![("input".into(), npy)],
            input_shapes: vec![("input".into(), vec![2, 3, 32, 32])],
            ..Default::default()
        },
        "shape vs file",
    );
    check(VerifyOptions { samples: 0, ..Default::default() }, "samples");
    check(VerifyOptions { atol: f64::NAN, ..Default::default() }, "atol");
}

/// The JSON form of the report has the documented keys and types.
#[test]
fn case_json_report() {
    let rep: VerifyReport = verify(
        &fixture("mobileone", "dynamo_ext.onnx"),
        &fixture("mobileone", "deploy.onnx"),
        &VerifyOptions { samples: 2, ..Default::default() },
    )
    .unwrap();
    let text = serde_json::to_string_pretty(&rep).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["passed"], serde_json::Value::Bool(true));
    for k in ["atol", "rtol"] {
        assert!(v[k].is_f64(), "{k}");
    }
    assert_eq!(v["samples"], 2);
    assert_eq!(v["seed"], 0);
    assert!(v["reference"].as_str().unwrap().ends_with("dynamo_ext.onnx"));
    assert!(v["candidate"].as_str().unwrap().ends_with("deploy.onnx"));
    assert!(v["notes"].is_array());
    // run whole: nothing cut, everything checked
    assert!(v["cuts"].is_null() && v["parts"].is_null() && v["checked"] == true, "{v}");
    let inputs = v["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0]["name"], "input");
    assert_eq!(inputs[0]["shape"], serde_json::json!([1, 3, 32, 32]));
    assert_eq!(inputs[0]["dtype"], "float32");
    assert!(inputs[0]["source"].is_string());
    let outputs = v["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    let o = &outputs[0];
    assert_eq!(o["name"], "output");
    assert_eq!(o["passed"], true);
    assert_eq!(o["shape"], serde_json::json!([1, 10]));
    for k in ["max_abs_diff", "max_rel_diff", "mean_abs_diff", "max_abs_reference", "min_atol", "min_rtol"] {
        assert!(o[k].is_number(), "{k}: {}", o[k]);
    }
    assert!(o["worst_index"].as_array().unwrap().iter().all(|x| x.is_u64()));
    assert_eq!(o["min_rtol"], 0.0, "passing by atol alone");
    assert!(o["part"].is_null());
    // table: header, rule, one row, verdict
    let t = rep.table();
    assert!(t.lines().any(|l| l.starts_with("output") && l.contains("PASS")), "{t}");
    assert!(t.lines().last().unwrap().starts_with("EQUIVALENT"), "{t}");
    // fixed width: header, rule and row line up
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0].len(), lines[1].len(), "{t}");
    assert_eq!(lines[0].len(), lines[2].len(), "{t}");
}

/// Symbolic batch: --input-shape sets it (and overrides deploy's fixed batch 1, with a note);
/// without it the batch defaults to 1 and the notes say so; real batch-2 data from an npz.
#[test]
fn case_dynamic_batch() {
    let (r, c) = (fixture("resnet20", "ts_dynbatch.onnx"), fixture("resnet20", "deploy.onnx"));
    let opts =
        VerifyOptions { input_shapes: vec![("input".into(), vec![2, 3, 32, 32])], samples: 1, ..Default::default() };
    let rep = verify(&r, &c, &opts).unwrap();
    assert!(rep.passed, "{}", rep.table());
    assert_eq!(rep.inputs[0].shape, vec![2, 3, 32, 32]);
    assert_eq!(rep.outputs[0].shape, vec![2, 10]);
    assert!(rep.notes.iter().any(|n| n.contains("overridden")), "{:?}", rep.notes);

    let rep = verify(&r, &c, &one_sample()).unwrap();
    assert!(rep.passed);
    assert_eq!(rep.inputs[0].shape, vec![1, 3, 32, 32]);
    assert!(
        rep.notes.iter().any(|n| n.contains("symbolic") && n.contains("batch") && n.contains("1")),
        "{:?}",
        rep.notes
    );
    // both symbolic: default 1, noted
    let rep = verify(&r, &r, &one_sample()).unwrap();
    assert!(rep.passed && rep.outputs[0].max_abs_diff == 0.0);
    assert!(rep.notes.iter().any(|n| n.contains("defaulting to 1")), "{:?}", rep.notes);

    // a fixed-batch model that really cannot take batch 2 (dynamo bakes the batch into a
    // Reshape): Run error naming the ONNX node and op, and saying the shape was overridden
    let e = verify(&fixture("resnet20", "dynamo_inline.onnx"), &c, &opts).unwrap_err();
    match &e {
        Error::Run { path, msg } => {
            assert!(path.ends_with("dynamo_inline.onnx"));
            assert!(msg.contains("(Reshape)") && msg.contains("overrides"), "{msg}");
        }
        other => panic!("expected Run, got {other:?}"),
    }
    assert_one_line(&e);

    // real batch-2 data: io.npz's input_b2 stored as `input`
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("b2.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&npz).unwrap());
    w.add_array("input", &io_array("resnet20", "input_b2")).unwrap();
    w.finish().unwrap();
    let rep = verify(&r, &c, &VerifyOptions { inputs_npz: Some(npz), ..Default::default() }).unwrap();
    assert!(rep.passed, "{}", rep.table());
    assert_eq!(rep.inputs[0].shape, vec![2, 3, 32, 32]);
    assert_eq!(rep.outputs[0].shape, vec![2, 10]);
}

/// progress=true runs (the lines only appear after 1 s, so nothing to assert on stderr here).
#[test]
fn case_progress_does_not_break() {
    let (r, c) = (fixture("dbb", "ts_fold.onnx"), fixture("dbb", "deploy.onnx"));
    let rep = verify(&r, &c, &VerifyOptions { progress: true, samples: 2, ..Default::default() }).unwrap();
    assert!(rep.passed);
}

/// Writes a .npy by hand (ndarray-npy cannot write float16 or big-endian data).
fn write_raw_npy(p: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(p, bytes).unwrap();
}

/// float16 and big-endian .npy inputs are read (and cast to the model's float32, with a note).
#[test]
fn case_npy_float16_and_big_endian() {
    let dir = tempfile::tempdir().unwrap();
    let input = io_array("repopt", "input");
    let (r, c) = (fixture("repopt", "ts_fold.onnx"), fixture("repopt", "deploy.onnx"));

    let be = dir.path().join("be.npy");
    let data: Vec<u8> = input.iter().flat_map(|x| x.to_be_bytes()).collect();
    write_raw_npy(&be, ">f4", input.shape(), &data);
    let le = dir.path().join("le.npy");
    input.write_npy(std::fs::File::create(&le).unwrap()).unwrap();
    let a = verify(&r, &c, &VerifyOptions { input_files: vec![("input".into(), le)], ..Default::default() }).unwrap();
    let b = verify(&r, &c, &VerifyOptions { input_files: vec![("input".into(), be)], ..Default::default() }).unwrap();
    assert!(a.passed && b.passed);
    assert_eq!(a.outputs, b.outputs, "big-endian file decodes to the same data");

    let h = dir.path().join("half.npy");
    let data: Vec<u8> = input.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect();
    write_raw_npy(&h, "<f2", input.shape(), &data);
    let rep = verify(&r, &c, &VerifyOptions { input_files: vec![("input".into(), h)], ..Default::default() }).unwrap();
    assert!(rep.passed, "{}", rep.table());
    assert!(rep.notes.iter().any(|n| n.contains("float16") && n.contains("float32")), "{:?}", rep.notes);
    assert_eq!(rep.inputs[0].dtype, "float32");
}

/// Non-finite values pass where both models agree (both NaN, or the same infinity), and fail
/// where they do not.
#[test]
fn case_nan_and_inf_pass_only_where_both_models_agree() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = fixture("conv2", "deploy.onnx");
    let with = |name: &str, v: f32| {
        let mut m = read_proto(&deploy);
        mutate_first_float(&mut m, "Gemm", 2, true, |_| v);
        let p = dir.path().join(name);
        write_proto(&m, &p);
        p
    };
    let (nan, nan2, inf, minus_inf) = (
        with("nan.onnx", f32::NAN),
        with("nan2.onnx", f32::NAN),
        with("inf.onnx", f32::INFINITY),
        with("minf.onnx", f32::NEG_INFINITY),
    );
    for criterion in [Criterion::Noise, Criterion::Tolerance] {
        let opts = VerifyOptions { samples: 1, criterion, ..Default::default() };
        let agree = verify(&nan, &nan2, &opts).unwrap();
        assert!(agree.passed, "{criterion}: {}", agree.table());
        assert!(agree.outputs[0].nan_reference > 0 && agree.outputs[0].nan_candidate > 0);
        assert!(verify(&inf, &inf, &opts).unwrap().passed, "{criterion}: same infinities");
        for (a, b) in [(&deploy, &nan), (&nan, &deploy), (&inf, &minus_inf), (&deploy, &inf)] {
            let r = verify(a, b, &opts).unwrap();
            assert!(!r.passed, "{criterion}: {} vs {}", a.display(), b.display());
            assert!(
                r.outputs[0].problem.as_deref().unwrap_or("").contains("non-finite values disagree"),
                "{}",
                r.table()
            );
        }
    }
}

/// Per-output tolerances and error statistics (as Polygraphy's): the statistic of |a - b| within
/// atol, or that of |a - b|/|a| within rtol.
#[test]
fn case_per_output_tolerances_and_error_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = fixture("cifar_quick", "deploy.onnx");
    let mut m = read_proto(&deploy);
    mutate_first_float(&mut m, "Conv", 1, false, |w| w + 0.5);
    let bad = dir.path().join("bad.onnx");
    write_proto(&m, &bad);
    let reference = fixture("cifar_quick", "ts_fold.onnx");
    let tol = |f: &dyn Fn(&mut VerifyOptions)| {
        let mut o = VerifyOptions { criterion: Criterion::Tolerance, atol: 1e-12, rtol: 0.0, ..Default::default() };
        f(&mut o);
        verify(&reference, &bad, &o).unwrap()
    };
    let r = tol(&|_| {});
    assert!(!r.passed);
    let max = r.outputs[0].max_abs_diff;
    // `error` is the statistic, the largest over samples
    let mean = tol(&|o| o.stat = Stat::Mean).outputs[0].error;
    assert!(mean > 0.0 && mean < max, "{mean} {max}");
    // one output's own atol wins over the default
    assert!(tol(&|o| o.output_atol = vec![("output".into(), max)]).passed);
    assert!(!tol(&|o| o.output_atol = vec![("other".into(), max)]).passed);
    // the mean error is below the max: a mean statistic passes where max does not
    assert!(
        tol(&|o| {
            o.stat = Stat::Mean;
            o.atol = mean * 1.0001;
        })
        .passed
    );
    assert!(
        !tol(&|o| {
            o.stat = Stat::Max;
            o.atol = mean * 1.0001;
        })
        .passed
    );
    let q = tol(&|o| {
        o.stat = Stat::Quantile(0.5);
        o.atol = max;
    });
    assert!(q.passed && q.stat == "quantile:0.5", "{}", q.table());
    assert!((q.outputs[0].error - max).abs() > 0.0 || max == 0.0);
}

/// --save-outputs writes the inputs and the reference's outputs; --load-outputs compares a
/// candidate with them (here: outputs made by another model, as PyTorch's would be).
#[test]
fn case_golden_outputs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (export, deploy) = (fixture("conv2", "ts_fold.onnx"), fixture("conv2", "deploy.onnx"));
    let saved = dir.path().join("golden.npz");
    let r =
        verify(&export, &deploy, &VerifyOptions { save_outputs: Some(saved.clone()), ..Default::default() }).unwrap();
    assert!(r.passed);
    let names: Vec<String> = NpzReader::new(std::fs::File::open(&saved).unwrap()).unwrap().names().unwrap();
    assert_eq!(names, ["input", "output"]);
    let golden =
        VerifyOptions { inputs_npz: Some(saved.clone()), load_outputs: Some(saved.clone()), ..Default::default() };
    let r = verify(&export, &deploy, &golden).unwrap();
    assert!(r.passed && r.golden.is_some(), "{}", r.table());
    assert!(r.outputs[0].reference_error.is_some());
    // a candidate with one weight changed is far from the golden outputs
    let mut m = read_proto(&deploy);
    mutate_first_float(&mut m, "Conv", 1, false, |w| w * 1.01);
    let bad = dir.path().join("bad.onnx");
    write_proto(&m, &bad);
    assert!(!verify(&export, &bad, &golden).unwrap().passed);
    // golden outputs belong to given inputs
    let e = verify(&export, &deploy, &VerifyOptions { load_outputs: Some(saved), ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::Input(_)) && e.to_string().contains("--inputs"), "{e}");
}

/// float16 arrays in an .npz are inputs like any other.
#[test]
fn case_float16_inputs_from_npz() {
    let r = verify(
        &fixture("half", "ts_fold.onnx"),
        &fixture("half", "deploy.onnx"),
        &VerifyOptions { inputs_npz: Some(fixture("half", "io.npz")), ..Default::default() },
    )
    .unwrap();
    assert!(r.passed, "{}", r.table());
    assert_eq!((r.inputs[0].dtype.as_str(), r.samples), ("float16", 1));
    assert!(r.inputs[0].source.starts_with("npz"), "{:?}", r.inputs[0]);
}

/// A model whose weights are far larger than what a run computes: `x [b, 64, 1, 1]` → 1x1 Conv
/// to 256 → Relu → 1x1 Conv to 10 → Flatten (or, `bake_batch`, a Reshape to the constant
/// `[1, 10]`, as an export that baked its batch) → `out`. With `symbolic`, the input declares
/// its batch as the symbol `batch`; `nudge` adds to one weight of the first Conv.
fn weight_heavy(symbolic: bool, bake_batch: bool, nudge: f64) -> support::Builder {
    use acnet_onnx::proto::tensor_shape_proto::dimension::Value;
    let mut b = support::Builder::new(64, 1, 1);
    if symbolic {
        let t = b.graph.input[0].r#type.as_mut().unwrap();
        let Some(acnet_onnx::proto::type_proto::Value::TensorType(t)) = t.value.as_mut() else { unreachable!() };
        t.shape.as_mut().unwrap().dim[0].value = Some(Value::DimParam("batch".into()));
    }
    let mut w1 = b.rand(&[256, 64, 1, 1]);
    w1[[3, 5, 0, 0]] += nudge;
    let b1 = b.rand(&[256]);
    let y = b.conv("c1", "x", &w1, Some(&b1), support::ConvAttrs::default());
    let y = b.node("Relu", "relu", &[&y], &[], vec![]);
    let (y, _, _) = b.conv_rand("c2", &y, 10, 256, &[1, 1], true, support::ConvAttrs::default());
    if bake_batch {
        let shape = b.initializer_i64("shape", &[1, 10]);
        b.node("Reshape", "reshape", &[&y, &shape], &["out"], vec![]);
    } else {
        b.node("Flatten", "flatten", &[&y], &["out"], vec![support::attr_int("axis", 1)]);
    }
    b.output("out");
    b
}

fn write_builder(b: &support::Builder, p: &Path) {
    std::fs::write(p, prost::Message::encode_to_vec(&b.model())).unwrap();
}

fn stacked(r: &VerifyReport) -> bool {
    r.notes.iter().any(|n| n.contains("ran stacked"))
}

/// Both models declare a symbolic batch and their weights outweigh what a run computes: the
/// samples run stacked, one run per model, and every sample's outputs are its own — a wrong
/// candidate's error, worst sample and worst element are those of the same models run sample by
/// sample (their batch fixed at 1); a right candidate passes.
#[test]
fn case_samples_run_stacked_when_the_weights_outweigh_the_activations() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    write_builder(&weight_heavy(true, false, 0.0), &p("r.onnx"));
    write_builder(&weight_heavy(true, false, 0.5), &p("bad.onnx"));
    write_builder(&weight_heavy(false, false, 0.0), &p("r1.onnx"));
    write_builder(&weight_heavy(false, false, 0.5), &p("bad1.onnx"));
    let opts = VerifyOptions { samples: 5, ..Default::default() };

    let same = verify(&p("r.onnx"), &p("r.onnx"), &opts).unwrap();
    assert!(same.passed && stacked(&same), "{}\n{:?}", same.table(), same.notes);
    assert_eq!(same.outputs[0].shape, vec![1, 10]);
    // a batch of 2 per sample (--input-shape): 5 samples stacked into one batch of 10, each
    // sample's outputs its own (as with the fixed-batch models' batch 1 overridden to 2, which
    // run one by one and measure their noise too: the override does not undo the draws)
    let two = VerifyOptions { input_shapes: vec![("x".into(), vec![2, 64, 1, 1])], ..opts.clone() };
    let (a, b) = (verify(&p("r.onnx"), &p("bad.onnx"), &two).unwrap(), verify(&p("r1.onnx"), &p("bad1.onnx"), &two));
    let b = b.unwrap();
    assert!(stacked(&a) && !stacked(&b) && !a.passed && !b.passed, "{:?}\n{:?}", a.notes, b.notes);
    let (a, b) = (&a.outputs[0], &b.outputs[0]);
    assert_eq!((&a.shape, a.worst_sample, &a.worst_index), (&b.shape, b.worst_sample, &b.worst_index));
    approx::assert_relative_eq!(a.error, b.error, max_relative = 1e-5);
    assert!(a.noise.unwrap() > 0.0 && b.noise.unwrap() > 0.0, "{a:?}\n{b:?}");

    // a wrong candidate: the same error in the same sample and element as sample by sample
    let mut worst = vec![];
    for seed in 0..4 {
        let opts = VerifyOptions { seed, ..opts.clone() };
        let wrong = verify(&p("r.onnx"), &p("bad.onnx"), &opts).unwrap();
        let one_by_one = verify(&p("r1.onnx"), &p("bad1.onnx"), &opts).unwrap();
        assert!(stacked(&wrong) && !stacked(&one_by_one), "{:?}\n{:?}", wrong.notes, one_by_one.notes);
        assert!(!wrong.passed && !one_by_one.passed);
        let (a, b) = (&wrong.outputs[0], &one_by_one.outputs[0]);
        assert!(a.error > 0.01, "{}", wrong.table());
        assert_eq!((a.worst_sample, &a.worst_index), (b.worst_sample, &b.worst_index), "seed {seed}");
        approx::assert_relative_eq!(a.error, b.error, max_relative = 1e-5);
        approx::assert_relative_eq!(a.max_abs_reference, b.max_abs_reference, max_relative = 1e-6);
        worst.push(a.worst_sample);
    }
    // the samples were told apart: the worst is not always the same one
    assert!(worst.iter().any(|&s| s != worst[0]), "{worst:?}");
    // the first sample's outputs are its own (--save-outputs: its inputs and the reference's outputs)
    let saved = |r: &str, file: &str| {
        let npz = p(file);
        verify(&p(r), &p(r), &VerifyOptions { save_outputs: Some(npz.clone()), ..opts.clone() }).unwrap();
        let mut z = NpzReader::new(std::fs::File::open(npz).unwrap()).unwrap();
        let (x, y): (ArrayD<f32>, ArrayD<f32>) = (z.by_name("x").unwrap(), z.by_name("out").unwrap());
        (x, y)
    };
    let (x, y) = saved("r.onnx", "stacked.npz");
    let (x1, y1) = saved("r1.onnx", "one.npz");
    assert_eq!(x, x1);
    assert_eq!((y.shape(), y1.shape()), (&[1, 10][..], &[1, 10][..]));
    let far = y.iter().zip(&y1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(far <= 1e-5 * y1.iter().fold(1.0f32, |m, v| m.max(v.abs())), "{y} vs {y1}");
}

/// The samples run one by one where stacking them is not known to be safe or would not pay: a
/// model with a fixed batch, one whose activations outweigh its weights (ResNet-20 at 32x32),
/// one sample; and a candidate that declares a symbolic batch but baked its batch into a
/// Reshape runs its samples one by one (said in the notes) and still passes.
#[test]
fn case_samples_run_one_by_one_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    write_builder(&weight_heavy(true, false, 0.0), &p("r.onnx"));
    write_builder(&weight_heavy(false, false, 0.0), &p("fixed.onnx"));
    write_builder(&weight_heavy(true, true, 0.0), &p("baked.onnx"));
    let three = VerifyOptions::default();

    let r = verify(&p("r.onnx"), &p("fixed.onnx"), &three).unwrap();
    assert!(r.passed && !stacked(&r), "{:?}", r.notes);
    let r = verify(&p("r.onnx"), &p("r.onnx"), &one_sample()).unwrap();
    assert!(r.passed && !stacked(&r), "{:?}", r.notes);
    let dynbatch = fixture("resnet20", "ts_dynbatch.onnx");
    let r = verify(&dynbatch, &dynbatch, &three).unwrap();
    assert!(r.passed && !stacked(&r), "{:?}", r.notes);

    let r = verify(&p("r.onnx"), &p("baked.onnx"), &three).unwrap();
    assert!(r.passed && stacked(&r), "{}\n{:?}", r.table(), r.notes);
    assert!(
        r.notes.iter().any(|n| n.starts_with("the candidate's samples ran one by one") && n.contains("does not type")),
        "{:?}",
        r.notes
    );
    let r = verify(&p("baked.onnx"), &p("r.onnx"), &three).unwrap();
    assert!(r.passed && !stacked(&r), "{:?}", r.notes);
    assert!(r.notes.iter().any(|n| n.starts_with("the samples ran one by one")), "{:?}", r.notes);
}
