//! What messages name, and how many lines they take: a node without a name is named by its first
//! output tensor in every message (refusals, warnings, load errors, the check's first
//! divergence); warnings of one kind about many merged Convs are one line in the summary, while
//! the report keeps each one.

mod support;

use acnet_onnx::verify::{verify, VerifyOptions};
use acnet_onnx::{fuse, Model};
use ndarray::s;
use support::*;

/// The builder's graph with every node's name removed (each keeps its outputs, `{name}.y`).
fn unnamed(b: &Builder) -> Model {
    let mut m = b.model();
    for n in &mut m.graph.as_mut().unwrap().node {
        n.name = Some(String::new());
    }
    Model::from_proto(m).unwrap()
}

/// x -> sq (3x3, pads 1) + one (1x1) -> sum: two branches whose merged weight has channel 0 a
/// thousand times the others (per-tensor int8 crushes 3 of 4 channels) and, with `tiny`, one
/// non-zero weight float16 flushes to zero.
fn crushed_block(b: &mut Builder, prefix: &str, x: &str, tiny: bool) -> String {
    let mut w = b.rand(&[4, 4, 3, 3]);
    w.slice_mut(s![0, .., .., ..]).mapv_inplace(|v| v * 1000.0);
    if tiny {
        w[[1, 0, 0, 0]] = 1e-9;
    }
    let sq = b.conv(&format!("{prefix}sq"), x, &w, None, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (one, _, _) = b.conv_rand(&format!("{prefix}one"), x, 4, 4, &[1, 1], false, ConvAttrs::default());
    b.add(&format!("{prefix}sum"), &sq, &one)
}

#[test]
fn a_warning_about_an_unnamed_merged_conv_names_its_output() {
    let mut b = Builder::new(4, 6, 6);
    let y = crushed_block(&mut b, "", "x", true);
    b.output(&y);
    let mut m = unnamed(&b);
    let r = fuse(&mut m).unwrap();
    let s = r.summary();
    // the merged Conv writes what the sum wrote
    assert_eq!(r.rewrites[0].node, "sum.y", "{:?}", r.rewrites);
    assert_eq!(r.rewrites[0].weights[0].conv, "sum.y");
    assert!(s.contains("warning: Conv 'sum.y': 1 non-zero merged weight(s) flush to zero in float16"), "{s}");
    assert!(s.contains("warning: Conv 'sum.y': per-tensor int8 would crush 3 of 4 output channels"), "{s}");
    assert!(!s.contains("''"), "an empty name in:\n{s}");
}

#[test]
fn a_refusal_at_an_unnamed_node_names_its_output() {
    // fold_bn: the conv's output is also a graph output, so the BN cannot take the conv
    let mut b = Builder::new(3, 5, 5);
    let (c, _, _) = b.conv_rand("c", "x", 3, 3, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (z, _) = b.bn("bn", &c, 3, None);
    b.output(&z);
    b.output(&c);
    let mut m = unnamed(&b);
    let r = fuse(&mut m).unwrap();
    let f = r.refused.iter().find(|f| f.rule == "fold_bn").unwrap_or_else(|| panic!("{}", r.summary()));
    assert_eq!(f.node, "bn.y", "{f:?}");
    assert_eq!(f.reason.to_string(), "output of Conv 'c.y' is also used outside the block");
    assert!(r.summary().contains("fold_bn at 'bn.y': output of Conv 'c.y' is also used outside the block"));

    // merge_branches: a branch whose weight is a graph input cannot be read
    let mut b = Builder::new(3, 5, 5);
    let (sq, _, _) = b.conv_rand("sq", "x", 3, 3, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let w = b.input("w", &[3, 3, 1, 1]);
    let one = b.conv_with("one", &["x", &w], &[1, 1], ConvAttrs::default());
    let y = b.add("sum", &sq, &one);
    b.output(&y);
    let mut m = unnamed(&b);
    let r = fuse(&mut m).unwrap();
    let f = r.refused.iter().find(|f| f.rule == "merge_branches").unwrap_or_else(|| panic!("{}", r.summary()));
    assert_eq!(f.node, "sum.y", "{f:?}");
    assert!(f.reason.to_string().starts_with("Conv 'one.y': "), "{}", f.reason);
}

#[test]
fn an_error_about_an_unnamed_node_names_its_output() {
    // a node reading what nothing produces
    let mut b = Builder::new(3, 5, 5);
    let y = b.node("Relu", "r", &["nowhere"], &[], vec![]);
    b.output(&y);
    let e = acnet_onnx::validate(&unnamed(&b)).unwrap_err().to_string();
    assert!(e.contains("node 'r.y' (Relu) reads 'nowhere', which nothing produces"), "{e}");

    // a model exported in training mode
    let mut b = Builder::new(3, 5, 5);
    let (z, _) = b.bn("bn", "x", 3, Some(1));
    b.output(&z);
    let e = fuse(&mut unnamed(&b)).map(|r| r.notes.join("\n")).unwrap_or_else(|e| e.to_string());
    assert!(e.contains("BatchNormalization 'bn.y' is in training mode"), "{e}");
}

#[test]
fn the_first_divergence_at_an_unnamed_node_names_its_output() {
    let d = tempfile::tempdir().unwrap();
    let chain = |factor: f64| {
        let mut b = Builder::new(3, 6, 6);
        let mut w = b.rand(&[4, 3, 3, 3]);
        w[[0, 0, 1, 1]] *= factor;
        let c1 = b.conv("c1", "x", &w, None, ConvAttrs::pads(&[1, 1, 1, 1]));
        let r = b.node("Relu", "r", &[&c1], &[], vec![]);
        let (y, _, _) = b.conv_rand("c2", &r, 2, 4, &[1, 1], true, ConvAttrs::default());
        b.output(&y);
        unnamed(&b)
    };
    let (reference, candidate) = (d.path().join("ref.onnx"), d.path().join("bad.onnx"));
    acnet_onnx::save(&chain(1.0), &reference, acnet_onnx::DataMode::Inline).unwrap();
    acnet_onnx::save(&chain(3.0), &candidate, acnet_onnx::DataMode::Inline).unwrap();
    let r = verify(&reference, &candidate, &VerifyOptions::default()).unwrap();
    assert!(!r.passed, "{}", r.table());
    let div = r.divergence.as_ref().unwrap_or_else(|| panic!("no divergence:\n{}", r.table()));
    assert_eq!((div.tensor.as_str(), div.node.as_str(), div.op.as_str()), ("c1.y", "c1.y", "Conv"), "{div:?}");
    assert!(r.table().contains("written by Conv 'c1.y'"), "{}", r.table());
}

/// Five blocks whose merged weights int8 would crush, two of them also with a weight float16
/// flushes to zero: the summary has one line per kind (the count and the first three Convs),
/// the report every Conv's line.
#[test]
fn warnings_of_one_kind_are_one_line_and_the_report_keeps_each() {
    let mut b = Builder::new(4, 6, 6);
    let mut x = "x".to_string();
    for k in 0..5 {
        x = crushed_block(&mut b, &format!("b{k}."), &x, k % 2 == 1);
    }
    b.output(&x);
    let mut m = b.build();
    let r = fuse(&mut m).unwrap();
    assert_eq!(r.blocks_merged, 5, "{}", r.summary());
    let s = r.summary();
    let warnings: Vec<&str> = s.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(
        warnings,
        [
            "warning: 2 merged Convs have non-zero merged weights that flush to zero in float16: 'b1.sq' (1), 'b3.sq' (1)",
            "warning: 5 merged Convs would have most of their output channels crushed by per-tensor int8 (their largest weight is under 1/16 of the tensor's: fewer than 8 of 127 levels); quantise per channel: 'b0.sq' (3 of 4), 'b1.sq' (3 of 4), 'b2.sq' (3 of 4) and 2 more (the JSON report lists each)",
        ],
        "{s}"
    );
    // the report: every Conv's own line, and every merged weight's numbers
    assert_eq!(r.warnings.len(), 7, "{:?}", r.warnings);
    for k in 0..5 {
        let line = format!("Conv 'b{k}.sq': per-tensor int8 would crush 3 of 4 output channels (their largest weight is under 1/16 of the tensor's: fewer than 8 of 127 levels); quantise per channel");
        assert!(r.warnings.contains(&line), "{line}\n{:?}", r.warnings);
    }
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["warnings"].as_array().unwrap().len(), 7);
    let crushed: Vec<&str> = json["rewrites"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["weights"].as_array().unwrap())
        .filter(|w| w["int8_crushed_channels"] == 3)
        .map(|w| w["conv"].as_str().unwrap())
        .collect();
    assert_eq!(crushed, ["b0.sq", "b1.sq", "b2.sq", "b3.sq", "b4.sq"]);

    // one Conv of a kind keeps its own line
    let mut b = Builder::new(4, 6, 6);
    let y = crushed_block(&mut b, "", "x", true);
    b.output(&y);
    let r = fuse(&mut b.build()).unwrap();
    let s = r.summary();
    assert!(s.contains("warning: Conv 'sq': 1 non-zero merged weight(s) flush to zero in float16\n"), "{s}");
    assert!(s.contains("warning: Conv 'sq': per-tensor int8 would crush 3 of 4 output channels"), "{s}");
}
