//! In-test fuzz.

use super::*;

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
