//! The checks of a fused block: against the reference computed here, and in tract.

use super::*;

/// The same block with every negative Pad amount (a crop) moved into the Slice, and the Pad
/// node's padding into the Conv's pads where that is the same function. tract 0.23 cannot run a
/// Pad with negative pads (its eval panics), so this is the graph tract runs instead.
pub(crate) fn without_negative_pads(bl: &Block) -> Block {
    let r = bl.rank();
    let mut t = bl.clone();
    for br in &mut t.branches {
        let Kind::Conv(g) = &mut br.kind else { continue };
        let Some((pb, pe)) = &mut g.pad else { continue };
        for a in 0..r {
            for (side, v) in [(0, &mut pb[a]), (1, &mut pe[a])] {
                if *v < 0 {
                    let c = g.crop.get_or_insert_with(|| (vec![0; r], vec![0; r]));
                    if side == 0 {
                        c.0[a] += -*v;
                    } else {
                        c.1[a] += -*v;
                    }
                    *v = 0;
                }
            }
        }
        // zero padding before the conv is the conv's own padding, unless that side is cropped
        // after it
        let (pb, pe) = (pb.clone(), pe.clone());
        let cropped =
            |side: usize, a: usize| g.crop.as_ref().is_some_and(|c| if side == 0 { c.0[a] > 0 } else { c.1[a] > 0 });
        if (0..r).all(|a| (pb[a] == 0 || !cropped(0, a)) && (pe[a] == 0 || !cropped(1, a))) {
            materialise_pads(&bl.input, g);
            for a in 0..r {
                g.pads[a] += pb[a];
                g.pads[r + a] += pe[a];
            }
            g.pad = None;
        }
    }
    t
}

/// The same model with every Pad of constant negative amounts split into a Slice (the crops)
/// and a Pad of the rest: the same function, which tract 0.23 can run (its Pad cannot crop).
pub(crate) fn tract_runnable(m: &Model) -> Model {
    let mut p = m.proto.clone();
    let opset = p
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(1);
    let g = p.graph.as_mut().unwrap();
    let mut inits = Vec::new();
    let mut nodes = Vec::new();
    for mut n in std::mem::take(&mut g.node) {
        if n.op_type() == "Pad" {
            let in_attr = n.attribute.iter().position(|a| a.name() == "pads" || a.name() == "paddings");
            let pads = match in_attr {
                Some(k) => Some(n.attribute[k].ints.clone()),
                None => n
                    .input
                    .get(1)
                    .and_then(|name| g.initializer.iter().find(|t| t.name() == name))
                    .and_then(|t| to_i64(t, t.raw_data.as_deref()).ok()),
            };
            if let Some(pads) = pads.filter(|v| v.iter().any(|&x| x < 0)) {
                let rank = pads.len() / 2;
                let axes: Vec<i64> =
                    (0..rank).filter(|&a| pads[a] < 0 || pads[rank + a] < 0).map(|a| a as i64).collect();
                let starts: Vec<i64> = axes.iter().map(|&a| (-pads[a as usize]).max(0)).collect();
                let ends: Vec<i64> = axes
                    .iter()
                    .map(|&a| if pads[rank + a as usize] < 0 { pads[rank + a as usize] } else { i64::MAX })
                    .collect();
                let name = format!("{}.crop", n.name());
                let out = format!("{name}.y");
                let mut slice = NodeProto {
                    name: Some(name.clone()),
                    op_type: Some("Slice".into()),
                    input: vec![n.input[0].clone()],
                    output: vec![out.clone()],
                    ..Default::default()
                };
                if opset < 10 {
                    slice.attribute =
                        vec![attr_ints("starts", &starts), attr_ints("ends", &ends), attr_ints("axes", &axes)];
                } else {
                    for (k, v) in [("starts", &starts), ("ends", &ends), ("axes", &axes)] {
                        inits.push(from_i64(&format!("{name}.{k}"), &[v.len() as i64], v));
                        slice.input.push(format!("{name}.{k}"));
                    }
                }
                let rest: Vec<i64> = pads.iter().map(|&v| v.max(0)).collect();
                match in_attr {
                    Some(k) => n.attribute[k].ints = rest,
                    None => {
                        inits.push(from_i64(&format!("{name}.pads"), &[rest.len() as i64], &rest));
                        n.input[1] = format!("{name}.pads");
                    }
                }
                n.input[0] = out;
                nodes.push(slice);
            }
        }
        nodes.push(n);
    }
    g.node = nodes;
    g.initializer.extend(inits);
    Model::from_proto(p).unwrap()
}

pub(crate) fn tract_verify(reference: &Model, candidate: &Model) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let a = save(reference, &dir.path().join("reference.onnx"), DataMode::Inline).map_err(|e| e.to_string())?.model;
    let b = save(candidate, &dir.path().join("fused.onnx"), DataMode::Inline).map_err(|e| e.to_string())?.model;
    let rep = verify(&a, &b, &VerifyOptions { samples: 1, ..Default::default() })
        .map_err(|e| format!("verify error: {e}"))?;
    if !rep.passed {
        return Err(format!("tract: not equivalent\n{}", rep.table()));
    }
    Ok(())
}

/// `got` equals `want` within `tol` relative to the largest |want|.
pub(crate) fn close(got: &ArrayD<f64>, want: &ArrayD<f64>, tol: f64) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!("shapes {:?} vs {:?}", got.shape(), want.shape()));
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if scale < 1e-3 {
        return Err(format!("reference is (almost) zero ({scale}), the check would be vacuous"));
    }
    let d = got.iter().zip(want.iter()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    if d > tol * scale.max(1.0) {
        return Err(format!("max abs diff {d:.3e} > {tol:e} x {scale:.3}"));
    }
    Ok(())
}

pub(crate) fn fail(what: &str, detail: impl std::fmt::Display, r: &FuseReport) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {detail}\n--- fuse report ---\n{}rewrites: {:?}", r.summary(), r.rewrites))
}

/// The single Conv of the fused model against the branches, on a random input.
/// The Conv writing `y`, read by `support` (an `auto_pad` made explicit first).
pub(crate) fn fused_conv(m: &Model, input: &[usize]) -> acnet_onnx::kernel::AffineConv {
    let g = graph(&m.proto);
    let convs: Vec<_> = g.node.iter().filter(|n| n.op_type() == "Conv" && n.output.iter().any(|o| o == "y")).collect();
    assert_eq!(convs.len(), 1, "expected one Conv writing y");
    let mut n = convs[0].clone();
    if let Some(ap) = n.attribute.iter().find(|a| a.name() == "auto_pad").and_then(|a| a.s.clone()) {
        let ap = String::from_utf8(ap).unwrap();
        if ap != "NOTSET" {
            let w = init_f64(&m.proto, &n.input[1]);
            let r = w.ndim() - 2;
            let ints =
                |name: &str| n.attribute.iter().find(|a| a.name() == name).map_or(vec![1; r], |a| a.ints.clone());
            let geo = Geo {
                kernel: w.shape()[2..].to_vec(),
                strides: ints("strides").iter().map(|&v| v as usize).collect(),
                dilations: ints("dilations").iter().map(|&v| v as usize).collect(),
                pads: vec![0; 2 * r],
                auto_pad: Some(match ap.as_str() {
                    "SAME_UPPER" => AutoPad::SameUpper,
                    "SAME_LOWER" => AutoPad::SameLower,
                    _ => AutoPad::Valid,
                }),
                crop: None,
                pad: None,
                groups: 1,
                out: 1,
            };
            let (pb, pe): (Vec<i64>, Vec<i64>) = (0..r).map(|a| eff_pads(&geo, a, input[a] as i64)).unzip();
            n.attribute.retain(|a| a.name() != "auto_pad" && a.name() != "pads");
            n.attribute.push(attr_ints("pads", &[pb, pe].concat()));
        }
    }
    conv_of(&m.proto, &n)
}

pub(crate) fn check_independent(bl: &Block, built: &Built, m: &Model, tol: f64) -> Result<(), String> {
    let conv = fused_conv(m, &bl.input);
    let shape: Vec<usize> = [1, bl.cin].iter().chain(&bl.input).copied().collect();
    let input = rand_input(bl.seed ^ 0x9e37, &shape);
    let x = pre_apply(bl, built, &input);
    let want = reference(bl, built, &x);
    // the fused conv reads x, or the graph input when the node before x (a 1x1 Conv, a
    // BatchNormalization) was merged into it
    let reads_input =
        graph(&m.proto).node.iter().any(|n| n.op_type() == "Conv" && n.output[0] == "y" && n.input[0] == "input");
    let got = conv.apply(if reads_input { &input } else { &x });
    if want.iter().all(|&v| v == 0.0) {
        // every output tap of every branch reads padding (a dilated kernel wider than the
        // padded input): the block is the zero map, and so must the fused conv be
        let worst = got.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        return if worst <= tol {
            Ok(())
        } else {
            Err(format!("the block is zero here, the fused conv gives {worst:.3e}"))
        };
    }
    if want.iter().all(|v| v.abs() < 1e-3) {
        // the branches cancel (one output element, a sum of a few random terms): the rounding of
        // the merged weights is relative to the terms summed, |W|·|x| + |b|, not to their sum
        let mut abs = conv.clone();
        abs.weight.mapv_inplace(f64::abs);
        abs.bias.mapv_inplace(f64::abs);
        let terms = abs.apply(&(if reads_input { &input } else { &x }).mapv(f64::abs));
        let scale = terms.iter().fold(0.0f64, |m, v| m.max(*v));
        let d = got.iter().zip(want.iter()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        return if d <= tol * scale.max(1e-3) {
            Ok(())
        } else {
            Err(format!("max abs diff {d:.3e} > {tol:e} x {scale:.3} (the terms summed; the output is at most 1e-3)"))
        };
    }
    close(&got, &want, tol)
}

/// The node before x (a 1x1 Conv, a BatchNormalization, a Mul by a constant) may merge into the
/// block's Conv (merge_sequential, fold_bn_forward, fold_affine), or stay with the reason (its
/// bias or shift would meet the block's zero padding, an identity branch reads it): what the
/// block's rules do is the same either way.
pub(crate) fn pre_merged_or_refused(bl: &Block, r: &FuseReport) -> bool {
    let pre = [RuleId::MERGE_SEQUENTIAL, RuleId::FOLD_BN_FORWARD, RuleId::FOLD_AFFINE];
    matches!(bl.pre, Pre::Conv | Pre::ConvBn | Pre::Bn | Pre::Mul) && r.refused.iter().all(|f| pre.contains(&f.rule))
}

/// The operators of the block once fused: one Conv, and what is outside the block.
pub(crate) fn fused_ops(bl: &Block) -> BTreeMap<String, usize> {
    let mut ops: BTreeMap<String, usize> = [("Conv".to_string(), 1)].into();
    let mut add = |op: &str| *ops.entry(op.to_string()).or_insert(0) += 1;
    match bl.pre {
        Pre::None => {}
        Pre::Relu => add("Relu"),
        Pre::Mul => add("Mul"),
        Pre::Conv | Pre::ConvBn => add("Conv"),
        Pre::Bn => add("BatchNormalization"),
    }
    if bl.bystander {
        add("Conv");
    }
    ops
}

/// [`fused_ops`], and the same without the node before x when it can merge into the block's Conv.
pub(crate) fn fused_ops_any(bl: &Block) -> Vec<BTreeMap<String, usize>> {
    let mut v = vec![fused_ops(bl)];
    if matches!(bl.pre, Pre::Conv | Pre::ConvBn | Pre::Bn | Pre::Mul) {
        let mut without = fused_ops(bl);
        let op = match bl.pre {
            Pre::Bn => "BatchNormalization",
            Pre::Mul => "Mul",
            _ => "Conv",
        };
        *without.get_mut(op).unwrap() -= 1;
        without.retain(|_, v| *v > 0);
        v.push(without);
    }
    v
}

pub(crate) fn check_aligned(bl: &Block) -> Result<(), TestCaseError> {
    let shapes = leaf_shapes(bl).map_err(|e| TestCaseError::fail(format!("generator made an invalid block: {e}")))?;
    let mut all = shapes.clone();
    if let Some(op) = bl.const_bias {
        all.push(form_shape(op.form, bl.cout, bl.rank()));
    }
    let out = broadcast(&all)
        .ok_or_else(|| TestCaseError::fail(format!("generator made misaligned branches: {shapes:?}")))?;
    if shapes.iter().any(|s| s != &out) {
        return Err(TestCaseError::fail(format!("generator made branches of different shapes: {shapes:?}")));
    }
    let built = build(bl);
    let original = built.builder.build();
    let mut m = built.builder.build();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    if !r.refused.is_empty() && !pre_merged_or_refused(bl, &r) {
        return Err(fail("refused a valid block", format!("{:?}", r.refused), &r));
    }
    if !fused_ops_any(bl).contains(&r.after.ops) {
        return Err(fail("not one Conv", format!("{:?}, want {:?}", r.after.ops, fused_ops(bl)), &r));
    }
    let conv = fused_conv(&m, &bl.input);
    if conv.kernel() != vec![bl.k; bl.rank()].as_slice() {
        return Err(fail("merged kernel", format!("{:?}, want {}^{}", conv.kernel(), bl.k, bl.rank()), &r));
    }
    check_independent(bl, &built, &m, 1e-6).map_err(|e| fail("fused conv vs the branches computed here", e, &r))?;
    tract_verify(&tract_runnable(&original), &tract_runnable(&m)).map_err(|e| fail("tract", e, &r))?;
    Ok(())
}

pub(crate) fn check_misaligned(bl: &Block) -> Result<(), TestCaseError> {
    let shapes = match leaf_shapes(bl) {
        Ok(s) => s,
        Err(_) => return Err(TestCaseError::reject("invalid conv")),
    };
    let mut all = shapes.clone();
    if let Some(op) = bl.const_bias {
        all.push(form_shape(op.form, bl.cout, bl.rank()));
    }
    let Some(out) = broadcast(&all) else { return Err(TestCaseError::reject("branch shapes do not broadcast")) };
    if bl.bn_after.is_some() && out[1] != bl.cout {
        return Err(TestCaseError::reject("BN after the sum of the wrong width"));
    }
    let built = build(bl);
    let original = built.builder.build();
    let mut m = built.builder.build();
    let before = m.proto.clone();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    if m.proto == before {
        if r.refused.is_empty() {
            return Err(fail("untouched, but no reason given", "", &r));
        }
        return Ok(());
    }
    tract_verify(&tract_runnable(&original), &tract_runnable(&m))
        .map_err(|e| fail("a rewrite that tract does not confirm", e, &r))?;
    if fused_ops_any(bl).contains(&r.after.ops) {
        // the general path's weights carry float32 rounding
        let tol = if r.rewrites.iter().any(|w| w.rule == "affine_region") { 1e-5 } else { 1e-6 };
        check_independent(bl, &built, &m, tol).map_err(|e| fail("fused conv vs the branches computed here", e, &r))?;
    }
    Ok(())
}
