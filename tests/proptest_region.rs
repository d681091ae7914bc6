//! Properties of the general path at the shapes a model really runs at.
//!
//! * `case_random_regions_fuse_at_the_batch_the_model_runs_at`: a region that is exactly one
//!   convolution — a KxK Conv plus AveragePool(Pad(Conv 1x1)) through a Reshape round trip —
//!   with a batch B of 1 to 3 that the input declares (fixed), or leaves symbolic while the
//!   Reshape constants fix it at B (an export traced at batch B), or leaves symbolic and free:
//!   `fuse` must recover one Conv, refuse nothing, compute what the original computes at batch
//!   B in tract, and verify with the default check (which must run the model at B too).
//!
//! Cases: 48 by default; `PROPTEST_CASES=N` overrides.

#[path = "support/mod.rs"]
mod support;

use acnet_onnx::proto::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use acnet_onnx::verify::{verify, VerifyOptions};
use acnet_onnx::{fuse, save, DataMode};
use proptest::prelude::*;
use support::*;

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// How the batch reaches the model.
#[derive(Clone, Copy, Debug)]
enum Batch {
    /// the input declares it
    Declared,
    /// the input's dim is symbolic; the Reshape constants hold it (traced at that batch)
    Baked,
    /// symbolic, and nothing fixes it (the Reshapes copy it with a 0)
    Free,
}

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    batch: Batch,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (1usize..=3, 1usize..=3, 3usize..=7, 3usize..=7, prop_oneof![Just(1usize), Just(3), Just(5)], 0u8..3, any::<u64>())
        .prop_map(|(b, c, h, w, k, batch, seed)| {
            let batch = [Batch::Declared, Batch::Baked, Batch::Free][batch as usize];
            Case { b, c, h, w, k, batch, seed }
        })
}

fn symbolic_input(c: usize, h: usize, w: usize) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value as V;
    let dim = |d: V| tensor_shape_proto::Dimension { value: Some(d), ..Default::default() };
    let dims = vec![
        dim(V::DimParam("batch".into())),
        dim(V::DimValue(c as i64)),
        dim(V::DimValue(h as i64)),
        dim(V::DimValue(w as i64)),
    ];
    ValueInfoProto {
        name: Some("x".into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// y = Conv_k(x) + Reshape(AveragePool3(Pad1(Conv1x1(Reshape(x))))) (the Reshapes a round trip).
fn region(case: &Case) -> Builder {
    let Case { b: n, c, h, w, k, batch, seed } = *case;
    let mut b = Builder::new(c, h, w);
    b.rng = rand::SeedableRng::seed_from_u64(seed);
    match batch {
        Batch::Declared => {
            b.graph.input[0] = tensor_info("x", DataType::Float, &[n as i64, c as i64, h as i64, w as i64])
        }
        Batch::Baked | Batch::Free => b.graph.input[0] = symbolic_input(c, h, w),
    }
    let p = (k / 2) as i64;
    let (a, _, _) = b.conv_rand("dense", "x", c, c, &[k, k], true, ConvAttrs::pads(&[p, p, p, p]));
    let lead = match batch {
        Batch::Free => 0,
        _ => n as i64,
    };
    let flat = b.initializer_i64("flat", &[lead, c as i64, (h * w) as i64]);
    let t = b.node("Reshape", "to_flat", &["x", &flat], &[], vec![]);
    let back = b.initializer_i64("back", &[lead, c as i64, h as i64, w as i64]);
    let t = b.node("Reshape", "to_image", &[&t, &back], &[], vec![]);
    let (t, _, _) = b.conv_rand("squeeze", &t, c, c, &[1, 1], false, ConvAttrs::default());
    let t = b.pad("pad", &t, &[0, 0, 1, 1, 0, 0, 1, 1], None);
    let t = b.node("AveragePool", "avg", &[&t], &[], vec![attr_ints("kernel_shape", &[3, 3])]);
    let y = b.add("sum", &a, &t);
    b.output(&y);
    b
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    let b = region(case);
    let original = b.build();
    let mut m = b.build();
    let report = fuse(&mut m).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(report.refused.is_empty(), "{case:?}: {}", report.summary());
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    prop_assert_eq!(ops, vec!["Conv"], "{:?}: {}", case, report.summary());
    // the same function at the batch the model runs at
    let x = rand_input(case.seed ^ 1, &[case.b, case.c, case.h, case.w]);
    let (want, got) = (run_f32(&original, std::slice::from_ref(&x)), run_f32(&m, &[x]));
    prop_assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(1f64, |a, v| a.max(v.abs()));
    let d = max_abs_diff(&got, &want);
    prop_assert!(d <= 1e-5 * scale, "{case:?}: max abs diff {d}");
    // and the default check passes (running both at the batch the reference's graph fixes)
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (dir.path().join("a.onnx"), dir.path().join("c.onnx"));
    save(&original, &a, DataMode::Inline).unwrap();
    save(&m, &c, DataMode::Inline).unwrap();
    let r = verify(&a, &c, &VerifyOptions::default()).map_err(|e| TestCaseError::fail(format!("{case:?}: {e}")))?;
    prop_assert!(r.passed, "{case:?}:\n{}", r.table());
    let batch_of = r.inputs[0].shape[0];
    match case.batch {
        Batch::Declared | Batch::Baked => prop_assert_eq!(batch_of, case.b, "{:?}", case),
        Batch::Free => prop_assert_eq!(batch_of, 1, "{:?}", case),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn case_random_regions_fuse_at_the_batch_the_model_runs_at(case in cases()) {
        check(&case)?;
    }
}
