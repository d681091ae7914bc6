//! Each refusal reason of the rules (fold_bn, merge_branches) on a minimal graph built in Rust:
//! the candidate is reported in `refused` with its reason, and the model is left untouched.
//! Positive controls built with the same builder fuse, so the checks can fail.
// ndarray's `s![.., 1..-1]` counts negative ends from the back; clippy reads them as empty ranges
#![allow(clippy::reversed_empty_ranges)]

mod support;

use acnet_onnx::kernel::AffineConv;
use acnet_onnx::proto::{tensor_proto::DataType, ModelProto};
use acnet_onnx::{fuse, FuseReport};
use ndarray::{s, ArrayD};
use std::collections::BTreeMap;
use support::*;

/// Fuse; expect exactly one refusal by `rule`, at `node`, whose reason contains `phrase`; no
/// rewrite, and the model unchanged. Other rules (the general `affine_region` fallback) may
/// refuse the same candidate too, but only that one.
fn expect_refusal(b: &Builder, rule: &str, node: &str, phrase: &str) -> FuseReport {
    let mut m = b.build();
    let before: ModelProto = m.proto.clone();
    let r = fuse(&mut m).unwrap();
    let mine: Vec<_> = r.refused.iter().filter(|f| f.rule == rule).collect();
    assert_eq!(mine.len(), 1, "expected one refusal by {rule}, got {:?} (rewrites {:?})", r.refused, r.rewrites);
    let f = mine[0];
    assert_eq!(f.node, node, "{f:?}");
    assert!(f.reason.to_string().contains(phrase), "reason {:?} does not contain {phrase:?}", f.reason);
    for o in r.refused.iter().filter(|f| f.rule != rule) {
        assert_eq!(o.node, node, "another rule refused another candidate: {o:?}");
    }
    assert!(r.rewrites.is_empty(), "rewrites fired: {:?}", r.rewrites);
    assert_eq!(m.proto, before, "the model changed");
    assert_eq!(r.before, r.after);
    r
}

/// Fuse; expect no refusal and a graph of exactly the operators `ops`.
fn expect_fused(b: &Builder, ops: &[(&str, usize)]) -> (ModelProto, FuseReport) {
    let mut m = b.build();
    let r = fuse(&mut m).unwrap();
    assert!(r.refused.is_empty(), "refused: {:?}", r.refused);
    let want: BTreeMap<String, usize> = ops.iter().map(|(o, n)| (o.to_string(), *n)).collect();
    assert_eq!(r.after.ops, want, "rewrites {:?}", r.rewrites);
    // the graph still computes y from x
    let g = graph(&m.proto);
    assert_eq!(g.input.iter().map(|v| v.name()).collect::<Vec<_>>(), vec!["x"]);
    assert!(g.node.iter().any(|n| n.output.iter().any(|o| o == "y")), "nothing writes y");
    (m.proto, r)
}

const C: usize = 3;

/// x -> big, x -> small, Add -> y: two plain Conv branches (no bias).
fn two_branch(big_k: &[usize], big: ConvAttrs, small_k: &[usize], small: ConvAttrs) -> Builder {
    two_branch_ch(big_k, big, C, small_k, small, C, C)
}

fn two_branch_ch(
    big_k: &[usize],
    big: ConvAttrs,
    big_o: usize,
    small_k: &[usize],
    small: ConvAttrs,
    small_o: usize,
    cin: usize,
) -> Builder {
    let mut b = Builder::new(cin, 5, 5);
    let gb = big.group.unwrap_or(1) as usize;
    let gs = small.group.unwrap_or(1) as usize;
    let (a, _, _) = b.conv_rand("big", "x", big_o, cin / gb, big_k, false, big);
    let (c, _, _) = b.conv_rand("small", "x", small_o, cin / gs, small_k, false, small);
    b.node("Add", "sum", &[&a, &c], &["y"], vec![]);
    b.output("y");
    b
}

// ---------------------------------------------------------------------------------------------
// positive controls

#[test]
fn case_control_two_branches_fuse() {
    // the valid version of the two-branch refusal graphs below
    let b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 3], ConvAttrs::pads(&[0, 1, 0, 1]));
    let (m, r) = expect_fused(&b, &[("Conv", 1)]);
    assert_eq!(r.blocks_merged, 1);
    // merged = big with small added at tap row 1
    let big = init_f64(&b.model(), "big.w");
    let small = init_f64(&b.model(), "small.w");
    let merged = only_conv(&m);
    let mut want = big.clone();
    want.slice_mut(s![.., .., 1..2, ..]).scaled_add(1.0, &small);
    assert!(max_abs_diff(&merged.weight, &want) < 1e-6);
    assert_eq!(merged.bias.iter().copied().fold(0.0f64, |m, v| m.max(v.abs())), 0.0);
}

#[test]
fn case_control_acb_with_bn_per_branch() {
    let mut b = Builder::new(C, 5, 6);
    let o = 4;
    let (y1, w1, c1b) = b.conv_rand("c3x3", "x", o, C, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (z1, bn1) = b.bn("bn3x3", &y1, o, None);
    let (y2, w2, _) = b.conv_rand("c3x1", "x", o, C, &[3, 1], false, ConvAttrs::pads(&[1, 0, 1, 0]));
    let (z2, bn2) = b.bn("bn3x1", &y2, o, None);
    let (y3, w3, _) = b.conv_rand("c1x3", "x", o, C, &[1, 3], false, ConvAttrs::pads(&[0, 1, 0, 1]));
    let (z3, bn3) = b.bn("bn1x3", &y3, o, None);
    let s12 = b.add("add12", &z1, &z2);
    b.node("Add", "add123", &[&s12, &z3], &["y"], vec![]);
    b.output("y");
    let (m, r) = expect_fused(&b, &[("Conv", 1)]);
    assert_eq!((r.bns_folded, r.blocks_merged), (3, 1), "{:?}", r.rewrites);
    assert_eq!(r.before.op("BatchNormalization"), 3);
    assert_eq!(r.before.op("Add"), 2);
    let merged = only_conv(&m);
    assert_eq!(merged.kernel(), &[3, 3]);
    assert_eq!((merged.pads_begin.clone(), merged.pads_end.clone()), (vec![1, 1], vec![1, 1]));

    // the centre tap by hand: the sum of the three branches' centre taps after the BN fold
    let a = |bn: &Bn, o: usize| bn.scale[o] / (bn.var[o] + bn.epsilon as f64).sqrt();
    for oc in 0..o {
        for c in 0..C {
            let want =
                w1[[oc, c, 1, 1]] * a(&bn1, oc) + w2[[oc, c, 1, 0]] * a(&bn2, oc) + w3[[oc, c, 0, 1]] * a(&bn3, oc);
            let got = merged.weight[[oc, c, 1, 1]];
            assert!((got - want).abs() < 1e-5, "centre tap [{oc},{c}]: {got} vs {want}");
            // a corner only the 3x3 reads
            let corner = w1[[oc, c, 0, 0]] * a(&bn1, oc);
            assert!((merged.weight[[oc, c, 0, 0]] - corner).abs() < 1e-5);
        }
        let c1b = c1b.as_ref().unwrap();
        let bias = (c1b[oc] - bn1.mean[oc]) * a(&bn1, oc) + bn1.bias[oc] - bn2.mean[oc] * a(&bn2, oc) + bn2.bias[oc]
            - bn3.mean[oc] * a(&bn3, oc)
            + bn3.bias[oc];
        assert!((merged.bias[oc] - bias).abs() < 1e-5, "bias {oc}");
    }

    // the whole block on an input: branches (conv, then BN by hand) vs the merged conv
    let x = rand_input(7, &[1, C, 5, 6]);
    let want = bn1.apply(&affine(&w1, c1b.as_ref(), 1, &[1, 1], &[1, 1], &[1, 1, 1, 1]).apply(&x))
        + bn2.apply(&affine(&w2, None, 1, &[1, 1], &[1, 1], &[1, 0, 1, 0]).apply(&x))
        + bn3.apply(&affine(&w3, None, 1, &[1, 1], &[1, 1], &[0, 1, 0, 1]).apply(&x));
    assert_close(&merged.apply(&x), &want, 1e-5, "ACB block");
}

#[test]
fn case_control_repvgg_with_identity_bn() {
    let mut b = Builder::new(C, 4, 5);
    let (y1, w1, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (z1, bn1) = b.bn("bn3x3", &y1, C, None);
    let (y2, w2, _) = b.conv_rand("c1x1", "x", C, C, &[1, 1], false, ConvAttrs::default());
    let (z2, bn2) = b.bn("bn1x1", &y2, C, None);
    let (z3, bn3) = b.bn("bn_id", "x", C, None);
    let s12 = b.add("add12", &z1, &z2);
    b.node("Add", "add123", &[&s12, &z3], &["y"], vec![]);
    b.output("y");
    let (m, r) = expect_fused(&b, &[("Conv", 1)]);
    assert_eq!((r.bns_folded, r.blocks_merged), (2, 1), "{:?}", r.rewrites);
    let merged = only_conv(&m);
    // centre tap of the diagonal: 3x3 centre + 1x1 + identity, each through its BN
    let a = |bn: &Bn, o: usize| bn.scale[o] / (bn.var[o] + bn.epsilon as f64).sqrt();
    for o in 0..C {
        let want = w1[[o, o, 1, 1]] * a(&bn1, o) + w2[[o, o, 0, 0]] * a(&bn2, o) + a(&bn3, o);
        assert!((merged.weight[[o, o, 1, 1]] - want).abs() < 1e-5, "diagonal centre {o}");
    }
    let x = rand_input(8, &[1, C, 4, 5]);
    let want = bn1.apply(&affine(&w1, None, 1, &[1, 1], &[1, 1], &[1, 1, 1, 1]).apply(&x))
        + bn2.apply(&affine(&w2, None, 1, &[1, 1], &[1, 1], &[0, 0, 0, 0]).apply(&x))
        + bn3.apply(&x);
    assert_close(&merged.apply(&x), &want, 1e-5, "RepVGG block");
}

#[test]
fn case_control_crop_slices_and_zero_pad_fuse() {
    // ACNet with padding 0: 3x1 on x[:, :, :, 1:-1], 1x3 on x[:, :, 1:-1, :] (Slice with an
    // explicit step 1); then, separately, a 1x3 after a zero Pad of W by 1 next to a 3x3 pad 1
    let mut b = Builder::new(C, 5, 6);
    let (y1, w1, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[0, 0, 0, 0]));
    let sv = b.slice("crop_w", "x", &[1], &[-1], &[3], None);
    let (y2, w2, _) = b.conv_rand("c3x1", &sv, C, C, &[3, 1], false, ConvAttrs::pads(&[0, 0, 0, 0]));
    let sh = b.slice("crop_h", "x", &[1], &[-1], &[2], Some(&[1][..]));
    let (y3, w3, _) = b.conv_rand("c1x3", &sh, C, C, &[1, 3], false, ConvAttrs::default());
    let s12 = b.add("add12", &y1, &y2);
    b.node("Add", "add123", &[&s12, &y3], &["y"], vec![]);
    b.output("y");
    let (m, _) = expect_fused(&b, &[("Conv", 1)]);
    let merged = only_conv(&m);
    let x = rand_input(9, &[1, C, 5, 6]);
    let p0 = [0, 0, 0, 0];
    let want = affine(&w1, None, 1, &[1, 1], &[1, 1], &p0).apply(&x)
        + affine(&w2, None, 1, &[1, 1], &[1, 1], &p0).apply(&x.slice(s![.., .., .., 1..-1]).to_owned().into_dyn())
        + affine(&w3, None, 1, &[1, 1], &[1, 1], &p0).apply(&x.slice(s![.., .., 1..-1, ..]).to_owned().into_dyn());
    assert_close(&merged.apply(&x), &want, 1e-5, "crop block");

    let mut b = Builder::new(C, 5, 6);
    let (y1, w1, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let p = b.pad("pad_w", "x", &[0, 0, 0, 1, 0, 0, 0, 1], Some("constant"));
    let (y2, w2, _) = b.conv_rand("c1x3", &p, C, C, &[1, 3], false, ConvAttrs::default());
    b.node("Add", "sum", &[&y1, &y2], &["y"], vec![]);
    b.output("y");
    let (m, _) = expect_fused(&b, &[("Conv", 1)]);
    let merged = only_conv(&m);
    let want = affine(&w1, None, 1, &[1, 1], &[1, 1], &[1, 1, 1, 1]).apply(&x)
        + affine(&w2, None, 1, &[1, 1], &[1, 1], &[0, 1, 0, 1]).apply(&x);
    assert_close(&merged.apply(&x), &want, 1e-5, "zero-pad block");
}

#[test]
fn case_control_conv_bn_folds() {
    let mut b = Builder::new(C, 4, 4);
    let (y, w, bias) = b.conv_rand("conv", "x", 2, C, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (_, bn) = b.bn("bn", &y, 2, None);
    b.graph.node.last_mut().unwrap().output = vec!["y".into()];
    b.output("y");
    let (m, r) = expect_fused(&b, &[("Conv", 1)]);
    assert_eq!(r.bns_folded, 1);
    let x = rand_input(10, &[1, C, 4, 4]);
    let want = bn.apply(&affine(&w, bias.as_ref(), 1, &[1, 1], &[1, 1], &[1, 1, 1, 1]).apply(&x));
    assert_close(&only_conv(&m).apply(&x), &want, 1e-5, "conv+BN");
}

// ---------------------------------------------------------------------------------------------
// merge_branches: geometry

#[test]
fn case_refuse_different_stride() {
    // 3x3 stride 2 and 1x1 stride 3, both 2x2 outputs on a 5x5 input
    let b = two_branch(
        &[3, 3],
        ConvAttrs::pads(&[0, 0, 0, 0]).strides(&[2, 2]),
        &[1, 1],
        ConvAttrs::default().strides(&[3, 3]),
    );
    expect_refusal(&b, "merge_branches", "sum", "stride 3 vs 2");
}

#[test]
fn case_refuse_different_dilation() {
    let b =
        two_branch(&[3, 3], ConvAttrs::pads(&[2, 2, 2, 2]).dilations(&[2, 2]), &[3, 1], ConvAttrs::pads(&[1, 0, 1, 0]));
    expect_refusal(&b, "merge_branches", "sum", "dilation 1 vs 2");
}

#[test]
fn case_refuse_different_groups() {
    let b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 1], ConvAttrs::default().group(3));
    expect_refusal(&b, "merge_branches", "sum", "groups 3 vs 1");
}

#[test]
fn case_refuse_different_output_channels() {
    // a 1-channel branch broadcasts onto the 3-channel one
    let b = two_branch_ch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), C, &[1, 1], ConvAttrs::default(), 1, C);
    expect_refusal(&b, "merge_branches", "sum", "output channels");
}

#[test]
fn case_refuse_kernel_that_does_not_fit() {
    // 1x5 pads (0,2) keeps the output size of a 3x3 pad 1 but sticks out of it
    let b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 5], ConvAttrs::pads(&[0, 2, 0, 2]));
    expect_refusal(&b, "merge_branches", "sum", "does not fit");
}

#[test]
fn case_refuse_paddings_changing_output_size() {
    // on the 5x5 input the model runs at, the 1x3 without padding has 3 columns, the 3x3 5
    let mut b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 3], ConvAttrs::pads(&[0, 0, 0, 0]));
    expect_refusal(&b, "merge_branches", "sum", "output size 3 vs 5 on axis 1 (input size 5)");
    // on an input of any size (symbolic H, W), at every size
    symbolic_input(&mut b, "x", &[Some(1), Some(C), None, None]);
    expect_refusal(&b, "merge_branches", "sum", "different output size on axis 1 at some input sizes");
}

#[test]
fn case_refuse_auto_pad_by_the_input_size_when_it_is_not_fixed() {
    // SAME_UPPER at stride 2 pads by the input size: resolved at a fixed one, refused at any
    let same = |b: &mut Builder| {
        for n in b.graph.node.iter_mut().filter(|n| n.op_type() == "Conv") {
            n.attribute.retain(|a| a.name() != "pads");
            n.attribute.push(attr_string("auto_pad", "SAME_UPPER"));
        }
    };
    let mut b =
        two_branch(&[3, 3], ConvAttrs::default().strides(&[2, 2]), &[1, 1], ConvAttrs::default().strides(&[2, 2]));
    same(&mut b);
    expect_fused(&b, &[("Conv", 1)]);
    symbolic_input(&mut b, "x", &[Some(1), Some(C), None, None]);
    expect_refusal(
        &b,
        "merge_branches",
        "sum",
        "auto_pad SAME_UPPER with stride > 1 pads by the input size, which is not fixed",
    );
}

// ---------------------------------------------------------------------------------------------
// merge_branches: graph structure

#[test]
fn case_refuse_weight_not_constant() {
    let mut b = Builder::new(C, 5, 5);
    let w = b.input("w", &[C, C, 3, 3]);
    let a = b.conv_with("big", &["x", &w], &[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]));
    let (c, _, _) = b.conv_rand("small", "x", C, C, &[1, 3], false, ConvAttrs::pads(&[0, 1, 0, 1]));
    b.node("Add", "sum", &[&a, &c], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "'w' is a graph input, not a constant");
}

#[test]
fn case_refuse_weight_initializer_overridable_by_input() {
    // an initializer also listed as a graph input can be overridden at run time
    let mut b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 3], ConvAttrs::pads(&[0, 1, 0, 1]));
    b.input("small.w", &[C, C, 1, 3]);
    expect_refusal(&b, "merge_branches", "sum", "not a constant");
}

#[test]
fn case_refuse_branch_output_is_graph_output() {
    let mut b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 3], ConvAttrs::pads(&[0, 1, 0, 1]));
    b.output("small.y");
    expect_refusal(&b, "merge_branches", "sum", "output of Conv 'small' is also used outside the block");
}

#[test]
fn case_refuse_branch_output_read_by_another_node() {
    let mut b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 3], ConvAttrs::pads(&[0, 1, 0, 1]));
    b.node("Relu", "relu", &["big.y"], &["z"], vec![]);
    b.output("z");
    expect_refusal(&b, "merge_branches", "sum", "output of Conv 'big' is also used outside the block");
}

#[test]
fn case_refuse_pad_in_reflect_mode() {
    let mut b = Builder::new(C, 5, 5);
    let (a, _, _) = b.conv_rand("big", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let p = b.pad("pad", "x", &[0, 0, 0, 1, 0, 0, 0, 1], Some("reflect"));
    let (c, _, _) = b.conv_rand("small", &p, C, C, &[1, 3], false, ConvAttrs::default());
    b.node("Add", "sum", &[&a, &c], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "Pad in reflect mode");
}

#[test]
fn case_refuse_pad_with_nonzero_value() {
    let mut b = Builder::new(C, 5, 5);
    let (a, _, _) = b.conv_rand("big", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let v = b.initializer("pad.value", &ArrayD::from_elem(ndarray::IxDyn(&[]), 0.5));
    let pads = b.initializer_i64("pad.pads", &[0, 0, 0, 1, 0, 0, 0, 1]);
    let p = b.node("Pad", "pad", &["x", &pads, &v], &[], vec![]);
    let (c, _, _) = b.conv_rand("small", &p, C, C, &[1, 3], false, ConvAttrs::default());
    b.node("Add", "sum", &[&a, &c], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "not zero");
}

#[test]
fn case_refuse_slice_with_step_2() {
    let mut b = Builder::new(C, 5, 5);
    // x[:, :, :, ::2] (W 5 -> 3) through a 3x1: a 3x3 output like the 3x3 pad 0 branch
    let (a, _, _) = b.conv_rand("big", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[0, 0, 0, 0]));
    let sl = b.slice("crop", "x", &[0], &[i64::MAX], &[3], Some(&[2][..]));
    let (c, _, _) = b.conv_rand("small", &sl, C, C, &[3, 1], false, ConvAttrs::default());
    b.node("Add", "sum", &[&a, &c], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "step other than 1");
}

#[test]
fn case_refuse_weight_dtype_int8_and_uint8() {
    for (dt, code) in [(DataType::Int8, 3), (DataType::Uint8, 2)] {
        let mut b = Builder::new(C, 5, 5);
        let (a, _, _) = b.conv_rand("big", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
        let w = b.initializer_raw("small.w", dt, &[C, C, 1, 3], (0..C * C * 3).map(|i| i as u8).collect());
        let c = b.conv_with("small", &["x", &w], &[1, 3], ConvAttrs::pads(&[0, 1, 0, 1]));
        b.node("Add", "sum", &[&a, &c], &["y"], vec![]);
        b.output("y");
        expect_refusal(
            &b,
            "merge_branches",
            "sum",
            &format!("data type {code}, which the kernel maths does not handle"),
        );
    }
}

#[test]
fn case_refuse_identity_bn_in_training_mode() {
    // RepVGG whose identity BatchNormalization is in training mode
    let mut b = Builder::new(C, 4, 4);
    let (y1, _, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (y2, _, _) = b.conv_rand("c1x1", "x", C, C, &[1, 1], true, ConvAttrs::default());
    let (z3, _) = b.bn("bn_id", "x", C, Some(1));
    let s12 = b.add("add12", &y1, &y2);
    b.node("Add", "sum", &[&s12, &z3], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "training mode");
}

#[test]
fn case_refuse_identity_on_a_conv_changing_channels() {
    // x itself added to a conv mapping 3 channels to 1 (broadcast by the Add): no identity kernel
    let mut b = Builder::new(C, 4, 4);
    let (y1, _, _) = b.conv_rand("c3x3", "x", 1, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    b.node("Add", "sum", &[&y1, "x"], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "identity branch");
}

// ---------------------------------------------------------------------------------------------
// fold_bn

#[test]
fn case_refuse_bn_in_training_mode() {
    let mut b = Builder::new(C, 4, 4);
    let (y, _, _) = b.conv_rand("conv", "x", 2, C, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (_, p) = b.bn("bn", &y, 2, Some(1));
    b.graph.node.last_mut().unwrap().output = vec!["y".into()];
    b.output("y");
    expect_refusal(&b, "fold_bn", "bn", "BatchNormalization in training mode");
    // with the statistics outputs wired (training_mode 0 but running stats requested)
    let mut b = Builder::new(C, 4, 4);
    let (y, _, _) = b.conv_rand("conv", "x", 2, C, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
    b.bn_with("bn", &y, &p, None, &["y", "running_mean", "running_var"]);
    b.output("y");
    expect_refusal(&b, "fold_bn", "bn", "training mode outputs");
}

#[test]
fn case_refuse_bn_after_conv_used_elsewhere() {
    let mut b = Builder::new(C, 4, 4);
    let (y, _, _) = b.conv_rand("conv", "x", 2, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (z, _) = b.bn("bn", &y, 2, None);
    b.graph.node.last_mut().unwrap().output = vec!["y".into()];
    let _ = z;
    b.output("y");
    b.output(&y);
    expect_refusal(&b, "fold_bn", "bn", "output of Conv 'conv' is also used outside the block");
}

#[test]
fn case_refuse_bn_after_conv_with_uint8_weight() {
    let mut b = Builder::new(C, 4, 4);
    let w = b.initializer_raw("conv.w", DataType::Uint8, &[2, C, 3, 3], vec![1; 2 * C * 9]);
    let y = b.conv_with("conv", &["x", &w], &[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]));
    b.bn("bn", &y, 2, None);
    b.graph.node.last_mut().unwrap().output = vec!["y".into()];
    b.output("y");
    expect_refusal(&b, "fold_bn", "bn", "data type 2, which the kernel maths does not handle");
}

#[test]
fn case_refuse_bn_with_channel_count_mismatch() {
    let mut b = Builder::new(C, 4, 4);
    let (y, _, _) = b.conv_rand("conv", "x", 2, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    b.bn("bn", &y, 3, None);
    b.graph.node.last_mut().unwrap().output = vec!["y".into()];
    b.output("y");
    expect_refusal(&b, "fold_bn", "bn", "BatchNormalization of 3 channels after a Conv of 2");
}

// the builder's own output is a valid ModelProto for other tools
#[test]
fn case_builder_model_header() {
    let b = two_branch(&[3, 3], ConvAttrs::pads(&[1, 1, 1, 1]), &[1, 3], ConvAttrs::pads(&[0, 1, 0, 1]));
    let m = b.model();
    assert_eq!(m.ir_version, Some(8));
    assert_eq!(m.producer_name.as_deref(), Some("test"));
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!((m.opset_import[0].domain.as_deref(), m.opset_import[0].version), (Some(""), Some(17)));
    let g = graph(&m);
    assert!(g.node.iter().all(|n| n.name.as_deref().is_some_and(|s| !s.is_empty())));
    let conv = g.node.iter().find(|n| n.name() == "small").unwrap();
    let k = conv_of(&m, conv);
    assert_eq!(
        (k.kernel(), k.pads_begin.as_slice(), k.pads_end.as_slice()),
        (&[1usize, 3][..], &[0i64, 1][..], &[0i64, 1][..])
    );
    let _: &AffineConv = &k;
}

// ---------------------------------------------------------------------------------------------
// untouched blocks, and what they report

#[test]
fn case_refuse_largest_kernel_reads_cropped_input() {
    // the 3x3 (the merged conv's geometry) reads x[:, :, :, 1:-1]
    let mut b = Builder::new(C, 5, 6);
    let sv = b.slice("crop_w", "x", &[1], &[-1], &[3], None);
    let (y1, _, _) = b.conv_rand("c3x3", &sv, C, C, &[3, 3], false, ConvAttrs::pads(&[1, 0, 1, 0]));
    let (y2, _, _) = b.conv_rand("c1x1", "x", C, C, &[1, 1], false, ConvAttrs::default());
    b.node("Add", "sum", &[&y1, &y2], &["y"], vec![]);
    b.output("y");
    expect_refusal(&b, "merge_branches", "sum", "reads a cropped input");
}

#[test]
fn case_cropped_refusal_reason_is_short() {
    let mut b = Builder::new(C, 5, 6);
    let sv = b.slice("crop_w", "x", &[1], &[-1], &[3], None);
    let (y1, _, _) = b.conv_rand("c3x3", &sv, C, C, &[3, 3], false, ConvAttrs::pads(&[1, 0, 1, 0]));
    let (y2, _, _) = b.conv_rand("c1x1", "x", C, C, &[1, 1], false, ConvAttrs::default());
    b.node("Add", "sum", &[&y1, &y2], &["y"], vec![]);
    b.output("y");
    let r = expect_refusal(&b, "merge_branches", "sum", "cropped input");
    let reason = &r.refused.iter().find(|f| f.rule == "merge_branches").unwrap().reason.to_string();
    assert!(reason.len() < 200, "reason of {} characters: {reason}", reason.len());
}

#[test]
fn case_leaked_conv_next_to_identity_is_reported() {
    // y = conv(x) + x, with conv(x) also a graph output: left untouched, but with no reason
    let mut b = Builder::new(C, 5, 5);
    let (y1, _, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    b.node("Add", "sum", &[&y1, "x"], &["y"], vec![]);
    b.output("y");
    b.output(&y1);
    expect_refusal(&b, "merge_branches", "sum", "output of Conv 'c3x3' is also used outside the block");
}

#[test]
fn case_crop_slice_read_elsewhere_is_untouched() {
    // the Slice feeding the 3x1 is read by another node too: the block must stay (merge_branches
    // sees two single-branch groups; the general rule reports the shared tensor)
    let mut b = Builder::new(C, 5, 6);
    let (y1, _, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[0, 0, 0, 0]));
    let sv = b.slice("crop_w", "x", &[1], &[-1], &[3], None);
    let (y2, _, _) = b.conv_rand("c3x1", &sv, C, C, &[3, 1], false, ConvAttrs::default());
    b.node("Add", "sum", &[&y1, &y2], &["y"], vec![]);
    b.output("y");
    b.node("Relu", "relu", &[&sv], &["z"], vec![]);
    b.output("z");
    let mut m = b.build();
    let before = m.proto.clone();
    let r = fuse(&mut m).unwrap();
    assert!(r.rewrites.is_empty(), "{:?}", r.rewrites);
    assert_eq!(m.proto, before);
    assert!(r.refused.iter().any(|f| f.node == "sum"), "no reason given: {:?}", r.refused);
}

#[test]
fn case_bn_output_leaking_folds_but_does_not_merge() {
    // ACB-like with BN per branch, one BN output also a graph output: both BNs fold (the folded
    // conv writes the BN's output), then the merge is refused because that output leaks
    let mut b = Builder::new(C, 5, 5);
    let (y1, _, _) = b.conv_rand("c3x3", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (z1, _) = b.bn("bn3x3", &y1, C, None);
    let (y2, _, _) = b.conv_rand("c1x3", "x", C, C, &[1, 3], false, ConvAttrs::pads(&[0, 1, 0, 1]));
    let (z2, _) = b.bn("bn1x3", &y2, C, None);
    b.node("Add", "sum", &[&z1, &z2], &["y"], vec![]);
    b.output("y");
    b.output(&z2);
    let mut m = b.build();
    let r = fuse(&mut m).unwrap();
    assert_eq!(r.bns_folded, 2);
    assert_eq!(r.blocks_merged, 0);
    let mine: Vec<_> = r.refused.iter().filter(|f| f.rule == "merge_branches").collect();
    assert_eq!(mine.len(), 1, "{:?}", r.refused);
    assert!(
        mine[0].reason.to_string().contains("output of Conv 'c1x3' is also used outside the block"),
        "{:?}",
        mine[0]
    );
    let want: BTreeMap<String, usize> = [("Add".to_string(), 1), ("Conv".to_string(), 2)].into_iter().collect();
    assert_eq!(r.after.ops, want);
    // the graph outputs are still written
    let g = graph(&m.proto);
    for o in ["y", "bn1x3.y"] {
        assert!(g.node.iter().any(|n| n.output.iter().any(|t| t == o)), "{o} not written");
    }
}

/// Found by cargo-fuzz: a per-channel scale reshaped to a target whose dims multiply past i64
/// (`[2^62, 4, -1]`) overflowed while inferring the `-1`. Such a target is no reshape of the
/// constant: the Mul is not a constant scale, the branches are not merged, nothing panics.
#[test]
fn case_reshape_target_overflowing_is_not_a_constant_scale() {
    let mut b = Builder::new(C, 5, 5);
    let (a, _, _) = b.conv_rand("a", "x", C, C, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (c, _, _) = b.conv_rand("c", "x", C, C, &[1, 1], false, ConvAttrs::pads(&[0, 0, 0, 0]));
    let s = b.rand(&[C]);
    let s = b.initializer("s", &s);
    let shape = b.initializer_i64("shape", &[1 << 62, 4, -1]);
    let r = b.node("Reshape", "r", &[&s, &shape], &[], vec![]);
    let scaled = b.node("Mul", "scale", &[&c, &r], &[], vec![]);
    let y = b.add("sum", &a, &scaled);
    b.output(&y);
    let mut m = b.build();
    let before = m.proto.clone();
    let r = fuse(&mut m).unwrap();
    assert!(r.rewrites.is_empty(), "{:?}", r.rewrites);
    assert_eq!(m.proto, before);
}

/// A float16 Conv → BN whose folded weights pass float16's range is refused, not written as
/// infinities; one whose tiny folded weights would round to zero likewise.
#[test]
fn case_fold_that_float16_cannot_hold_is_refused() {
    for (gamma, var, phrase) in [(6000.0, 1e-4, "beyond its range"), (1e-4, 1e4, "would round to zero")] {
        let mut b = Builder::new(2, 5, 5);
        b.dtype = acnet_onnx::tensor::FloatType::F16;
        let (y, _, _) = b.conv_rand("conv", "x", 2, 2, &[3, 3], false, ConvAttrs::pads(&[1, 1, 1, 1]));
        let ones = ndarray::Array1::from_elem(2, 1.0);
        let p = Bn {
            scale: &ones * gamma,
            bias: ndarray::Array1::zeros(2),
            mean: ndarray::Array1::zeros(2),
            var: &ones * var,
            epsilon: 0.0,
        };
        let z = b.bn_with("bn", &y, &p, None, &[]);
        b.output(&z);
        let r = expect_refusal(&b, "fold_bn", "bn", phrase);
        assert!(r.refused[0].reason.to_string().contains("as float16"), "{:?}", r.refused);
    }
}

/// Merged weights whose output channels differ in range so much that per-tensor int8 would
/// crush most of them are flagged in the summary and the report (per merged Conv).
#[test]
fn case_merged_weights_that_int8_would_crush_are_flagged() {
    let mut b = Builder::new(2, 6, 6);
    let mut w = b.rand(&[4, 2, 3, 3]);
    w.slice_mut(s![0, .., .., ..]).mapv_inplace(|v| v * 1000.0);
    let sq = b.conv("sq", "x", &w, None, ConvAttrs::pads(&[1, 1, 1, 1]));
    let (one, _, _) = b.conv_rand("one", "x", 4, 2, &[1, 1], false, ConvAttrs::default());
    let y = b.add("sum", &sq, &one);
    b.output(&y);
    let mut m = b.build();
    let r = fuse(&mut m).unwrap();
    let stats = &r.rewrites[0].weights[0];
    assert_eq!((stats.conv.as_str(), stats.channels, stats.int8_crushed_channels), ("sq", 4, 3), "{stats:?}");
    assert!(stats.channel_max_abs_max > 100.0 * stats.channel_max_abs_min);
    assert!(
        r.summary().contains("warning: Conv 'sq': per-tensor int8 would crush 3 of 4 output channels"),
        "{}",
        r.summary()
    );
}
