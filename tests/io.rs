//! Foundation: lossless load/save, external data, tensor conversion.

mod support;

use acnet_onnx::proto::{tensor_proto::DataType, ModelProto, TensorProto};
use acnet_onnx::tensor::{from_f64, from_i64, to_f64, to_i64, FloatType};
use acnet_onnx::Model;
use acnet_onnx::{save, DataMode};
use prost::Message;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn all_onnx() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for m in std::fs::read_dir(fixtures()).unwrap() {
        let m = m.unwrap().path();
        if m.is_dir() {
            for f in std::fs::read_dir(&m).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_some_and(|e| e == "onnx") {
                    v.push(f);
                }
            }
        }
    }
    v.sort();
    assert!(v.len() >= 40, "fixtures missing: {}", v.len());
    v
}

#[test]
fn case_every_fixture_reencodes_to_identical_bytes() {
    for p in all_onnx() {
        let original = std::fs::read(&p).unwrap();
        let m = Model::load(&p).unwrap();
        assert_eq!(m.proto.encode_to_vec(), original, "{} changed on re-encode", p.display());
    }
}

#[test]
fn case_every_fixture_saves_inline_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    for p in all_onnx() {
        let m = Model::load(&p).unwrap();
        // (a model with external data, as dynamo_ext.onnx, is saved with a data file)
        if m.has_external_data() {
            continue;
        }
        let out = dir.path().join("m.onnx");
        let saved = save(&m, &out, DataMode::Auto).unwrap();
        assert!(saved.data.is_none());
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&p).unwrap(), "{}", p.display());
    }
}

fn same_content(a: &Model, b: &Model) {
    assert_eq!(a.to_inline().unwrap(), b.to_inline().unwrap());
}

#[test]
fn case_external_data_roundtrips_inline_and_external() {
    let src = fixtures().join("resnet20/dynamo_ext.onnx");
    let m = Model::load(&src).unwrap();
    assert!(m.has_external_data());
    let dir = tempfile::tempdir().unwrap();

    // Auto keeps external data for a model that came with it.
    let auto = save(&m, &dir.path().join("auto.onnx"), DataMode::Auto).unwrap();
    assert_eq!(auto.data.as_deref(), Some(dir.path().join("auto.onnx.data").as_path()));
    let back = Model::load(&auto.model).unwrap();
    assert!(back.has_external_data());
    same_content(&m, &back);

    // Inline on request: no data file, same content.
    let inline = save(&m, &dir.path().join("inline.onnx"), DataMode::Inline).unwrap();
    assert!(inline.data.is_none());
    let back = Model::load(&inline.model).unwrap();
    assert!(!back.has_external_data());
    same_content(&m, &back);
    // the inline form equals the dynamo inline export's weights byte for byte
    let data_len: u64 = std::fs::metadata(src.with_extension("onnx.data")).unwrap().len();
    assert!(std::fs::metadata(&inline.model).unwrap().len() > data_len);

    // External on request for a model that had none.
    let plain = Model::load(fixtures().join("resnet20/ts_fold.onnx")).unwrap();
    let ext = save(&plain, &dir.path().join("ext.onnx"), DataMode::External).unwrap();
    assert!(ext.data.is_some());
    let back = Model::load(&ext.model).unwrap();
    assert!(back.has_external_data());
    same_content(&plain, &back);
    assert!(std::fs::metadata(&ext.model).unwrap().len() < 100_000);

    // Saving inline over a path that had external data removes the stale .data file.
    save(&m, &dir.path().join("x.onnx"), DataMode::External).unwrap();
    assert!(dir.path().join("x.onnx.data").exists());
    save(&m, &dir.path().join("x.onnx"), DataMode::Inline).unwrap();
    assert!(!dir.path().join("x.onnx.data").exists());
    // no staging folder left behind
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".acnet")));
}

fn copy_ext(dir: &Path) -> PathBuf {
    let src = fixtures().join("cifar_quick/dynamo_ext.onnx");
    std::fs::copy(&src, dir.join("dynamo_ext.onnx")).unwrap();
    std::fs::copy(src.with_extension("onnx.data"), dir.join("dynamo_ext.onnx.data")).unwrap();
    dir.join("dynamo_ext.onnx")
}

#[test]
fn case_missing_external_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = copy_ext(dir.path());
    std::fs::remove_file(dir.path().join("dynamo_ext.onnx.data")).unwrap();
    let e = Model::load(&p).unwrap_err().to_string();
    assert!(e.contains("dynamo_ext.onnx") && e.contains("external data") && e.contains("cannot read"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn case_short_external_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = copy_ext(dir.path());
    let d = dir.path().join("dynamo_ext.onnx.data");
    let len = std::fs::metadata(&d).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&d).unwrap().set_len(len - 10).unwrap();
    let e = Model::load(&p).unwrap_err().to_string();
    assert!(e.contains("external data") && e.contains(&format!("holds {} bytes", len - 10)), "{e}");
}

#[test]
fn case_external_location_escaping_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = copy_ext(dir.path());
    for bad in ["../dynamo_ext.onnx.data", "/etc/passwd"] {
        let mut m = ModelProto::decode(std::fs::read(&p).unwrap().as_slice()).unwrap();
        for t in &mut m.graph.as_mut().unwrap().initializer {
            for e in &mut t.external_data {
                if e.key() == "location" {
                    e.value = Some(bad.to_string());
                }
            }
        }
        let q = dir.path().join("bad.onnx");
        std::fs::write(&q, m.encode_to_vec()).unwrap();
        let e = Model::load(&q).unwrap_err().to_string();
        assert!(e.contains("unsafe"), "{e}");
    }
}

fn t(dt: DataType, dims: &[i64]) -> TensorProto {
    TensorProto { name: Some("t".into()), data_type: Some(dt as i32), dims: dims.to_vec(), ..Default::default() }
}

#[test]
fn case_tensor_conversion_every_dtype_and_field() {
    let vals = [1.5f64, -2.25, 0.0, 3.0e-3, 1024.0, -0.5];
    let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3]), vals.to_vec()).unwrap();
    for ft in [FloatType::F32, FloatType::F16, FloatType::BF16, FloatType::F64] {
        let tp = from_f64("w", &a, ft);
        assert_eq!(tp.raw_data.as_ref().unwrap().len(), 6 * ft.size());
        let back = to_f64(&tp, tp.raw_data.as_deref()).unwrap();
        for (x, y) in back.iter().zip(a.iter()) {
            let tol = match ft {
                FloatType::BF16 => 1e-2 * y.abs().max(1e-2),
                FloatType::F16 => 1e-3 * y.abs().max(1e-3),
                _ => 1e-7 * y.abs(),
            };
            assert!((x - y).abs() <= tol, "{ft:?}: {x} vs {y}");
        }
        assert_eq!(back.shape(), &[2, 3]);
    }
    // typed fields
    let mut f = t(DataType::Float, &[2]);
    f.float_data = vec![1.5, -2.0];
    assert_eq!(to_f64(&f, None).unwrap().as_slice().unwrap(), &[1.5, -2.0]);
    let mut d = t(DataType::Double, &[2]);
    d.double_data = vec![0.1, 7.0];
    assert_eq!(to_f64(&d, None).unwrap().as_slice().unwrap(), &[0.1, 7.0]);
    let mut h = t(DataType::Float16, &[2]);
    h.int32_data = vec![half::f16::from_f32(0.5).to_bits() as i32, half::f16::from_f32(-3.0).to_bits() as i32];
    assert_eq!(to_f64(&h, None).unwrap().as_slice().unwrap(), &[0.5, -3.0]);
    let mut b = t(DataType::Bfloat16, &[1]);
    b.int32_data = vec![half::bf16::from_f32(-1.25).to_bits() as i32];
    assert_eq!(to_f64(&b, None).unwrap().as_slice().unwrap(), &[-1.25]);
    // wrong counts are errors, not panics
    f.float_data.pop();
    assert!(to_f64(&f, None).is_err());
    assert!(to_f64(&from_f64("w", &a, FloatType::F32), Some(&[0u8; 7])).is_err());
    assert!(to_f64(&t(DataType::Int64, &[1]), None).is_err());
    // int64 from raw and typed, int32
    let i = from_i64("s", &[3], &[0, -1, i64::MAX]);
    assert_eq!(to_i64(&i, i.raw_data.as_deref()).unwrap(), vec![0, -1, i64::MAX]);
    let mut i2 = t(DataType::Int64, &[2]);
    i2.int64_data = vec![5, -7];
    assert_eq!(to_i64(&i2, None).unwrap(), vec![5, -7]);
    let mut i3 = t(DataType::Int32, &[1]);
    i3.int32_data = vec![-4];
    assert_eq!(to_i64(&i3, None).unwrap(), vec![-4]);
    // negative dims refused
    let mut neg = t(DataType::Float, &[-1]);
    neg.float_data = vec![];
    assert!(to_f64(&neg, None).unwrap_err().contains("negative"));
}

#[test]
fn case_fixture_weights_resolve_from_external_and_inline_alike() {
    // dynamo_ext and dynamo_inline come from the same export: same tensors, same values.
    let e = Model::load(fixtures().join("corners/dynamo_ext.onnx")).unwrap();
    let i = Model::load(fixtures().join("corners/dynamo_inline.onnx")).unwrap();
    let ge = e.proto.graph.as_ref().unwrap();
    let gi = i.proto.graph.as_ref().unwrap();
    assert_eq!(ge.initializer.len(), gi.initializer.len());
    let mut n_ext = 0;
    for (a, b) in ge.initializer.iter().zip(&gi.initializer) {
        n_ext += usize::from(acnet_onnx::is_external(a));
        assert_eq!(a.name(), b.name());
        assert_eq!(e.raw_bytes(a).unwrap(), i.raw_bytes(b).unwrap(), "{}", a.name());
    }
    assert!(n_ext > 0);
}

/// Weights of 64 KiB and more take the file-to-file path when saving (`copy_file_range` from the
/// input's memory map, `src/sink.rs`), and the map pages of a weight are released after the
/// fuse decodes it. Neither may change a byte: an ACB of 64 channels (3x3 weight 144 KiB) is
/// fused from a file and saved inline and external; the untouched tensors are byte-identical
/// to the input's, the merged kernel is the sum of the branches, and a re-save of the loaded
/// input is byte-identical to the input.
#[test]
fn case_large_tensors_copied_file_to_file() {
    use support::{conv_of, graph, Builder, ConvAttrs};
    let c = 64;
    let mut b = Builder::new(c, 6, 6);
    let (sq, w_sq, b_sq) = b.conv_rand("sq", "x", c, c, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (ver, w_ver, b_ver) = b.conv_rand("ver", "x", c, c, &[3, 1], true, ConvAttrs::pads(&[1, 0, 1, 0]));
    let (hor, w_hor, b_hor) = b.conv_rand("hor", "x", c, c, &[1, 3], true, ConvAttrs::pads(&[0, 1, 0, 1]));
    let a1 = b.add("a1", &sq, &ver);
    let s = b.add("a2", &a1, &hor);
    // a conv the rules leave alone, and a large constant beside it
    let (post, w_post, _) = b.conv_rand("post", &s, c, c, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    b.output(&post);
    assert!(w_post.len() * 4 >= 64 << 10);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acb.onnx");
    std::fs::write(&input, b.model().encode_to_vec()).unwrap();
    let input_bytes = std::fs::read(&input).unwrap();

    // an untouched re-save, inline and external-then-inline, gives back the input's bytes
    let m = Model::load(&input).unwrap();
    let again = dir.path().join("again.onnx");
    save(&m, &again, DataMode::Inline).unwrap();
    assert!(std::fs::read(&again).unwrap() == input_bytes, "inline re-save differs");
    let ext = dir.path().join("ext.onnx");
    save(&m, &ext, DataMode::External).unwrap();
    let back = dir.path().join("back.onnx");
    save(&Model::load(&ext).unwrap(), &back, DataMode::Inline).unwrap();
    assert!(std::fs::read(&back).unwrap() == input_bytes, "external then inline differs");

    for (mode, from) in [(DataMode::Inline, &input), (DataMode::External, &ext)] {
        let mut m = Model::load(from).unwrap();
        let r = acnet_onnx::fuse(&mut m).unwrap();
        assert_eq!(r.blocks_merged, 1, "{mode:?}: {:?}", r.refused);
        let out = dir.path().join(format!("fused-{mode:?}.onnx"));
        save(&m, &out, mode).unwrap();
        let fused = Model::load(&out).unwrap().to_inline().unwrap();
        let g = graph(&fused);
        let convs: Vec<_> = g.node.iter().filter(|n| n.op_type() == "Conv").collect();
        assert_eq!(convs.len(), 2, "{mode:?}");
        // the untouched conv's weight: the input's bytes
        let orig = b.model();
        let raw = |m: &ModelProto, n: &str| {
            graph(m).initializer.iter().find(|t| t.name() == n).unwrap().raw_data.clone().unwrap()
        };
        assert!(raw(&fused, "post.w") == raw(&orig, "post.w"), "{mode:?}: untouched weight changed");
        // the merged conv: sq + ver (centre column) + hor (centre row)
        let k = conv_of(&fused, convs.iter().find(|n| n.name() != "post").unwrap());
        let mut want = w_sq.clone();
        want.slice_mut(ndarray::s![.., .., .., 1..2]).zip_mut_with(&w_ver, |a, b| *a += b);
        want.slice_mut(ndarray::s![.., .., 1..2, ..]).zip_mut_with(&w_hor, |a, b| *a += b);
        let bias = b_sq.as_ref().unwrap() + b_ver.as_ref().unwrap() + b_hor.as_ref().unwrap();
        let d = (&k.weight - &want).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(d < 1e-6, "{mode:?}: merged kernel off by {d}");
        let d = (&k.bias.clone().into_dyn() - &bias).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(d < 1e-6, "{mode:?}: merged bias off by {d}");
    }
    // and the input file is as it was
    assert!(std::fs::read(&input).unwrap() == input_bytes);
}
