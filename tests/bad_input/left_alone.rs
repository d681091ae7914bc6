//! Valid models the rules must leave alone (reported), and operators tract lacks.

use super::*;

/// Names of the Conv weights of `m`.
fn conv_weights(m: &ModelProto) -> Vec<String> {
    m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type() == "Conv").map(|n| n.input[1].clone()).collect()
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
