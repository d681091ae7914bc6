//! Fuzz target: any bytes as an ONNX model file through load (`Model::decode`), fuse and save.
//! Errors are fine; a panic, an abort or an allocation past libFuzzer's limit is a finding.
//! After a failed save nothing may be left in the output folder; after a successful one the
//! saved model must load back.
//!
//! The model "lives" in a scratch folder that holds `dynamo_ext.onnx.data` (conv2's), so the
//! dynamo_ext seeds resolve their external data and mutants exercise external-data checks.
#![no_main]

use acnet_onnx::fuse::fuse;
use acnet_onnx::io::{save, DataMode};
use acnet_onnx::Model;
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Scratch {
    model: PathBuf,
    out_dir: PathBuf,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("acnet-onnx-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("out")).unwrap();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/conv2/dynamo_ext.onnx.data");
        std::fs::copy(data, dir.join("dynamo_ext.onnx.data")).unwrap();
        Scratch { model: dir.join("model.onnx"), out_dir: dir.join("out") }
    })
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    let Ok(mut model) = Model::decode(bytes::Bytes::copy_from_slice(data), &s.model) else { return };
    if fuse(&mut model).is_err() {
        return;
    }
    let out = s.out_dir.join("fused.onnx");
    match save(&model, &out, DataMode::Auto) {
        Ok(saved) => {
            if let Err(e) = Model::load(&saved.model) {
                panic!("a saved model does not load back: {e}");
            }
            for f in entries(&s.out_dir) {
                std::fs::remove_file(f).unwrap();
            }
        }
        Err(e) => {
            let left = entries(&s.out_dir);
            assert!(left.is_empty(), "save failed ({e}) but left {left:?}");
        }
    }
});
