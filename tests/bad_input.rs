//! Bad input: a clear one-line error naming the file, exit code 2, never a panic, never an
//! output file. Each case is checked through the library (`Model::load` + `fuse`) and
//! through the binary (`fuse`, `inspect`, `verify`). A global allocator records the largest
//! allocation, so declared sizes the file does not back are shown never to be allocated.
//! Last, a bounded in-process fuzz: seeded truncations and byte flips of small fixtures through
//! load + fuse + save, asserting no panic and no output file on error.

mod support;

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

// ---------------------------------------------------------------------------------------------
// Not a model
// ---------------------------------------------------------------------------------------------

#[test]
fn case_empty_file() {
    let d = tempdir();
    let p = d.path().join("empty.onnx");
    std::fs::write(&p, b"").unwrap();
    refused(&p, &["empty file"]);
}

#[test]
fn case_not_protobuf() {
    let d = tempdir();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("text.onnx", b"hello, this is not a model\n".to_vec()),
        ("ff.onnx", vec![0xff; 64]),
        ("json.onnx", br#"{"graph": {"node": []}}"#.to_vec()),
        ("random.onnx", random),
        ("zeros.onnx", vec![0; 1000]),
    ];
    for (name, bytes) in cases {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        refused(&p, &["not an ONNX model"]);
    }
    // a folder, and a file that is not there
    let folder = d.path().join("folder.onnx");
    std::fs::create_dir(&folder).unwrap();
    let r = cli(&["inspect".as_ref(), folder.as_os_str()]);
    assert_eq!(r.code, 2);
    one_line_naming(&r, "folder.onnx", &["folder"], "folder");
    let r = cli(&[
        "fuse".as_ref(),
        d.path().join("missing.onnx").as_os_str(),
        "-o".as_ref(),
        d.path().join("o.onnx").as_os_str(),
    ]);
    assert_eq!(r.code, 2);
    one_line_naming(&r, "missing.onnx", &[], "missing");
    assert!(!d.path().join("o.onnx").exists());
}

/// Every 1/50th of three fixtures (the last two with external data) fails with a clear error.
#[test]
fn case_truncated_models() {
    let d = tempdir();
    for (model, file) in [("conv2", "ts_fold.onnx"), ("qarepvgg", "ts_nofold_op11.onnx"), ("conv2", "dynamo_ext.onnx")]
    {
        let bytes = std::fs::read(fixture(model, file)).unwrap();
        if file == "dynamo_ext.onnx" {
            std::fs::copy(fixture(model, "dynamo_ext.onnx.data"), d.path().join("dynamo_ext.onnx.data")).unwrap();
        }
        for k in 1..50 {
            let cut = bytes.len() * k / 50;
            let p = d.path().join("trunc.onnx");
            std::fs::write(&p, &bytes[..cut]).unwrap();
            refused(&p, &[]);
        }
        let _ = std::fs::remove_file(d.path().join("dynamo_ext.onnx.data"));
    }
    // the external data file truncated instead (the model is whole)
    let p = d.path().join("dynamo_ext.onnx");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx"), &p).unwrap();
    let data = std::fs::read(fixture("conv2", "dynamo_ext.onnx.data")).unwrap();
    for k in [0, 1, 25, 49] {
        std::fs::write(d.path().join("dynamo_ext.onnx.data"), &data[..data.len() * k / 50]).unwrap();
        refused(&p, &["external data", "dynamo_ext.onnx.data"]);
    }
}

#[test]
fn case_protobuf_that_is_not_a_model() {
    let d = tempdir();
    let m = read(&fixture("conv2", "ts_fold.onnx"));
    // an encoded TensorProto, GraphProto and NodeProto
    let t = m.graph.as_ref().unwrap().initializer[0].encode_to_vec();
    std::fs::write(d.path().join("tensor.onnx"), t).unwrap();
    refused(&d.path().join("tensor.onnx"), &["not an ONNX model"]);
    std::fs::write(d.path().join("graph.onnx"), m.graph.as_ref().unwrap().encode_to_vec()).unwrap();
    refused(&d.path().join("graph.onnx"), &["not an ONNX model"]);
    std::fs::write(d.path().join("node.onnx"), m.graph.as_ref().unwrap().node[0].encode_to_vec()).unwrap();
    refused(&d.path().join("node.onnx"), &["not an ONNX model"]);
    // a ModelProto without graph
    let mut no_graph = m.clone();
    no_graph.graph = None;
    write(&no_graph, &d.path().join("no_graph.onnx"));
    refused(&d.path().join("no_graph.onnx"), &["no graph"]);
    // a ModelProto without opset_import / ir_version (what a cut at a field boundary leaves)
    let mut no_opset = m.clone();
    no_opset.opset_import.clear();
    write(&no_opset, &d.path().join("no_opset.onnx"));
    refused(&d.path().join("no_opset.onnx"), &["opset_import"]);
    let mut no_ir = m.clone();
    no_ir.ir_version = None;
    write(&no_ir, &d.path().join("no_ir.onnx"));
    refused(&d.path().join("no_ir.onnx"), &["ir_version"]);
}

// ---------------------------------------------------------------------------------------------
// Tensors whose sizes do not add up
// ---------------------------------------------------------------------------------------------

#[test]
fn case_raw_data_length_mismatch() {
    let d = tempdir();
    for (name, delta) in [("short.onnx", -1i64), ("long.onnx", 3), ("empty_raw.onnx", i64::MIN)] {
        let mut m = read(&fixture("conv2", "ts_fold.onnx"));
        let t = first_raw(&mut m);
        let tname = t.name().to_string();
        let raw = t.raw_data.take().unwrap().to_vec();
        t.raw_data = Some(
            match delta {
                i64::MIN => Vec::new(),
                d if d < 0 => raw[..raw.len() - 1].to_vec(),
                d => [raw, vec![0; d as usize]].concat(),
            }
            .into(),
        );
        let p = d.path().join(name);
        write(&m, &p);
        refused(&p, &[&format!("tensor '{tname}'"), "bytes of data"]);
    }
}

#[test]
fn case_negative_or_overflowing_dims() {
    let d = tempdir();
    let cases: Vec<(&str, Vec<i64>, &str)> = vec![
        ("negative.onnx", vec![-1, 4], "negative"),
        ("overflow.onnx", vec![1 << 40, 1 << 40, 1 << 40], "overflow"),
        // elements fit in usize, bytes do not
        ("overflow_bytes.onnx", vec![1 << 31, 1 << 31, 1 << 2], "overflow"),
        ("min.onnx", vec![i64::MIN], "negative"),
    ];
    for (name, dims, word) in cases {
        let mut m = read(&fixture("conv2", "ts_fold.onnx"));
        first_raw(&mut m).dims = dims;
        let p = d.path().join(name);
        write(&m, &p);
        refused(&p, &[word]);
    }
}

/// Sizes the file cannot hold are refused before anything is allocated by them.
#[test]
fn case_declared_sizes_far_beyond_the_file() {
    let d = tempdir();
    // raw_data: huge dims, a few bytes of data
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    first_raw(&mut m).dims = vec![1 << 30, 1 << 30];
    write(&m, &d.path().join("huge_raw.onnx"));
    refused(&d.path().join("huge_raw.onnx"), &["bytes of data"]);

    // typed fields: float_data with 3 values, dims of 2^40 elements; and no data at all
    for (name, dims, vals) in [
        ("huge_typed.onnx", vec![1i64 << 40], vec![1.0f32, 2.0, 3.0]),
        ("no_data.onnx", vec![1 << 20, 1 << 20], vec![]),
    ] {
        let mut m = read(&fixture("conv2", "ts_fold.onnx"));
        let t = first_raw(&mut m);
        t.raw_data = None;
        t.float_data = vals;
        t.dims = dims;
        write(&m, &d.path().join(name));
        refused(&d.path().join(name), &["values in float_data"]);
    }
    // int64 typed data of the wrong count
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).initializer.push(TensorProto {
        name: Some("extra_int".into()),
        dims: vec![1 << 50],
        data_type: Some(DataType::Int64 as i32),
        int64_data: vec![1, 2],
        ..Default::default()
    });
    write(&m, &d.path().join("huge_int.onnx"));
    refused(&d.path().join("huge_int.onnx"), &["int64_data"]);

    // external data: offsets and lengths far beyond the data file
    let ext = read(&fixture("conv2", "dynamo_ext.onnx"));
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx.data"), d.path().join("dynamo_ext.onnx.data")).unwrap();
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("ext_len.onnx", "length", (1u64 << 60).to_string(), "shorter than declared"),
        ("ext_off.onnx", "offset", (1u64 << 60).to_string(), "shorter than declared"),
        ("ext_max.onnx", "length", u64::MAX.to_string(), "shorter than declared"),
        ("ext_neg.onnx", "offset", "-4".into(), "not a byte count"),
        ("ext_word.onnx", "length", "lots".into(), "not a byte count"),
        ("ext_huge.onnx", "length", "99999999999999999999999999".into(), "not a byte count"),
    ];
    for (name, key, value, word) in cases {
        let mut m = ext.clone();
        let t = graph(&mut m).initializer.iter_mut().find(|t| !t.external_data.is_empty()).unwrap();
        t.external_data.retain(|e| e.key() != key);
        t.external_data.push(kv(key, &value));
        write(&m, &d.path().join(name));
        refused(&d.path().join(name), &["external data", word]);
    }
}

/// A graph input declaring a shape of 2^45 elements: the equivalence check would allocate it
/// (an allocation failure aborts, it is no error), so the check refuses, one line, exit 2.
/// The model itself is fine: `--no-verify` fuses it, and `--input-shape` checks it.
#[test]
fn case_declared_input_shape_too_big_to_check() {
    use acnet_onnx::proto::tensor_shape_proto::dimension::Value;
    let d = tempdir();
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let Some(type_proto::Value::TensorType(t)) = graph(&mut m).input[0].r#type.as_mut().unwrap().value.as_mut() else {
        panic!()
    };
    for (dim, v) in t.shape.as_mut().unwrap().dim.iter_mut().zip([1i64 << 20, 3, 1 << 12, 1 << 12]) {
        dim.value = Some(Value::DimValue(v));
    }
    let p = d.path().join("huge_input.onnx");
    write(&m, &p);
    let out_dir = tempdir();
    let out = out_dir.path().join("fused.onnx");
    let r = fuse_cli(&p, &out, &[]);
    assert_eq!(r.code, 2, "{}\n{}", r.stderr, r.stdout);
    one_line_naming(&r, "huge_input.onnx", &["too many to check", "--input-shape", "--no-verify"], "fuse huge input");
    assert!(listing(out_dir.path()).is_empty());
    let r = cli(&["verify".as_ref(), p.as_os_str(), p.as_os_str()]);
    assert_eq!(r.code, 2, "{}\n{}", r.stderr, r.stdout);
    one_line_naming(&r, "huge_input.onnx", &["too many to check"], "verify huge input");
    let r = fuse_cli(&p, &out, &["--no-verify"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    let r = fuse_cli(&p, &out, &["--input-shape", "input:1,3,32,32"]);
    no_crash(&r, "--input-shape");
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    assert!(r.stdout.contains("EQUIVALENT"), "{}", r.stdout);
}

/// A DBB seed (a real dynamo export, `fuzz/seeds/`) whose zero Pad pads the batch axis by 2^28
/// (a cargo-fuzz finding). Evaluating the block in tract (the general `affine_region` path) or
/// running the model for the check would allocate ~146 GB, and a failed allocation aborts: the
/// region is refused for its size (from the Pad's constant amounts, before tract is handed it),
/// the fuse goes on, and the check refuses in one line.
#[test]
fn case_a_pad_of_absurd_size_is_refused_before_anything_allocates_it() {
    let d = tempdir();
    let mut m = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/dbb_dynamo_inline.onnx"));
    let g = graph(&mut m);
    let pads: Vec<String> = g.node.iter().filter(|n| n.op_type() == "Pad").map(|n| n.input[1].clone()).collect();
    assert!(!pads.is_empty());
    for t in g.initializer.iter_mut().filter(|t| pads.contains(&t.name().to_string())) {
        let mut v: Vec<i64> = t.raw_data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(v.len(), 8, "{}", t.name());
        v[0] = 1 << 28;
        t.raw_data = Some(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into());
    }
    g.value_info.clear(); // the exporter's shapes would contradict the batch padding
    let p = d.path().join("absurd_pad.onnx");
    write(&m, &p);

    let mut model = Model::load(&p).unwrap();
    let r = fuse(&mut model).unwrap();
    assert!(
        r.refused.iter().any(|f| f.rule == "affine_region"
            && f.reason
                .to_string()
                .contains("inside the region: Pad 'node_pad' pads by at least 1073741824 elements, too big to run")),
        "{:?}",
        r.refused
    );
    let out_dir = tempdir();
    let out = out_dir.path().join("fused.onnx");
    let r = fuse_cli(&p, &out, &["--no-verify"]);
    no_crash(&r, "fuse --no-verify");
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    let r = cli(&["verify".as_ref(), p.as_os_str(), out.as_os_str()]);
    assert_eq!(r.code, 2, "{}\n{}", r.stderr, r.stdout);
    one_line_naming(&r, "absurd_pad.onnx", &["too big to run"], "verify absurd pad");
}

/// A Transpose whose perm repeats an axis (found by cargo-fuzz: one byte changed in a DBB export,
/// perm [1,1,2,0]). tract's Transpose loops for ever on it, allocating until memory runs out, so
/// the model is refused as invalid when it is loaded, before tract sees it: by fuse, verify and
/// inspect alike, in one line, exit code 2, nothing written.
#[test]
fn case_transpose_perm_that_is_not_a_permutation() {
    let d = tempdir();
    let mut m = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/dbb_dynamo_inline.onnx"));
    let g = graph(&mut m);
    let t = g.node.iter_mut().find(|n| n.op_type() == "Transpose").expect("the seed has a Transpose");
    let perm = t.attribute.iter_mut().find(|a| a.name() == "perm").unwrap();
    assert!(perm.ints.len() >= 2);
    perm.ints[0] = perm.ints[1];
    let p = d.path().join("bad_perm.onnx");
    write(&m, &p);
    let e = Model::load(&p).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("not a permutation"), "{e}");
    let out = d.path().join("fused.onnx");
    for (what, r) in [
        ("fuse", fuse_cli(&p, &out, &[])),
        ("fuse --no-verify", fuse_cli(&p, &out, &["--no-verify"])),
        ("verify", cli(&["verify".as_ref(), p.as_os_str(), p.as_os_str()])),
        ("inspect", cli(&["inspect".as_ref(), p.as_os_str()])),
    ] {
        assert_eq!(r.code, 2, "{what}: {}\n{}", r.stderr, r.stdout);
        one_line_naming(&r, "bad_perm.onnx", &["not a permutation"], what);
    }
    assert!(!out.exists(), "nothing written");
}

/// Every input cargo-fuzz found a problem with (`fuzz/regressions/`), through load + fuse + save
/// in process: an error or a refusal, no panic, and no allocation past [`ALLOC_BOUND`] (a
/// Transpose perm repeating an axis made tract's Transpose grow a vector without end; a
/// crop-path block turned by one byte into a region whose recovered kernel would have held
/// ~39 TB was allocated before its taps were known to be visible; a DBB export whose constant
/// Pad amounts became 8·10^15, which tract evaluates while typing the region: 2·10^18 bytes; a
/// DBB export whose Pad grew the batch axis to 32,661, evaluated before its shape was checked; an
/// ACNet crop path whose Slice starts became an empty tensor of 8 axes, which the sequential
/// rule read as the kernel of a Conv before the Conv: an index past the second Conv's axes; an
/// ACNet crop path whose Slice steps became an empty tensor, read at the first axis's index).
#[test]
fn case_fuzz_findings_are_refused_without_a_large_allocation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        let (outcome, biggest) = biggest_alloc(|| {
            let mut m = Model::load(&f).map_err(|e| e.to_string())?;
            let r = fuse(&mut m).map_err(|e| e.to_string())?;
            let out = tempdir();
            save(&m, &out.path().join("out.onnx"), DataMode::Inline).map_err(|e| e.to_string())?;
            Ok::<_, String>(r)
        });
        assert!(biggest < ALLOC_BOUND, "{}: an allocation of {biggest} bytes", f.display());
        match f.file_name().unwrap().to_str().unwrap() {
            "transpose_perm_repeats_an_axis.onnx" => {
                assert!(outcome.as_ref().is_err_and(|e| e.contains("not a permutation")), "{outcome:?}")
            }
            "region_kernel_of_absurd_size.onnx" => {
                let r = outcome.unwrap();
                assert!(r.rewrites.is_empty(), "{}", r.summary());
                assert!(r.refused.iter().any(|x| x.rule == "affine_region"), "{}", r.summary());
            }
            "constant_pad_of_absurd_amounts.onnx" => {
                let r = outcome.unwrap();
                assert!(
                    r.refused.iter().any(|x| x.rule == "affine_region"
                        && x.reason.to_string().contains("Pad 'node_pad' pads by at least")
                        && x.reason.to_string().contains("too big to run")),
                    "{}",
                    r.summary()
                );
                // the check does not hand it to tract either: one line, exit 2
                let c = cli(&["verify".as_ref(), f.as_os_str(), f.as_os_str()]);
                assert_eq!(c.code, 2, "{}\n{}", c.stderr, c.stdout);
                one_line_naming(
                    &c,
                    "constant_pad_of_absurd_amounts.onnx",
                    &["too big to run"],
                    "verify absurd constant pad",
                );
            }
            "region_output_of_a_padded_batch.onnx" => {
                // a Pad of the batch axis makes the region's output 32,661 times the Conv's: refused
                // from its typed shape, before the region is evaluated (which took ~1 s, 373 MB)
                let r = outcome.unwrap();
                assert!(
                    r.refused.iter().any(|x| x.rule == "affine_region"
                        && x.reason
                            .to_string()
                            .contains("the region's output [32661, 2, 6, 6] is not the Conv's output")),
                    "{}",
                    r.summary()
                );
            }
            "slice_starts_of_eight_axes_before_a_conv.onnx" | "slice_steps_of_no_values.onnx" => {
                // starts that became an empty tensor of 8 axes: the sequential rule looked at the
                // Slice (not a Conv) before a Conv as a Conv and indexed its 6 "kernel" axes in the
                // second Conv's 2; steps of 0 values for starts of 1: the step was read at index 0.
                // Both panicked; now the block is left as it is, with what is wrong
                let r = outcome.unwrap();
                assert!(r.rewrites.is_empty(), "{}", r.summary());
                assert!(
                    r.refused.iter().any(|x| x.rule == "merge_branches"
                        && x.reason.to_string().contains("Slice parameters of different lengths")),
                    "{}",
                    r.summary()
                );
            }
            other => panic!("{other}: say what it must give"),
        }
    }
}

/// A Pad whose amounts are computed (here `Add` of two constants, as TorchScript's shape
/// arithmetic computes them) and negative on one side (a crop: valid ONNX). tract-onnx casts
/// the amounts to `usize` and then writes out of bounds, so neither the general path nor the
/// check may run it: the region is refused, and `verify` says why in one line (exit 2).
#[test]
fn case_computed_negative_pad_is_not_run_in_tract() {
    use support::{attr_string, Builder, ConvAttrs};
    let mut b = Builder::new(3, 6, 6);
    let (a, _, _) = b.conv_rand("a", "x", 3, 3, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let p1 = b.initializer_i64("p1", &[0, 0, -2, -2, 0, 0, 0, 0]);
    let p2 = b.initializer_i64("p2", &[0, 0, 1, 1, 0, 0, 1, 1]);
    let pads = b.node("Add", "pads", &[&p1, &p2], &[], vec![]);
    let padded = b.node("Pad", "crop_pad", &["x", &pads], &[], vec![attr_string("mode", "constant")]);
    let (c, _, _) = b.conv_rand("c", &padded, 3, 3, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let y = b.add("sum", &a, &c);
    b.output(&y);
    let mut m = b.build();
    let r = fuse(&mut m).unwrap();
    assert!(r.rewrites.is_empty(), "{:?}", r.rewrites);
    assert!(
        r.refused
            .iter()
            .any(|f| f.rule == "affine_region" && f.reason.to_string().contains("Pad 'crop_pad' has negative amounts")),
        "{:?}",
        r.refused
    );
    let d = tempdir();
    let p = d.path().join("computed_crop.onnx");
    write(&b.model(), &p);
    let r = cli(&["verify".as_ref(), p.as_os_str(), p.as_os_str()]);
    assert_eq!(r.code, 2, "{}\n{}", r.stderr, r.stdout);
    one_line_naming(&r, "computed_crop.onnx", &["negative amounts", "crop_pad"], "verify computed negative pad");
}

// ---------------------------------------------------------------------------------------------
// External data
// ---------------------------------------------------------------------------------------------

#[test]
fn case_external_data_missing_or_short() {
    let d = tempdir();
    let p = d.path().join("dynamo_ext.onnx");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx"), &p).unwrap();
    refused(&p, &["external data", "dynamo_ext.onnx.data"]);
    // shorter than declared
    let data = std::fs::read(fixture("conv2", "dynamo_ext.onnx.data")).unwrap();
    std::fs::write(d.path().join("dynamo_ext.onnx.data"), &data[..data.len() - 1]).unwrap();
    refused(&p, &["external data", "shorter than declared"]);
    // a folder where the data file should be
    std::fs::remove_file(d.path().join("dynamo_ext.onnx.data")).unwrap();
    std::fs::create_dir(d.path().join("dynamo_ext.onnx.data")).unwrap();
    refused(&p, &["external data", "folder"]);
}

/// A location that is absolute or climbs out of the model's folder is refused as unsafe, even
/// when the file it names exists and holds the right bytes.
#[test]
fn case_external_location_escaping_the_folder() {
    let d = tempdir();
    let sub = d.path().join("models");
    std::fs::create_dir(&sub).unwrap();
    let data = fixture("conv2", "dynamo_ext.onnx.data");
    std::fs::copy(&data, d.path().join("weights.data")).unwrap();
    let abs = d.path().join("weights.data").to_string_lossy().into_owned();
    for (name, loc) in [
        ("abs.onnx", abs.as_str()),
        ("abs_fixture.onnx", data.to_str().unwrap()),
        ("dotdot.onnx", "../weights.data"),
        ("inner_dotdot.onnx", "x/../../weights.data"),
        ("etc.onnx", "/etc/passwd"),
        ("empty_loc.onnx", ""),
    ] {
        let mut m = read(&fixture("conv2", "dynamo_ext.onnx"));
        for t in graph(&mut m).initializer.iter_mut() {
            for e in t.external_data.iter_mut().filter(|e| e.key() == "location") {
                e.value = Some(loc.to_string());
            }
        }
        let p = sub.join(name);
        write(&m, &p);
        refused(&p, &["unsafe"]);
    }
}

/// External data behind a link to a file outside the model's folder is refused in every
/// command, as onnx does since CVE-2024-27318 (the link's target is read nowhere).
#[cfg(unix)]
#[test]
fn case_external_data_linked_outside_the_folder_is_refused() {
    let d = tempdir();
    let (inside, outside) = (d.path().join("model"), d.path().join("elsewhere"));
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // the same bytes as the real data file, so only the link's place is wrong
    let secret = outside.join("secret.bin");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx.data"), &secret).unwrap();
    let p = inside.join("dynamo_ext.onnx");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx"), &p).unwrap();
    std::os::unix::fs::symlink(&secret, inside.join("dynamo_ext.onnx.data")).unwrap();
    refused(&p, &["resolves outside the model's folder", "unsafe"]);
    // a link that stays inside the folder is fine
    std::fs::remove_file(inside.join("dynamo_ext.onnx.data")).unwrap();
    std::fs::copy(&secret, inside.join("real.data")).unwrap();
    std::os::unix::fs::symlink("real.data", inside.join("dynamo_ext.onnx.data")).unwrap();
    assert!(Model::load(&p).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Graphs that are not well formed
// ---------------------------------------------------------------------------------------------

#[test]
fn case_node_input_nothing_produces() {
    let d = tempdir();
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).node[3].input[0] = "nowhere".into();
    let p = d.path().join("dangling.onnx");
    write(&m, &p);
    refused(&p, &["nowhere", "nothing produces"]);
    // a graph output nothing produces
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).output[0].name = Some("ghost".into());
    let p = d.path().join("ghost_output.onnx");
    write(&m, &p);
    refused(&p, &["ghost", "not produced"]);
}

#[test]
fn case_cycles() {
    let d = tempdir();
    // node k reads the output of node k+1, which (transitively) reads node k
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let g = graph(&mut m);
    let (k, next) = (0..g.node.len() - 1)
        .find_map(|k| {
            let out = g.node[k].output[0].clone();
            g.node.iter().position(|n| n.input.contains(&out)).map(|j| (k, j))
        })
        .unwrap();
    let back = g.node[next].output[0].clone();
    g.node[k].input[0] = back;
    let p = d.path().join("cycle.onnx");
    write(&m, &p);
    refused(&p, &["cycle"]);
    // a node reading its own output
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let g = graph(&mut m);
    let own = g.node[2].output[0].clone();
    g.node[2].input[0] = own;
    let p = d.path().join("self_loop.onnx");
    write(&m, &p);
    refused(&p, &["cycle"]);
    // no cycle, but nodes out of order (ONNX requires topological order)
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).node.reverse();
    let p = d.path().join("reversed.onnx");
    write(&m, &p);
    refused(&p, &["topological order"]);
}

#[test]
fn case_duplicate_tensor_names() {
    let d = tempdir();
    let base = read(&fixture("conv2", "ts_fold.onnx"));
    let mut cases: Vec<(&str, ModelProto)> = vec![];
    // two initializers of one name
    let mut m = base.clone();
    let t = graph(&mut m).initializer[0].clone();
    graph(&mut m).initializer.push(t);
    cases.push(("dup_init.onnx", m.clone()));
    // ... also both listed as graph inputs
    let name = graph(&mut m).initializer[0].name().to_string();
    graph(&mut m).input.push(float_input(&name, &[1]));
    cases.push(("dup_init_as_input.onnx", m));
    // two nodes writing one tensor
    let mut m = base.clone();
    let g = graph(&mut m);
    let o = g.node[1].output[0].clone();
    g.node[4].output[0] = o;
    cases.push(("dup_output.onnx", m));
    // a node writing a graph input / an initializer
    let mut m = base.clone();
    let g = graph(&mut m);
    g.node[1].output[0] = g.input[0].name().to_string();
    cases.push(("output_is_input.onnx", m));
    let mut m = base.clone();
    let g = graph(&mut m);
    g.node[1].output[0] = g.initializer[0].name().to_string();
    cases.push(("output_is_init.onnx", m));
    // the same graph input twice
    let mut m = base.clone();
    let i = graph(&mut m).input[0].clone();
    graph(&mut m).input.push(i);
    cases.push(("dup_input.onnx", m));
    for (name, m) in cases {
        let p = d.path().join(name);
        write(&m, &p);
        refused(&p, &["duplicate"]);
    }
}

/// Nodes of the operators the rules read, without the inputs their schema requires (or without
/// an output): refused on load, before any rule indexes into them.
#[test]
fn case_nodes_missing_required_inputs() {
    let d = tempdir();
    let base = read(&fixture("conv2", "ts_nofold_op11.onnx"));
    let first =
        |m: &mut ModelProto, op: &str| -> usize { graph(m).node.iter().position(|n| n.op_type() == op).unwrap() };
    let mut cases: Vec<(&str, ModelProto, &str)> = vec![];
    let mut m = base.clone();
    let i = first(&mut m, "Conv");
    graph(&mut m).node[i].input.truncate(1);
    cases.push(("conv_no_weight.onnx", m, "has 1 input(s)"));
    let mut m = base.clone();
    let i = first(&mut m, "Conv");
    graph(&mut m).node[i].input[0] = String::new();
    cases.push(("conv_empty_x.onnx", m, "has no input 0"));
    let mut m = base.clone();
    let i = first(&mut m, "BatchNormalization");
    graph(&mut m).node[i].input.truncate(4);
    cases.push(("bn_four_inputs.onnx", m, "has 4 input(s)"));
    let mut m = base.clone();
    let i = first(&mut m, "Add");
    graph(&mut m).node[i].input.push("x".into());
    cases.push(("add_three_inputs.onnx", m, "has 3 input(s)"));
    let mut m = base.clone();
    let i = first(&mut m, "BatchNormalization");
    graph(&mut m).node[i].output.clear();
    cases.push(("bn_no_output.onnx", m, "no output"));
    // Pad takes its amounts as an input from opset 11
    let mut m = base.clone();
    let x = graph(&mut m).input[0].name().to_string();
    let conv = first(&mut m, "Conv");
    let g = graph(&mut m);
    g.node[conv].input[0] = "padded".into();
    g.node.insert(
        conv,
        NodeProto {
            input: vec![x],
            output: vec!["padded".into()],
            op_type: Some("Pad".into()),
            name: Some("pad".into()),
            ..Default::default()
        },
    );
    cases.push(("pad_one_input.onnx", m, "at opset 11 it takes 2 to 4"));
    for (name, m, word) in cases {
        let p = d.path().join(name);
        write(&m, &p);
        refused(&p, &[word]);
    }
}

// ---------------------------------------------------------------------------------------------
// Valid models the rules must leave alone (reported), and operators tract lacks
// ---------------------------------------------------------------------------------------------

/// Names of the Conv weights of `m`.
fn conv_weights(m: &ModelProto) -> Vec<String> {
    m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type() == "Conv").map(|n| n.input[1].clone()).collect()
}

fn fuse_cli(p: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<&std::ffi::OsStr> = vec!["fuse".as_ref(), p.as_os_str(), "-o".as_ref(), out.as_os_str()];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    cli(&args)
}

/// Conv weights listed as graph inputs (a runtime may override them): not constants, so
/// nothing that reads them is fused; the refusals say why; exit 0.
#[test]
fn case_conv_weights_that_are_graph_inputs() {
    let d = tempdir();
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let weights = conv_weights(&m);
    let g = graph(&mut m);
    for w in &weights {
        let dims = g.initializer.iter().find(|t| t.name() == w).unwrap().dims.clone();
        g.input.push(float_input(w, &dims));
    }
    let p = d.path().join("weights_as_inputs.onnx");
    write(&m, &p);

    let mut model = Model::load(&p).unwrap();
    let before = model.proto.clone();
    let rep = fuse(&mut model).unwrap();
    assert_eq!(rep.blocks_merged + rep.bns_folded, 0, "{}", rep.summary());
    assert!(!rep.refused.is_empty());
    assert!(rep.refused.iter().all(|r| r.reason.to_string().contains("graph input")), "{}", rep.summary());
    assert_eq!(model.proto, before);

    let out = d.path().join("out.onnx");
    let r = fuse_cli(&p, &out, &[]);
    no_crash(&r, "weights as inputs");
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    assert!(r.stdout.contains("refused") && r.stdout.contains("graph input"), "{}", r.stdout);
    assert!(out.exists());
}

/// int8 Conv weights: the kernel maths handles float types only; not fused, reported, exit 0
/// (tract refuses such a Conv: the check cuts the models there, and finds them the same).
#[test]
fn case_weights_of_a_dtype_the_kernel_maths_does_not_handle() {
    let d = tempdir();
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let weights = conv_weights(&m);
    for t in graph(&mut m).initializer.iter_mut().filter(|t| weights.contains(&t.name().to_string())) {
        let n: usize = t.dims.iter().product::<i64>() as usize;
        t.data_type = Some(DataType::Int8 as i32);
        t.raw_data = Some(vec![1u8; n].into());
        t.float_data.clear();
    }
    let p = d.path().join("int8_weights.onnx");
    write(&m, &p);

    let mut model = Model::load(&p).unwrap();
    let rep = fuse(&mut model).unwrap();
    assert_eq!(rep.blocks_merged + rep.bns_folded, 0, "{}", rep.summary());
    assert!(!rep.refused.is_empty());
    assert!(rep.refused.iter().all(|r| r.reason.to_string().contains("data type")), "{}", rep.summary());

    // int8 weights in a float Conv are not valid ONNX: tract refuses to type such a Conv, so
    // the check cuts the models at it; nothing was rewritten, the parts are the same: exit 0
    let out = d.path().join("out.onnx");
    let r = fuse_cli(&p, &out, &[]);
    no_crash(&r, "int8 verified");
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    assert!(r.stdout.contains("refused") && r.stdout.contains("data type"), "{}", r.stdout);
    assert!(
        r.stdout.contains("cut at Conv") && r.stdout.contains("I8") && r.stdout.contains("the same in both models"),
        "{}",
        r.stdout
    );
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    // without the check: written unchanged, the refusals reported, exit 0
    let r = fuse_cli(&p, &out, &["--no-verify"]);
    no_crash(&r, "int8");
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    assert!(r.stdout.contains("refused") && r.stdout.contains("data type"), "{}", r.stdout);
    assert!(out.exists());
}

/// A model with an operator tract cannot run (a custom domain's, or one tract has no
/// implementation of) at the end: the check is made around it, `fuse` writes the rewrite
/// checked (exit 0, no warning); `verify` of the fused model passes, and of a model where it
/// replaced the reference's node fails naming it (exit 1).
#[test]
fn case_operator_tract_cannot_run() {
    let d = tempdir();
    for (name, domain, op) in [("custom.onnx", "com.example", "Frobnicate"), ("bernoulli.onnx", "", "Bernoulli")] {
        let mut m = read(&fixture("conv2", "ts_nofold_op11.onnx"));
        if op == "Bernoulli" {
            // Bernoulli needs opset 15
            for o in m.opset_import.iter_mut().filter(|o| o.domain().is_empty()) {
                o.version = Some(15);
            }
        }
        if !domain.is_empty() {
            m.opset_import.push(OperatorSetIdProto { domain: Some(domain.into()), version: Some(1) });
        }
        let g = graph(&mut m);
        let out = g.output[0].name().to_string();
        let producer = g.node.iter_mut().find(|n| n.output.contains(&out)).unwrap();
        producer.output[0] = "pre_custom".into();
        g.node.push(NodeProto {
            input: vec!["pre_custom".into()],
            output: vec![out],
            name: Some("the_custom_node".into()),
            op_type: Some(op.into()),
            domain: Some(domain.into()),
            ..Default::default()
        });
        let p = d.path().join(name);
        write(&m, &p);

        let fused = d.path().join(format!("fused_{name}"));
        let r = fuse_cli(&p, &fused, &[]);
        no_crash(&r, name);
        assert_eq!(r.code, 0, "{name}: {}\n{}", r.stderr, r.stdout);
        assert!(r.stderr.is_empty(), "{name}: {}", r.stderr);
        assert!(r.stdout.contains(&format!("cut at {op} 'the_custom_node'")), "{name}: {}", r.stdout);
        assert!(r.stdout.contains("pre_custom") && r.stdout.contains("EQUIVALENT"), "{name}: {}", r.stdout);
        assert!(r.stdout.contains("merged") && fused.exists(), "{}", r.stdout);
        let back = Model::load(&fused).unwrap();
        assert!(back.proto.graph.as_ref().unwrap().node.iter().any(|n| n.op_type() == op));
        assert!(back.proto.graph.as_ref().unwrap().node.len() < m.graph.as_ref().unwrap().node.len());

        let r = cli(&["verify".as_ref(), p.as_os_str(), fused.as_os_str()]);
        assert_eq!(r.code, 0, "{name}: {}\n{}", r.stderr, r.stdout);
        let r = cli(&["verify".as_ref(), fixture("conv2", "ts_nofold_op11.onnx").as_os_str(), p.as_os_str()]);
        no_crash(&r, name);
        assert_eq!(r.code, 1, "{name}: {}\n{}", r.stderr, r.stdout);
        assert!(r.stdout.contains(op) && r.stdout.contains("NOT EQUIVALENT"), "{name}: {}", r.stdout);
    }
}

// ---------------------------------------------------------------------------------------------
// In-test fuzz
// ---------------------------------------------------------------------------------------------

/// Where failing mutants are kept for a look after the test: target/fuzz-failures.
fn keep_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("fuzz-failures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutant through load + fuse + save: no panic; on error no output file; on success the
/// output loads back. `Ok(true)` when the mutant loaded.
fn run_mutant(dir: &Path, bytes: &[u8], out_dir: &Path) -> Result<bool, String> {
    let p = dir.join("mutant.onnx");
    std::fs::write(&p, bytes).unwrap();
    let out = out_dir.join("out.onnx");
    let loaded = Cell::new(false);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> acnet_onnx::Result<()> {
        let mut m = Model::load(&p)?;
        loaded.set(true);
        fuse(&mut m)?;
        save(&m, &out, DataMode::Auto)?;
        Ok(())
    }));
    match res {
        Err(_) => Err("panicked".into()),
        Ok(Err(e)) => {
            let s = e.to_string();
            if s.contains('\n') {
                return Err(format!("error of several lines: {s}"));
            }
            let left = listing(out_dir);
            if !left.is_empty() {
                return Err(format!("error {s}, but wrote {left:?}"));
            }
            Ok(loaded.get())
        }
        Ok(Ok(())) => {
            Model::load(&out).map_err(|e| format!("saved a model that does not load: {e}"))?;
            for f in listing(out_dir) {
                std::fs::remove_file(out_dir.join(f)).unwrap();
            }
            Ok(true)
        }
    }
}

/// Seeded truncations and byte flips of three small fixtures (one with external data, whose
/// data file sits beside the mutant) through load + fuse + save: a few thousand runs.
#[test]
fn case_in_test_fuzz_truncations_and_byte_flips() {
    let start = std::time::Instant::now();
    let d = tempdir();
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let seeds: Vec<(Vec<u8>, bool)> = vec![
        (std::fs::read(fixture("conv2", "ts_fold.onnx")).unwrap(), false),
        (std::fs::read(fixture("qarepvgg", "ts_nofold_op11.onnx")).unwrap(), false),
        (std::fs::read(fixture("conv2", "dynamo_ext.onnx")).unwrap(), true),
    ];
    // the external fixture's tensors name dynamo_ext.onnx.data: put it beside the mutant
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx.data"), d.path().join("dynamo_ext.onnx.data")).unwrap();
    let mut rng = Rng(0x5eed0face7);
    let mut failures = vec![];
    let (mut runs, mut loaded) = (0, 0);
    for (seed, _) in &seeds {
        for _ in 0..1500 {
            let mut b = seed.clone();
            match rng.below(4) {
                // truncate anywhere
                0 => b.truncate(rng.below(b.len())),
                // flip 1-4 bytes, half the time within the first tenth (graph structure)
                1 | 2 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = if rng.below(2) == 0 { rng.below(b.len() / 10) } else { rng.below(b.len()) };
                        b[i] ^= 1 << rng.below(8);
                    }
                }
                // overwrite a byte with an interesting value, or cut out a range
                _ => {
                    let i = rng.below(b.len());
                    if rng.below(2) == 0 {
                        b[i] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.below(5)];
                    } else {
                        let j = (i + 1 + rng.below(64)).min(b.len());
                        b.drain(i..j);
                    }
                }
            }
            runs += 1;
            match run_mutant(d.path(), &b, &out_dir) {
                Ok(true) => loaded += 1,
                Ok(false) => {}
                Err(e) => {
                    let keep = keep_dir().join(format!("mutant_{runs}.onnx"));
                    std::fs::write(&keep, &b).unwrap();
                    failures.push(format!("run {runs}: {e} (kept as {})", keep.display()));
                }
            }
        }
    }
    eprintln!("in-test fuzz: {runs} runs, {loaded} mutants loaded, {:.1}s", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} of {runs} mutants failed:\n{}", failures.len(), failures.join("\n"));
    assert!(loaded > 100, "too few mutants loaded ({loaded}): the fuzz does not reach fuse");
}

/// A structural mutant: valid protobuf, consistent tensors, but nodes rewired and attributes
/// set to extreme values, so the rules see every odd shape of Conv / BN / Pad / Slice / Add.
fn structural_mutant(base: &ModelProto, rng: &mut Rng) -> ModelProto {
    use acnet_onnx::proto::AttributeProto;
    const OPS: [&str; 14] = [
        "Conv",
        "BatchNormalization",
        "Add",
        "Sum",
        "Slice",
        "Pad",
        "Mul",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Constant",
        "Relu",
        "Cast",
    ];
    const INTS: [i64; 9] = [i64::MIN, -(1 << 40), -3, -1, 0, 1, 2, 7, i64::MAX];
    const ATTRS: [&str; 13] = [
        "group",
        "strides",
        "dilations",
        "pads",
        "kernel_shape",
        "auto_pad",
        "axes",
        "starts",
        "ends",
        "mode",
        "training_mode",
        "spatial",
        "epsilon",
    ];
    let mut m = base.clone();
    let g = m.graph.as_mut().unwrap();
    let names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name().to_string()))
        .chain(g.input.iter().map(|v| v.name().to_string()))
        .collect();
    for _ in 0..1 + rng.below(4) {
        let len = g.node.len();
        let n = &mut g.node[rng.below(len)];
        match rng.below(9) {
            0 => n.op_type = Some(OPS[rng.below(OPS.len())].into()),
            1 => {
                let k = rng.below(n.input.len() + 1);
                n.input.truncate(k)
            }
            2 if !n.input.is_empty() => {
                let i = rng.below(n.input.len());
                n.input[i] = if rng.below(4) == 0 { String::new() } else { names[rng.below(names.len())].clone() };
            }
            3 => n.input.push(names[rng.below(names.len())].clone()),
            4 => n.attribute.clear(),
            5 | 6 => {
                let name = ATTRS[rng.below(ATTRS.len())];
                n.attribute.retain(|a| a.name() != name);
                let mut a = AttributeProto { name: Some(name.into()), ..Default::default() };
                match rng.below(4) {
                    0 => a.i = Some(INTS[rng.below(INTS.len())]),
                    1 => a.ints = (0..rng.below(9)).map(|_| INTS[rng.below(INTS.len())]).collect(),
                    2 => a.f = Some([f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30][rng.below(5)]),
                    _ => {
                        a.s = Some(
                            ["SAME_UPPER", "SAME_LOWER", "VALID", "reflect", "edge", ""][rng.below(6)]
                                .as_bytes()
                                .to_vec(),
                        )
                    }
                }
                n.attribute.push(a);
            }
            7 => {
                // reshape an initializer: same element count, other dims
                let len = g.initializer.len();
                let t = &mut g.initializer[rng.below(len)];
                let numel: i64 = t.dims.iter().product();
                t.dims = match rng.below(4) {
                    0 => vec![numel],
                    1 => vec![1, numel],
                    2 => vec![numel, 1, 1, 1],
                    _ => vec![1, 1, numel, 1, 1],
                };
            }
            _ => {
                // a constant int64 parameter with extreme values (Slice starts, Pad amounts, ...)
                let len = g.initializer.len();
                let t = &mut g.initializer[rng.below(len)];
                let k = rng.below(9);
                t.data_type = Some(DataType::Int64 as i32);
                t.dims = vec![k as i64];
                t.raw_data = None;
                t.float_data.clear();
                t.int64_data = (0..k).map(|_| INTS[rng.below(INTS.len())]).collect();
            }
        }
    }
    m
}

/// Structural mutants of three fixtures through load + fuse + save: no panic. (Run 1781 once
/// made tract panic inside `passes::region` — tract-core strided_slice.rs:25 from
/// `region::recover`; region.rs now catches tract's panics and refuses the region.)
#[test]
fn case_in_test_fuzz_structural_mutations() {
    let start = std::time::Instant::now();
    let d = tempdir();
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut rng = Rng(0xacde_0005);
    let mut failures = vec![];
    let (mut runs, mut loaded) = (0, 0);
    for (model, file) in
        [("conv2", "ts_nofold_op11.onnx"), ("qarepvgg", "dynamo_inline.onnx"), ("corners", "ts_nofold_op11.onnx")]
    {
        let base = read(&fixture(model, file));
        for _ in 0..700 {
            let m = structural_mutant(&base, &mut rng);
            runs += 1;
            match run_mutant(d.path(), &m.encode_to_vec(), &out_dir) {
                Ok(l) => loaded += usize::from(l),
                Err(e) => {
                    let keep = keep_dir().join(format!("structural_{runs}.onnx"));
                    write(&m, &keep);
                    failures.push(format!("run {runs} ({model}/{file}): {e}"));
                }
            }
        }
    }
    eprintln!("structural fuzz: {runs} runs, {loaded} loaded, {:.1}s", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} of {runs} mutants failed:\n{}", failures.len(), failures.join("\n"));
}
