//! Fuzz target: any bytes as an ONNX model file through load (`Model::decode`), fuse and save.
//! Errors are fine; a panic that escapes the library, an abort or an allocation past libFuzzer's
//! limit is a finding. A panic the library catches itself (`tract::RegionPlan` runs tract under
//! `catch_unwind` and refuses the region when tract panics) is not: libfuzzer-sys's panic hook
//! would abort on it, so the target installs a hook that only records the message, and aborts
//! itself when a panic reaches it.
//! After a failed save nothing may be left in the output folder; after a successful one the
//! saved model must load back.
//!
//! The model "lives" in a scratch folder that holds `dynamo_ext.onnx.data` (conv2's), so the
//! dynamo_ext seeds resolve their external data and mutants exercise external-data checks.
#![no_main]

use acnet_onnx::fuse;
use acnet_onnx::{save, DataMode};
use acnet_onnx::Model;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Scratch {
    model: PathBuf,
    out_dir: PathBuf,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        // replaces libfuzzer-sys's hook (installed before the first input), see the top
        std::panic::set_hook(Box::new(|info| {
            let msg = info.to_string();
            let _ = LAST_PANIC.try_with(|l| *l.borrow_mut() = msg);
        }));
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        // scratch folders of earlier runs whose process is gone
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("acnet-onnx-fuzz-") {
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
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
    if std::panic::catch_unwind(|| one(s, data)).is_err() {
        eprintln!("uncaught panic: {}", LAST_PANIC.with(|l| l.borrow().clone()));
        std::process::abort();
    }
});

fn one(s: &Scratch, data: &[u8]) {
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
}
