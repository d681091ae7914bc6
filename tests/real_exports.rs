//! Exports made the ways people make them (half precision, bfloat16, mixed precision with Cast
//! nodes, training mode, weights listed as graph inputs, opset 9, a detector, a deep net with
//! outputs near 1e5): each fuses with the default check passing (with `--eval-bn` /
//! `--freeze-initializers` where named), is as close to PyTorch's exact (float64) output as the
//! export itself, and has PyTorch's deploy structure; a model with one weight changed fails the
//! check at every scale and precision, and the failure names the block.

use acnet_onnx::verify::{verify, VerifyOptions};
use acnet_onnx::{fuse_file, Error, FuseFileReport, FuseOptions, Model, Stats};
use ndarray::ArrayD;
use ndarray_npy::{NpzReader, NpzWriter};
use std::path::{Path, PathBuf};

fn fixture(model: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model).join(file)
}

fn io<T: ndarray_npy::ReadableElement>(model: &str, key: &str) -> ArrayD<T> {
    let f = std::fs::File::open(fixture(model, "io.npz")).unwrap();
    NpzReader::new(f).unwrap().by_name(key).unwrap()
}

/// An .npz with `input` and, for the golden outputs, `output` (PyTorch's exact float64 output).
fn golden(dir: &Path, model: &str, input_key: &str) -> PathBuf {
    let p = dir.join(format!("{model}-golden.npz"));
    let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
    match input_key {
        "input" if model == "half" => {
            let x: ArrayD<half::f16> = {
                // ndarray-npy reads no float16: take the raw bits
                let f = std::fs::File::open(fixture(model, "io.npz")).unwrap();
                let mut z = zip::ZipArchive::new(f).unwrap();
                let mut e = z.by_name("input.npy").unwrap();
                let mut bytes = vec![];
                std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
                let data = &bytes[bytes.len() - 2 * 3 * 32 * 32..];
                let v = data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
                ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 3, 32, 32]), v).unwrap()
            };
            w.add_array("input", &x.mapv(|v| v.to_f32())).unwrap();
        }
        _ => w.add_array("input", &io::<f32>(model, input_key)).unwrap(),
    }
    w.add_array("output", &io::<f64>(model, "output_fp64")).unwrap();
    w.finish().unwrap();
    p
}

fn fuse_to(model: &str, style: &str, dir: &Path, opts: &FuseOptions) -> Result<(FuseFileReport, PathBuf), Error> {
    let out = dir.join(format!("{model}-{style}.onnx"));
    fuse_file(&fixture(model, &format!("{style}.onnx")), &out, opts).map(|r| (r, out))
}

/// No more Conv, BatchNormalization or Add nodes than PyTorch's deploy model, and no Slice left.
fn deploy_structure(model: &str, fused: &Path) {
    let (ours, theirs) =
        (Stats::of(&Model::load(fused).unwrap()), Stats::of(&Model::load(fixture(model, "deploy.onnx")).unwrap()));
    for op in ["Conv", "BatchNormalization", "Add"] {
        assert!(ours.op(op) <= theirs.op(op), "{model}: {op} {} > deploy's {}", ours.op(op), theirs.op(op));
    }
    assert_eq!(ours.op("Conv"), theirs.op("Conv"), "{model}: Conv count");
}

/// The fused model is no further from PyTorch's exact output than `factor` times the export's
/// own distance (or its rounding noise): the noise criterion against golden outputs.
fn as_exact_as_the_export(model: &str, export: &Path, fused: &Path, dir: &Path, input_key: &str, eval_bn: bool) {
    let opts = VerifyOptions {
        inputs_npz: Some(golden(dir, model, input_key)),
        load_outputs: Some(golden(dir, model, input_key)),
        eval_bn,
        freeze_initializers: true,
        ..Default::default()
    };
    let r = verify(export, fused, &opts).unwrap();
    assert!(r.passed, "{model}: {}", r.table());
    assert!(r.outputs[0].reference_error.is_some());
}

#[test]
fn case_half_precision_exports_fuse_check_and_stay_as_exact_as_the_export() {
    let d = tempfile::tempdir().unwrap();
    for (model, styles, input) in [
        ("half", &["ts_fold", "ts_nofold", "dynamo"][..], "input"),
        ("mixed", &["ts_fold", "dynamo"][..], "input"),
        // (the dynamo bfloat16 exports are not valid ONNX: float32 weights on bfloat16 activations)
        ("bfloat16", &["ts_fold"][..], "input_as_fp32"),
    ] {
        for style in styles {
            let (r, out) = fuse_to(model, style, d.path(), &FuseOptions::default()).unwrap();
            let check = r.check.as_ref().expect("checked");
            assert!(check.passed, "{model}/{style}: {}", check.table());
            assert_eq!(check.evaluation, "float32 upcast", "{model}/{style}");
            assert!(r.fuse.blocks_merged >= 4, "{model}/{style}: {}", r.fuse.summary());
            deploy_structure(model, &out);
            as_exact_as_the_export(model, &fixture(model, &format!("{style}.onnx")), &out, d.path(), input, false);
        }
    }
}

#[test]
fn case_training_mode_exports_name_the_flag_and_fuse_with_eval_bn() {
    let d = tempfile::tempdir().unwrap();
    for style in ["ts_train_op11", "ts_train_op17", "dynamo_train"] {
        let e = fuse_to("train_mode", style, d.path(), &FuseOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("is in training mode") && msg.contains("model.eval()") && msg.contains("--eval-bn"),
            "{msg}"
        );
        assert_eq!(e.exit_code(), 2);
        let opts = FuseOptions { check: VerifyOptions { eval_bn: true, ..Default::default() }, ..Default::default() };
        let (r, out) = fuse_to("train_mode", style, d.path(), &opts).unwrap();
        assert!(r.check.as_ref().unwrap().passed, "{style}: {}", r.check.as_ref().unwrap().table());
        deploy_structure("train_mode", &out);
        as_exact_as_the_export(
            "train_mode",
            &fixture("train_mode", &format!("{style}.onnx")),
            &out,
            d.path(),
            "input",
            true,
        );
    }
}

#[test]
fn case_initializers_listed_as_inputs_are_named_and_fuse_when_frozen() {
    let d = tempfile::tempdir().unwrap();
    for style in ["ts_initin_op11", "ts_initin_op17"] {
        let (r, _) = fuse_to("init_inputs", style, d.path(), &FuseOptions::default()).unwrap();
        assert_eq!(r.fuse.blocks_merged, 0);
        let note = r.fuse.notes.iter().find(|n| n.contains("--freeze-initializers")).expect("a note naming the flag");
        assert!(note.contains("30 initializer(s) are also graph inputs"), "{note}");
        let opts = FuseOptions {
            check: VerifyOptions { freeze_initializers: true, ..Default::default() },
            ..Default::default()
        };
        let (r, out) = fuse_to("init_inputs", style, d.path(), &opts).unwrap();
        assert!(r.check.as_ref().unwrap().passed);
        assert_eq!(r.fuse.blocks_merged, 4, "{}", r.fuse.summary());
        let m = Model::load(&out).unwrap();
        assert_eq!(m.graph().input.len(), 1, "only the data input is left");
        deploy_structure("init_inputs", &out);
        as_exact_as_the_export(
            "init_inputs",
            &fixture("init_inputs", &format!("{style}.onnx")),
            &out,
            d.path(),
            "input",
            false,
        );
    }
}

#[test]
fn case_opset9_a_detector_and_a_deep_net_pass_the_default_check() {
    let d = tempfile::tempdir().unwrap();
    for (model, style) in [
        ("opset9", "ts_fold_op9"),
        ("opset9", "ts_nofold_op9"),
        ("yolo", "ts_fold"),
        ("yolo", "dynamo_ext"),
        ("deep_large", "ts_fold"),
        ("deep_large", "dynamo_ext"),
    ] {
        let (r, out) = fuse_to(model, style, d.path(), &FuseOptions::default()).unwrap();
        let check = r.check.as_ref().unwrap();
        assert!(check.passed, "{model}/{style}: {}", check.table());
        assert_eq!((check.criterion.as_str(), check.evaluation.as_str()), ("noise", "native"));
        deploy_structure(model, &out);
        as_exact_as_the_export(model, &fixture(model, &format!("{style}.onnx")), &out, d.path(), "input", false);
    }
    // deep_large's outputs reach ~1e5: a fixed atol of 1e-4 could not tell its rounding from a fault
    let big = io::<f32>("deep_large", "output").iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(big > 1e4, "{big}");
}

/// Scale the largest |w| of the Conv writing `tensor`'s first weight by `factor`.
fn change_one_weight(src: &Path, dst: &Path, nth_conv: usize, factor: f64) -> String {
    use acnet_onnx::tensor::{from_f64, to_f64, FloatType};
    let mut m = Model::load(src).unwrap();
    let mut proto = m.to_inline().unwrap();
    let g = proto.graph.as_mut().unwrap();
    let conv = g.node.iter().filter(|n| n.op_type() == "Conv").nth(nth_conv).unwrap().clone();
    let t = g.initializer.iter_mut().find(|t| t.name() == conv.input[1]).unwrap();
    let ft = FloatType::from_onnx(t.data_type()).unwrap();
    let mut a = to_f64(t, t.raw_data.as_deref()).unwrap();
    let i = a.iter().enumerate().max_by(|x, y| x.1.abs().total_cmp(&y.1.abs())).unwrap().0;
    a.as_slice_mut().unwrap()[i] *= factor;
    *t = from_f64(t.name(), &a, ft);
    m.proto = proto;
    acnet_onnx::save(&m, dst, acnet_onnx::DataMode::Inline).unwrap();
    conv.name().to_string()
}

#[test]
fn case_one_weight_changed_fails_at_every_scale_and_precision_and_names_the_block() {
    let d = tempfile::tempdir().unwrap();
    // the change: small against float32's rounding, large against bfloat16's
    for (model, style, factor) in [
        ("conv2", "ts_fold", 1.01),
        ("yolo", "ts_fold", 1.01),
        ("deep_large", "ts_fold", 1.01),
        ("half", "ts_fold", 1.5),
        ("mixed", "ts_fold", 3.0),
        ("bfloat16", "ts_fold", 5.0),
    ] {
        let export = fixture(model, &format!("{style}.onnx"));
        let (_, fused) = fuse_to(model, style, d.path(), &FuseOptions::default()).unwrap();
        let bad = d.path().join(format!("{model}-bad.onnx"));
        let conv = change_one_weight(&fused, &bad, 1, factor);
        let r = verify(&export, &bad, &VerifyOptions::default()).unwrap();
        assert!(!r.passed, "{model}: a weight x{factor} passed:\n{}", r.table());
        let div = r.divergence.as_ref().unwrap_or_else(|| panic!("{model}: no divergence named:\n{}", r.table()));
        assert_eq!(div.node, conv, "{model}: {div:?}");
        assert!(r.table().contains("first divergence"), "{}", r.table());
    }
}
