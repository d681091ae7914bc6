//! Not a model.

use super::*;

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
