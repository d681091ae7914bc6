//! Bad input: a clear one-line error naming the file, exit code 2, never a panic, never an
//! output file. Each case is checked through the library (`Model::load` + `fuse`) and
//! through the binary (`fuse`, `inspect`, `verify`). A global allocator records the largest
//! allocation, so declared sizes the file does not back are shown never to be allocated.
//! Last, a bounded in-process fuzz: seeded truncations and byte flips of small fixtures through
//! load + fuse + save, asserting no panic and no output file on error.
//!
//! This file holds what the cases share (the allocation tracking, fixtures and model surgery, the
//! contract); the cases are in modules by kind: `not_a_model`, `sizes`, `external_data`,
//! `graphs`, `left_alone` (valid models the rules leave alone), `fuzz`.

#[path = "../support/mod.rs"]
mod support;

mod external_data;
mod fuzz;
mod graphs;
mod left_alone;
mod not_a_model;
mod sizes;

use acnet_onnx::fuse;
use acnet_onnx::proto::{
    tensor_proto::DataType, type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use acnet_onnx::Model;
use acnet_onnx::{save, DataMode};
use prost::Message;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// Largest single allocation, per thread
// ---------------------------------------------------------------------------------------------

struct Tracking;

thread_local! {
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = BIGGEST.try_with(|b| {
        if n > b.get() {
            b.set(n)
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Run `f` and return its result with the largest single allocation it made on this thread.
fn biggest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    BIGGEST.with(|b| b.set(0));
    let r = f();
    (r, BIGGEST.with(|b| b.get()))
}

/// No single allocation while reading a crafted file may pass this (the files are < 1 MB).
const ALLOC_BOUND: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Fixtures and model surgery
// ---------------------------------------------------------------------------------------------

fn fixture(model: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model).join(file)
}

fn read(p: &Path) -> ModelProto {
    ModelProto::decode(&*std::fs::read(p).unwrap()).unwrap()
}

fn write(m: &ModelProto, p: &Path) {
    std::fs::write(p, m.encode_to_vec()).unwrap();
}

fn graph(m: &mut ModelProto) -> &mut GraphProto {
    m.graph.as_mut().unwrap()
}

/// A temporary folder, in RAM when the machine has /dev/shm (saves fsync the disk otherwise).
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn float_input(name: &str, dims: &[i64]) -> ValueInfoProto {
    use acnet_onnx::proto::tensor_shape_proto::{dimension::Value, Dimension};
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) }
}

/// The first initializer stored as raw_data (inline).
fn first_raw(m: &mut ModelProto) -> &mut TensorProto {
    graph(m).initializer.iter_mut().find(|t| t.raw_data.as_ref().is_some_and(|r| r.len() >= 16)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The contract: library error, CLI exit 2 with one line, nothing written
// ---------------------------------------------------------------------------------------------

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(args: &[&std::ffi::OsStr]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_acnet-onnx")).args(args).env("RUST_BACKTRACE", "1").output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn fuse_cli(p: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<&std::ffi::OsStr> = vec!["fuse".as_ref(), p.as_os_str(), "-o".as_ref(), out.as_os_str()];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    cli(&args)
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

fn no_crash(r: &Run, what: &str) {
    for bad in ["panicked", "backtrace", "internal error", "RUST_BACKTRACE"] {
        assert!(!r.stderr.contains(bad), "{what}: {bad} on stderr:\n{}", r.stderr);
    }
}

/// One line on stderr, starting `acnet-onnx: `, naming `file`, containing every word.
fn one_line_naming(r: &Run, file: &str, words: &[&str], what: &str) {
    no_crash(r, what);
    assert_eq!(r.stderr.lines().count(), 1, "{what}: not one line on stderr:\n{}", r.stderr);
    assert!(r.stderr.starts_with("acnet-onnx: "), "{what}: {}", r.stderr);
    assert!(r.stderr.contains(file), "{what}: stderr does not name {file}: {}", r.stderr);
    for w in words {
        assert!(r.stderr.contains(w), "{what}: stderr lacks {w:?}: {}", r.stderr);
    }
}

/// `p` is refused: by the library (load or fuse) with an error naming the file and containing
/// `words`, with no allocation beyond [`ALLOC_BOUND`]; by `fuse`, `inspect` and `verify` (both
/// ways round) with exit code 2 and one line; nothing written anywhere.
fn refused(p: &Path, words: &[&str]) {
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    let (res, biggest) = biggest_alloc(|| Model::load(p).and_then(|mut m| fuse(&mut m).map(|_| m)));
    let e = match res {
        Ok(_) => panic!("{name}: loaded and fused without error"),
        Err(e) => e.to_string(),
    };
    assert!(biggest <= ALLOC_BOUND, "{name}: allocated {biggest} bytes at once ({e})");
    assert!(!e.contains('\n'), "{name}: {e}");
    assert!(e.contains(&name), "{name}: library error does not name the file: {e}");
    for w in words {
        assert!(e.contains(w), "{name}: library error lacks {w:?}: {e}");
    }

    let in_dir = p.parent().unwrap();
    let out_dir = tempdir();
    let out = out_dir.path().join("fused.onnx");
    let before_in = listing(in_dir);
    let good = fixture("conv2", "deploy.onnx");
    let runs: Vec<(&str, Vec<&std::ffi::OsStr>)> = vec![
        ("fuse", vec!["fuse".as_ref(), p.as_os_str(), "-o".as_ref(), out.as_os_str()]),
        (
            "fuse --inline --no-verify",
            vec![
                "fuse".as_ref(),
                p.as_os_str(),
                "-o".as_ref(),
                out.as_os_str(),
                "--inline".as_ref(),
                "--no-verify".as_ref(),
            ],
        ),
        ("inspect", vec!["inspect".as_ref(), p.as_os_str()]),
        ("verify bad good", vec!["verify".as_ref(), p.as_os_str(), good.as_os_str()]),
        ("verify good bad", vec!["verify".as_ref(), good.as_os_str(), p.as_os_str()]),
    ];
    for (what, args) in runs {
        let r = cli(&args);
        let what = format!("{name}: {what}");
        assert_eq!(r.code, 2, "{what}: exit code {}\nstderr: {}\nstdout: {}", r.code, r.stderr, r.stdout);
        one_line_naming(&r, &name, words, &what);
        assert!(listing(out_dir.path()).is_empty(), "{what}: wrote {:?}", listing(out_dir.path()));
        assert_eq!(listing(in_dir), before_in, "{what}: files appeared beside the input");
    }
}
