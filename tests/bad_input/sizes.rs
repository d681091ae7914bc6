//! Tensors whose sizes do not add up.

use super::*;

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
