//! Third-party architectures (the timm families and the hand-built seqconv / dwmult fixtures),
//! every fixture in every export style: `fuse` reaches the library's own deploy structure or
//! better, reproduces the library's PyTorch outputs (saved in io.npz) in tract, and verifies.
//!
//! Data-driven: every fixture folder whose meta.json records `deploy_counts_by_exporter` is
//! checked (made by fixtures/gen_timm.py and fixtures/gen_blocks.py). "Deploy" is the deploy
//! model exported the same way: ts_fold and ts_dynbatch against deploy.onnx's counts,
//! ts_nofold_op11 against the opset-11 export (LayerNormalization is decomposed below opset 17),
//! the dynamo styles against the dynamo export. The fused model may have no more Conv, Gemm,
//! BatchNormalization or float Add nodes than deploy, and when it has fewer Convs, no more float
//! weights. Adds of integers (shape arithmetic in dynamic-batch exports) are not counted.

mod harness;

use acnet_onnx::proto::{tensor_proto::DataType, ModelProto};
use acnet_onnx::verify::{verify, VerifyOptions};
use acnet_onnx::{fuse, save, DataMode, Model};
use harness::ElemTypes;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::NpzReader;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

const STYLES: &[&str] = &["ts_fold", "ts_nofold_op11", "dynamo_ext", "dynamo_inline", "ts_dynbatch"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The fixture folders this test covers, sorted.
fn models() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = std::fs::read_to_string(e.path().join("meta.json")).ok()?;
            meta.contains("deploy_counts_by_exporter").then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v
}

/// The counts the acceptance compares.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    convs: usize,
    gemms: usize,
    bns: usize,
    float_adds: usize,
    float_params: usize,
}

impl Counts {
    fn from_meta(v: &Value) -> Counts {
        let get = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("meta: no {k} in {v}")) as usize;
        Counts {
            convs: get("convs"),
            gemms: get("gemms"),
            bns: get("batchnormalizations"),
            float_adds: get("adds"),
            float_params: get("float_params"),
        }
    }

    /// Counted as gen_common.py's `onnx_counts` does (float initializers of float32/64/16 and
    /// float32 Constant nodes), except that Adds of integers are left out.
    fn of(m: &ModelProto) -> Counts {
        let g = m.graph.as_ref().unwrap();
        let ops = |op: &str| g.node.iter().filter(|n| n.op_type() == op).count();
        let floats = [DataType::Float as i32, DataType::Double as i32, DataType::Float16 as i32];
        let numel = |d: &[i64]| d.iter().product::<i64>() as usize;
        let mut float_params: usize =
            g.initializer.iter().filter(|t| floats.contains(&t.data_type())).map(|t| numel(&t.dims)).sum();
        for n in g.node.iter().filter(|n| n.op_type() == "Constant") {
            for a in n.attribute.iter().filter(|a| a.name() == "value") {
                if let Some(t) = a.t.as_ref().filter(|t| t.data_type() == DataType::Float as i32) {
                    float_params += numel(&t.dims);
                }
            }
        }
        let types = ElemTypes::new(g);
        let float_adds = g.node.iter().filter(|n| n.op_type() == "Add" && !types.is_int(&n.output[0])).count();
        Counts { convs: ops("Conv"), gemms: ops("Gemm"), bns: ops("BatchNormalization"), float_adds, float_params }
    }

    /// Why `self` (fused) does not reach `deploy`, if it does not.
    fn short_of(&self, deploy: &Counts) -> Option<String> {
        let mut why = vec![];
        for (what, a, d) in [
            ("Conv", self.convs, deploy.convs),
            ("Gemm", self.gemms, deploy.gemms),
            ("BatchNormalization", self.bns, deploy.bns),
            ("float Add", self.float_adds, deploy.float_adds),
        ] {
            if a > d {
                why.push(format!("{what} {a} > {d}"));
            }
        }
        if self.convs < deploy.convs && self.float_params > deploy.float_params {
            why.push(format!("fewer Convs but float weights {} > {}", self.float_params, deploy.float_params));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

fn npz(model: &str, key: &str) -> ArrayD<f32> {
    let mut r = NpzReader::new(std::fs::File::open(fixtures().join(model).join("io.npz")).unwrap()).unwrap();
    r.by_name(key).unwrap()
}

/// The model's output for `x` in tract: the typed, un-optimised plan (what the check runs; tract's
/// optimiser fails on some of these exports).
fn run(path: &Path, x: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
    let e = |e: TractError| format!("{e:#}");
    let m = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(e)?
        .with_input_fact(0, f32::fact(x.shape()).into())
        .map_err(e)?
        .into_typed()
        .map_err(e)?
        .into_runnable()
        .map_err(e)?;
    let out = m.run(tvec!(Tensor::from(x.clone()).into())).map_err(e)?;
    let t = out[0].clone().into_tensor();
    let v = t.try_as_plain_ram().map_err(e)?.as_slice::<f32>().map_err(e)?.to_vec();
    Ok(ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap())
}

/// Within 1e-4 x max(1, max|y|) of PyTorch's output.
fn close(got: &ArrayD<f32>, want: &ArrayD<f32>) -> Result<f32, String> {
    if got.shape() != want.shape() {
        return Err(format!("shape {:?} vs PyTorch's {:?}", got.shape(), want.shape()));
    }
    let mag = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if diff <= 1e-4 * mag {
        Ok(diff)
    } else {
        Err(format!("max abs diff {diff:.3e} from PyTorch > 1e-4 x {mag}"))
    }
}

/// One fixture in one style: `Err` with every way it falls short.
fn check(model: &str, style: &str, meta: &Value) -> Result<(), String> {
    let src = fixtures().join(model).join(format!("{style}.onnx"));
    let mut m = Model::load(&src).map_err(|e| e.to_string())?;
    let original = m.proto.clone();
    let report = fuse(&mut m).map_err(|e| e.to_string())?;
    let mut why = vec![];

    let by = &meta["deploy_counts_by_exporter"];
    let deploy = match style {
        "ts_nofold_op11" => &by["ts_fold_op11"],
        "dynamo_ext" | "dynamo_inline" => &by["dynamo"],
        _ => &meta["deploy_counts"],
    };
    let fused = Counts::of(&m.proto);
    if let Some(w) = fused.short_of(&Counts::from_meta(deploy)) {
        let refused: Vec<String> =
            report.refused.iter().map(|r| format!("{} at '{}': {}", r.rule, r.node, r.reason)).collect();
        why.push(format!("does not reach deploy: {w} (refused: {refused:?})"));
    }

    why.extend(harness::lost(&original, &m.proto));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fused.onnx");
    save(&m, &out, DataMode::Auto).map_err(|e| e.to_string())?;
    // PyTorch's numbers, in tract
    match run(&out, &npz(model, "input")).and_then(|y| close(&y, &npz(model, "output"))) {
        Ok(_) => {}
        Err(e) => why.push(format!("vs PyTorch: {e}")),
    }
    if style == "ts_dynbatch" {
        match run(&out, &npz(model, "input_b2")).and_then(|y| close(&y, &npz(model, "output_b2"))) {
            Ok(_) => {}
            Err(e) => why.push(format!("vs PyTorch, batch 2: {e}")),
        }
    }
    // the check
    match verify(&src, &out, &VerifyOptions::default()) {
        Ok(r) if r.passed => {}
        Ok(r) => why.push(format!("verify failed: {:?}", r.outputs.iter().map(|o| o.max_abs_diff).collect::<Vec<_>>())),
        Err(e) => why.push(format!("verify could not run: {e}")),
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

#[test]
fn case_every_third_party_fixture_reaches_its_library_deploy_and_pytorch_outputs() {
    let models = models();
    assert!(models.len() >= 19, "fixtures found: {models:?}");
    let mut failures = vec![];
    for model in &models {
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(model).join("meta.json")).unwrap()).unwrap();
        for style in STYLES {
            if let Err(e) = check(model, style, &meta) {
                failures.push(format!("{model}/{style}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fall short:\n{}",
        failures.len(),
        models.len() * STYLES.len(),
        failures.join("\n")
    );
}
