//! Declared shapes are a hint, never a requirement: every committed export that declares shapes
//! (`value_info`) fuses to the same model with all of them stripped — the rules, the general
//! path and the constant folding work out what they need from the graph itself.

use acnet_onnx::proto::ModelProto;
use acnet_onnx::{fuse, Model};
use prost::Message;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every `.onnx` under fixtures/ (sorted).
fn exports() -> Vec<PathBuf> {
    let mut v = vec![];
    for d in std::fs::read_dir(fixtures()).unwrap().flatten() {
        if !d.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "onnx") {
                v.push(f.path());
            }
        }
    }
    v.sort();
    v
}

fn stripped(p: &ModelProto) -> ModelProto {
    let mut p = p.clone();
    p.graph.as_mut().unwrap().value_info.clear();
    p
}

/// The fused model (value_info stripped, to compare), or the error.
fn fused(mut m: Model) -> Result<Vec<u8>, String> {
    fuse(&mut m).map_err(|e| e.to_string())?;
    Ok(stripped(&m.to_inline().map_err(|e| e.to_string())?).encode_to_vec())
}

#[test]
fn case_every_export_fuses_the_same_without_its_declared_shapes() {
    let mut compared = 0;
    let mut differ = vec![];
    for path in exports() {
        let m = Model::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if m.graph().value_info.is_empty() {
            continue;
        }
        let mut bare = m.clone();
        bare.graph_mut().value_info.clear();
        compared += 1;
        let (a, b) = (fused(m), fused(bare));
        if a != b {
            let rel = path.strip_prefix(fixtures()).unwrap().display().to_string();
            differ.push(match (a, b) {
                (Err(e), Ok(_)) => format!("{rel}: fails with its value_info ({e}), fuses without"),
                (Ok(_), Err(e)) => format!("{rel}: fuses with its value_info, fails without ({e})"),
                (Err(x), Err(y)) => format!("{rel}: fails either way, differently ({x} / {y})"),
                (Ok(_), Ok(_)) => format!("{rel}: another model without its value_info"),
            });
        }
    }
    assert!(compared >= 50, "only {compared} exports declare shapes");
    assert!(differ.is_empty(), "{} of {compared} exports:\n{}", differ.len(), differ.join("\n"));
}
