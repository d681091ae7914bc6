//! Real exports described by a manifest: every fixture folder with a `cases.json` (written by the
//! generators of fixtures/: the authors' own blocks, Keras and Paddle networks, ...). Each case
//! is an export and the deploy form its framework or author makes of the same network, exported
//! the same way; `fuse` must reach that deploy structure or better, reproduce the framework's
//! outputs saved in io.npz, and verify with the default check.
//!
//! "Reach": no more Conv, linear (Gemm, MatMul), BatchNormalization, float Add or float Mul nodes
//! than the deploy export, and no more float weights when there are fewer Convs. A Gemm with a
//! bias is a MatMul and an Add in one node, so it counts as both (an exporter writes a Linear
//! either way: tf2onnx as a Gemm at a fixed batch and as MatMul + Add at a dynamic one). Outputs: within
//! `tol` (1e-4 · max(1, max|y|) for float32 models) of the framework's own output in tract; a
//! case without `tol` (half precision) must be as exact as the export itself (the check's
//! golden-output criterion: at most the noise factor times the export's own distance).

mod harness;

use acnet_onnx::proto::{tensor_proto::DataType, ModelProto};
use acnet_onnx::verify::{verify, VerifyOptions};
use acnet_onnx::{fuse, save, DataMode, Model};
use harness::ElemTypes;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The fixture folders with a manifest, sorted.
fn folders() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.path().join("cases.json").is_file().then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v
}

/// Node counts the acceptance compares.
#[derive(Debug, Default, Clone, PartialEq)]
struct Counts(Vec<(&'static str, usize)>, usize, usize);

const OPS: &[&str] = &["Conv", "Gemm", "MatMul", "BatchNormalization", "Add", "Mul"];

/// The counts compared: Conv, linear layers (Gemm + MatMul), BatchNormalization, Add (a
/// Gemm's bias included), Mul.
fn compared(c: &Counts, gemm_biases: usize) -> Vec<(&'static str, usize)> {
    let n = |op: &str| c.0.iter().find(|(o, _)| *o == op).map_or(0, |(_, n)| *n);
    vec![
        ("Conv", n("Conv")),
        ("Gemm+MatMul", n("Gemm") + n("MatMul")),
        ("BatchNormalization", n("BatchNormalization")),
        ("Add (Gemm biases included)", n("Add") + gemm_biases),
        ("Mul", n("Mul")),
    ]
}

impl Counts {
    fn from_manifest(v: &Value) -> Result<Counts, String> {
        let mut c = vec![];
        for op in OPS {
            let n = v[*op].as_u64().ok_or_else(|| format!("deploy counts: no {op} in {v}"))?;
            c.push((*op, n as usize));
        }
        let p = v["float_params"].as_u64().ok_or_else(|| format!("deploy counts: no float_params in {v}"))?;
        Ok(Counts(c, p as usize, 0))
    }

    /// Counted as the generators count: Add and Mul only when their output is a float tensor;
    /// float parameters are float initializers and float Constant values.
    fn of(m: &ModelProto) -> Counts {
        let g = m.graph.as_ref().unwrap();
        let types = ElemTypes::new(g);
        let c = OPS
            .iter()
            .map(|op| {
                let n = g
                    .node
                    .iter()
                    .filter(|n| n.op_type() == *op)
                    .filter(|n| !matches!(*op, "Add" | "Mul") || !types.is_int(&n.output[0]))
                    .count();
                (*op, n)
            })
            .collect();
        let floats = [DataType::Float, DataType::Double, DataType::Float16, DataType::Bfloat16].map(|d| d as i32);
        let numel = |d: &[i64]| d.iter().product::<i64>() as usize;
        let mut p: usize =
            g.initializer.iter().filter(|t| floats.contains(&t.data_type())).map(|t| numel(&t.dims)).sum();
        for n in g.node.iter().filter(|n| n.op_type() == "Constant") {
            for a in n.attribute.iter().filter(|a| a.name() == "value") {
                if let Some(t) = a.t.as_ref().filter(|t| floats.contains(&t.data_type())) {
                    p += numel(&t.dims);
                }
            }
        }
        let gb =
            g.node.iter().filter(|n| n.op_type() == "Gemm" && n.input.get(2).is_some_and(|c| !c.is_empty())).count();
        Counts(c, p, gb)
    }

    /// Why `self` (fused) does not reach `deploy`, if it does not.
    fn short_of(&self, deploy: &Counts) -> Option<String> {
        let mut why = vec![];
        for ((op, a), (_, d)) in compared(self, self.2).iter().zip(&compared(deploy, deploy.2)) {
            if a > d {
                why.push(format!("{op} {a} > {d}"));
            }
        }
        let convs = |c: &Counts| c.0[0].1;
        if convs(self) < convs(deploy) && self.1 > deploy.1 {
            why.push(format!("fewer Convs but float weights {} > {}", self.1, deploy.1));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// One array of an .npz, as stored: numpy dtype code, shape, little-endian bytes.
#[derive(Clone)]
struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Npy {
    fn datum_type(&self) -> Result<DatumType, String> {
        Ok(match self.descr.trim_start_matches(['<', '|', '=']) {
            "f4" => DatumType::F32,
            "f2" => DatumType::F16,
            "f8" => DatumType::F64,
            "i8" => DatumType::I64,
            "i4" => DatumType::I32,
            "b1" => DatumType::Bool,
            "u1" => DatumType::U8,
            d => return Err(format!("npy dtype {d} not handled")),
        })
    }

    fn tensor(&self) -> Result<Tensor, String> {
        unsafe { Tensor::from_raw_dt(self.datum_type()?, &self.shape, &self.data) }.map_err(|e| format!("{e:#}"))
    }

    fn as_f64(&self) -> Result<Vec<f64>, String> {
        let t = self.tensor()?.cast_to::<f64>().map_err(|e| format!("{e:#}"))?.into_owned();
        Ok(t.try_as_plain_ram()
            .map_err(|e| format!("{e:#}"))?
            .as_slice::<f64>()
            .map_err(|e| format!("{e:#}"))?
            .to_vec())
    }

    fn bytes(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!("({})", self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", self.descr);
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(&self.data);
        out
    }
}

fn read_npz(path: &Path) -> Result<HashMap<String, Npy>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for k in 0..z.len() {
        let mut e = z.by_index(k).map_err(|e| e.to_string())?;
        let name = e.name().trim_end_matches(".npy").to_string();
        let mut b = vec![];
        e.read_to_end(&mut b).map_err(|e| e.to_string())?;
        if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
            return Err(format!("{name}: not an npy array"));
        }
        let (hlen, start) = if b[6] == 1 {
            (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
        } else {
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        };
        let h = std::str::from_utf8(&b[start..start + hlen]).map_err(|e| e.to_string())?;
        let field = |key: &str| -> Result<&str, String> {
            let at = h.find(&format!("'{key}':")).ok_or_else(|| format!("{name}: no {key}"))? + key.len() + 3;
            Ok(h[at..].trim_start())
        };
        let descr = field("descr")?.trim_start_matches('\'').split('\'').next().unwrap_or("").to_string();
        if field("fortran_order")?.starts_with("True") {
            return Err(format!("{name}: Fortran order"));
        }
        let s = field("shape")?;
        let s = &s[1..s.find(')').ok_or("shape")?];
        let shape: Vec<usize> =
            s.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| v.parse().unwrap()).collect();
        out.insert(name, Npy { descr, shape, data: b[start + hlen..].to_vec() });
    }
    Ok(out)
}

fn write_npz(path: &Path, arrays: &[(&str, &Npy)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, a) in arrays {
        z.start_file(format!("{name}.npy"), opts).unwrap();
        z.write_all(&a.bytes()).unwrap();
    }
    z.finish().unwrap();
}

/// The model's outputs for `inputs` in tract: the typed, un-optimised plan (what the check runs,
/// with the shapes the file declares forgotten as it does: a `value_info` with a symbolic batch,
/// as paddle2onnx writes, does not unify with an input of a fixed one).
fn run(path: &Path, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let e = |e: TractError| format!("{e:#}");
    let mut m = tract_onnx::onnx().with_ignore_value_info(true).model_for_path(path).map_err(e)?;
    for (k, x) in inputs.iter().enumerate() {
        m = m.with_input_fact(k, InferenceFact::dt_shape(x.datum_type(), x.shape())).map_err(e)?;
    }
    let m = m.into_typed().map_err(e)?.into_runnable().map_err(e)?;
    let out = m.run(inputs.iter().cloned().map(|t| t.into()).collect()).map_err(e)?;
    Ok(out.into_iter().map(|t| t.into_tensor()).collect())
}

fn values(t: &Tensor) -> Result<Vec<f64>, String> {
    let t = t.cast_to::<f64>().map_err(|e| format!("{e:#}"))?.into_owned();
    Ok(t.try_as_plain_ram().map_err(|e| format!("{e:#}"))?.as_slice::<f64>().map_err(|e| format!("{e:#}"))?.to_vec())
}

/// The names of a model's graph inputs (initializers aside) and outputs, in order.
fn signature(m: &ModelProto) -> (Vec<String>, Vec<String>) {
    let g = m.graph.as_ref().unwrap();
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let ins = g.input.iter().map(|v| v.name().to_string()).filter(|n| !inits.contains(n.as_str())).collect();
    (ins, g.output.iter().map(|v| v.name().to_string()).collect())
}

/// One run: the fused model's outputs against the framework's.
fn check_run(
    export: &Path,
    fused: &Path,
    fused_proto: &ModelProto,
    io: &HashMap<String, Npy>,
    run_spec: &Value,
    tmp: &Path,
) -> Result<(), String> {
    let (ins, outs) = signature(fused_proto);
    let key = |map: &Value, name: &str| -> Result<Npy, String> {
        let k = map[name].as_str().ok_or_else(|| format!("run names no array for '{name}'"))?;
        io.get(k).cloned().ok_or_else(|| format!("io.npz has no '{k}'"))
    };
    let inputs: Vec<Npy> = ins.iter().map(|n| key(&run_spec["inputs"], n)).collect::<Result<_, _>>()?;
    let wants: Vec<Npy> = outs.iter().map(|n| key(&run_spec["outputs"], n)).collect::<Result<_, _>>()?;
    match run_spec["tol"].as_f64() {
        Some(tol) => {
            let tensors: Vec<Tensor> = inputs.iter().map(Npy::tensor).collect::<Result<_, _>>()?;
            let got = run(fused, &tensors)?;
            for ((name, g), w) in outs.iter().zip(&got).zip(&wants) {
                if g.shape() != w.shape.as_slice() {
                    return Err(format!("output '{name}': shape {:?} vs {:?}", g.shape(), w.shape));
                }
                let (g, w) = (values(g)?, w.as_f64()?);
                if g.iter().zip(&w).any(|(a, b)| a.is_finite() != b.is_finite()) {
                    return Err(format!("output '{name}': not finite where the framework's is, or the reverse"));
                }
                let diff = g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                if diff > tol {
                    return Err(format!("output '{name}': max abs diff {diff:.3e} from the framework > {tol:.3e}"));
                }
            }
            Ok(())
        }
        None => {
            // as exact as the export: the check against the framework's outputs
            let (i, o) = (tmp.join("inputs.npz"), tmp.join("outputs.npz"));
            write_npz(&i, &ins.iter().map(|s| s.as_str()).zip(&inputs).collect::<Vec<_>>());
            write_npz(&o, &outs.iter().map(|s| s.as_str()).zip(&wants).collect::<Vec<_>>());
            let opts = VerifyOptions { inputs_npz: Some(i), load_outputs: Some(o), ..Default::default() };
            let r = verify(export, fused, &opts).map_err(|e| format!("golden check could not run: {e}"))?;
            if r.passed {
                Ok(())
            } else {
                Err(format!("not as exact as the export:\n{}", r.table()))
            }
        }
    }
}

/// One case: `Err` with every way it falls short.
fn check_case(folder: &str, case: &Value, io: &HashMap<String, Npy>) -> Result<(), String> {
    let dir = fixtures().join(folder);
    let file = case["file"].as_str().ok_or("case without file")?;
    let src = dir.join(file);
    let mut m = Model::load(&src).map_err(|e| e.to_string())?;
    let original = m.proto.clone();
    let report = fuse(&mut m).map_err(|e| format!("fuse: {e}"))?;
    let mut why = vec![];

    // the deploy export counted as the fused model is (the manifest's counts must agree)
    let dfile = case["deploy"]["file"].as_str().ok_or("case without a deploy file")?;
    let deploy = Counts::of(&Model::load(dir.join(dfile)).map_err(|e| e.to_string())?.proto);
    let listed = Counts::from_manifest(&case["deploy"]["counts"])?;
    if (&listed.0, listed.1) != (&deploy.0, deploy.1) {
        return Err(format!("the manifest's deploy counts {listed:?} are not the deploy export's {deploy:?}"));
    }
    if let Some(w) = Counts::of(&m.proto).short_of(&deploy) {
        let refused: Vec<String> =
            report.refused.iter().map(|r| format!("{} at '{}': {}", r.rule, r.node, r.reason)).collect();
        why.push(format!("does not reach deploy: {w} (refused: {refused:?})"));
    }
    why.extend(harness::lost(&original, &m.proto));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fused.onnx");
    save(&m, &out, DataMode::Auto).map_err(|e| e.to_string())?;
    for (k, r) in case["runs"].as_array().ok_or("case without runs")?.iter().enumerate() {
        if let Err(e) = check_run(&src, &out, &m.proto, io, r, tmp.path()) {
            why.push(format!("run {k}: {e}"));
        }
    }
    // the check
    match verify(&src, &out, &VerifyOptions::default()) {
        Ok(r) if r.passed => {}
        Ok(r) => why.push(format!("verify failed:\n{}", r.table())),
        Err(e) => why.push(format!("verify could not run: {e}")),
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// Every case of the folders whose name starts with one of `prefixes` (all when empty).
fn check_all(prefixes: &[&str]) -> (usize, Vec<String>) {
    let (mut n, mut failures) = (0, vec![]);
    for folder in folders().iter().filter(|f| prefixes.is_empty() || prefixes.iter().any(|p| f.starts_with(p))) {
        let dir = fixtures().join(folder);
        let manifest: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        let io = match read_npz(&dir.join("io.npz")) {
            Ok(io) => io,
            Err(e) => {
                failures.push(format!("{folder}: io.npz: {e}"));
                continue;
            }
        };
        for case in manifest["cases"].as_array().expect("cases") {
            n += 1;
            let name = case["file"].as_str().unwrap_or("?");
            if let Err(e) = check_case(folder, case, &io) {
                failures.push(format!("{folder}/{name}: {e}"));
            }
        }
    }
    (n, failures)
}

#[test]
fn case_every_manifest_export_reaches_its_deploy_form_and_the_frameworks_outputs() {
    // ACNET_CASES=prefix1,prefix2 restricts the run to those folders (a development aid)
    let only = std::env::var("ACNET_CASES").unwrap_or_default();
    let prefixes: Vec<&str> = only.split(',').filter(|s| !s.is_empty()).collect();
    let (n, failures) = check_all(&prefixes);
    if prefixes.is_empty() {
        assert!(n > 0, "no fixture with a cases.json");
    }
    assert!(failures.is_empty(), "{} of {n} cases fall short:\n{}", failures.len(), failures.join("\n\n"));
}
