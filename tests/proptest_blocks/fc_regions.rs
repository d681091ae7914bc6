//! Sums around an FC (merge_into_fc): RepMLP's partitioned FC with local conv branches, and
//! linear layers with linear branches beside them.

use super::*;
use acnet_onnx::{FcMisfit, Reason};

/// A conv branch of a RepMLP block: kernel, groups 1 (joining the sharesets) or S, a BN, a bias.
#[derive(Clone, Debug)]
pub(crate) struct LocalConv {
    pub(crate) k: usize,
    pub(crate) joins_groups: bool,
    pub(crate) bn: bool,
    pub(crate) bias: bool,
}

#[derive(Clone, Debug)]
pub(crate) enum FcBlock {
    /// RepMLP: x [N, C, h·hp, w·wp] partitioned into hp x wp patches of h x w; a grouped FC (a
    /// 1x1 Conv of S groups on [N·hp·wp·C/S, S·h·w, 1, 1]), reshaped to [., S, h, w], a BN if
    /// asked, reshaped to [., hp, wp, S, h, w]; local convs on [., S, h, w] reshaped the same way;
    /// a 3x3 conv on the whole image (crossing the patches) partitioned the same way, if asked;
    /// summed in a shuffled order (with a TorchScript `0 +` accumulator, if asked), un-partitioned.
    RepMlp {
        batch: usize,
        s: usize,
        c_per_s: usize,
        hw: (usize, usize),
        parts: (usize, usize),
        fc_bias: bool,
        fc_bn: bool,
        convs: Vec<LocalConv>,
        whole_image: bool,
        accumulator: bool,
    },
    /// x [N, L, K] (or [N, K] with a Gemm): MatMul(x, W) [times a per-feature constant], plus
    /// more MatMuls of x, x itself (K = M) and x times a per-feature constant (K = M), summed.
    Linear {
        batch: usize,
        tokens: Option<usize>,
        k: usize,
        m: usize,
        gemm: bool,
        scale: bool,
        more: usize,
        identity: bool,
        scaled_x: bool,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct FcCase {
    pub(crate) seed: u64,
    pub(crate) block: FcBlock,
}

pub(crate) fn gen_fc(v: &[u16]) -> FcCase {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let batch = 1 + ch.pick(2);
    let block = if ch.chance(70) {
        let s = 1 + ch.pick(3);
        let convs = (0..1 + ch.pick(3))
            .map(|_| LocalConv {
                k: ch.of(&[1, 3, 5]),
                joins_groups: s > 1 && ch.chance(12),
                bn: ch.chance(60),
                bias: ch.chance(40),
            })
            .collect();
        let parts = (1 + ch.pick(2), 1 + ch.pick(2));
        FcBlock::RepMlp {
            batch,
            s,
            c_per_s: 1 + ch.pick(2),
            hw: (1 + ch.pick(4), 1 + ch.pick(4)),
            parts,
            fc_bias: ch.chance(30),
            fc_bn: ch.chance(70),
            convs,
            whole_image: parts.0 * parts.1 > 1 && ch.chance(12),
            accumulator: ch.chance(20),
        }
    } else {
        let k = 1 + ch.pick(6);
        let m = if ch.chance(60) { k } else { 1 + ch.pick(6) };
        let gemm = ch.chance(30);
        FcBlock::Linear {
            batch,
            tokens: (!gemm).then(|| 1 + ch.pick(5)),
            k,
            m,
            gemm,
            scale: ch.chance(40),
            more: ch.pick(3),
            identity: k == m && ch.chance(60),
            scaled_x: k == m && ch.chance(30),
        }
    };
    FcCase { seed, block }
}

/// The block's graph, and its input's shape.
fn build_fc(case: &FcCase) -> (Builder, Vec<usize>) {
    let mut b = Builder::new(1, 1, 1);
    b.rng = StdRng::seed_from_u64(case.seed);
    let mut order = StdRng::seed_from_u64(case.seed ^ 1);
    let input = |b: &mut Builder, shape: &[usize]| {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        b.graph.input[0] = tensor_info("x", DataType::Float, &dims);
    };
    let sum = |b: &mut Builder, name: &str, mut terms: Vec<String>, order: &mut StdRng| {
        terms.shuffle(order);
        let mut acc = terms[0].clone();
        for (j, t) in terms.iter().enumerate().skip(1) {
            acc = b.add(&format!("{name}{j}"), &acc, t);
        }
        acc
    };
    match &case.block {
        FcBlock::RepMlp { batch, s, c_per_s, hw, parts, fc_bias, fc_bn, convs, whole_image, accumulator } => {
            let (n, s, c) = (*batch as i64, *s as i64, (s * c_per_s) as i64);
            let ((h, w), (hp, wp)) = ((hw.0 as i64, hw.1 as i64), (parts.0 as i64, parts.1 as i64));
            let shape = [n as usize, c as usize, (h * hp) as usize, (w * wp) as usize];
            input(&mut b, &shape);
            let s6 = b.initializer_i64("s6", &[n, c, hp, h, wp, w]);
            let r = b.node("Reshape", "part", &["x", &s6], &[], vec![]);
            let t = b.node("Transpose", "perm", &[&r], &[], vec![attr_ints("perm", &[0, 2, 4, 1, 3, 5])]);
            let sfc = b.initializer_i64("sfc", &[-1, s * h * w, 1, 1]);
            let u = b.node("Reshape", "to_fc", &[&t, &sfc], &[], vec![]);
            let attrs = ConvAttrs::default().group(s);
            let (v, _, _) = b.conv_rand("fc3", &u, (s * h * w) as usize, (h * w) as usize, &[1, 1], *fc_bias, attrs);
            let sshw = b.initializer_i64("sshw", &[-1, s, h, w]);
            let mut v = b.node("Reshape", "from_fc", &[&v, &sshw], &[], vec![]);
            if *fc_bn {
                v = b.bn("fc3_bn", &v, s as usize, None).0;
            }
            let sparts = b.initializer_i64("sparts", &[-1, hp, wp, s, h, w]);
            let mut terms = vec![b.node("Reshape", "fc_parts", &[&v, &sparts], &[], vec![])];
            let ci = b.node("Reshape", "to_conv", &[&t, &sshw], &[], vec![]);
            let mut local = vec![];
            for (j, lc) in convs.iter().enumerate() {
                let (p, groups) = ((lc.k / 2) as i64, if lc.joins_groups { 1 } else { s });
                let a = ConvAttrs::pads(&[p, p, p, p]).group(groups);
                let (mut y, _, _) =
                    b.conv_rand(&format!("rep{j}"), &ci, s as usize, (s / groups) as usize, &[lc.k, lc.k], lc.bias, a);
                if lc.bn {
                    y = b.bn(&format!("rep{j}_bn"), &y, s as usize, None).0;
                }
                local.push(y);
            }
            if *accumulator {
                let zero = b.initializer("zero", &ndarray::arr0(0.0).into_dyn());
                local.insert(0, zero);
            }
            let local = sum(&mut b, "local", local, &mut order);
            terms.push(b.node("Reshape", "local_parts", &[&local, &sparts], &[], vec![]));
            if *whole_image {
                let (y, _, _) =
                    b.conv_rand("whole", "x", c as usize, 1, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]).group(c));
                let r = b.node("Reshape", "whole_part", &[&y, &s6], &[], vec![]);
                let t = b.node("Transpose", "whole_perm", &[&r], &[], vec![attr_ints("perm", &[0, 2, 4, 1, 3, 5])]);
                terms.push(b.node("Reshape", "whole_parts", &[&t, &sparts], &[], vec![]));
            }
            let acc = sum(&mut b, "sum", terms, &mut order);
            let back = b.node("Transpose", "unperm", &[&acc], &[], vec![attr_ints("perm", &[0, 3, 1, 4, 2, 5])]);
            let sx = b.initializer_i64("sx", &[n, c, h * hp, w * wp]);
            let y = b.node("Reshape", "unpart", &[&back, &sx], &["y"], vec![]);
            b.output(&y);
            (b, shape.to_vec())
        }
        FcBlock::Linear { batch, tokens, k, m, gemm, scale, more, identity, scaled_x } => {
            let shape: Vec<usize> = [*batch].into_iter().chain(*tokens).chain([*k]).collect();
            input(&mut b, &shape);
            let linear = |b: &mut Builder, name: &str| {
                if *gemm {
                    let w = b.rand(&[*m, *k]);
                    let w = b.initializer(&format!("{name}.w"), &w);
                    let c = b.rand(&[*m]);
                    let c = b.initializer(&format!("{name}.c"), &c);
                    b.node("Gemm", name, &["x", &w, &c], &[], vec![attr_int("transB", 1)])
                } else {
                    let w = b.rand(&[*k, *m]);
                    let w = b.initializer(&format!("{name}.w"), &w);
                    b.node("MatMul", name, &["x", &w], &[], vec![])
                }
            };
            let per_feature = |b: &mut Builder, name: &str, x: &str, n: usize| {
                let g = b.rand(&[n]);
                let g = b.initializer(&format!("{name}.g"), &g);
                b.node("Mul", name, &[x, &g], &[], vec![])
            };
            let mut y = linear(&mut b, "fc");
            if *scale {
                y = per_feature(&mut b, "fc_scale", &y, *m);
            }
            let mut terms = vec![y];
            for j in 0..*more {
                terms.push(linear(&mut b, &format!("more{j}")));
            }
            if *identity {
                terms.push("x".into());
            }
            if *scaled_x {
                terms.push(per_feature(&mut b, "x_scale", "x", *k));
            }
            if terms.len() < 2 {
                terms.push(per_feature(&mut b, "x_scale", "x", *k));
            }
            let y = sum(&mut b, "sum", terms, &mut order);
            b.output(&y);
            (b, shape)
        }
    }
}

pub(crate) fn check_fc(case: &FcCase) -> Result<(), TestCaseError> {
    if let FcBlock::Linear { k, m, identity, scaled_x, more, .. } = &case.block {
        if k != m && !identity && !scaled_x && *more == 0 {
            // a lone linear layer and x times a constant need K = M: not a valid graph
            return Err(TestCaseError::reject("x beside a linear layer of another width"));
        }
    }
    let (b, shape) = build_fc(case);
    let original = b.build();
    let mut m = b.build();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    let x = rand_input(case.seed ^ 0x5eed, &shape);
    let want = run_f32(&original, std::slice::from_ref(&x));
    if want.iter().all(|v| v.abs() < 1e-3) {
        // a layer of one small weight on a few inputs: nothing to compare
        return Err(TestCaseError::reject("the output is (almost) zero"));
    }
    close(&run_f32(&m, &[x]), &want, 1e-5).map_err(|e| fail("fused vs original, in tract", e, &r))?;
    let fired = r.rewrites.iter().any(|w| w.rule == "merge_into_fc");
    match &case.block {
        FcBlock::RepMlp { convs, whole_image, .. } => {
            let joins = convs.iter().any(|c| c.joins_groups);
            if !joins && !whole_image {
                // an FC of its groups: the grouped 1x1 Conv alone, no BN, no sum
                if !fired || r.after.op("Conv") != 1 || r.after.op("Add") + r.after.op("BatchNormalization") > 0 {
                    return Err(fail("not the FC with new weights", format!("{:?}", r.after.ops), &r));
                }
            } else if r.after.op("Conv") != 1 || r.after.op("Add") + r.after.op("BatchNormalization") > 0 {
                // a branch joining the sharesets, or crossing the patches: no FC of the region
                // holds it (with patches of one pixel, a dense 1x1 branch is one, and holds all)
                let not_an_fc = r.refused.iter().any(|f| {
                    matches!(
                        &f.reason,
                        Reason::Fc {
                            why: FcMisfit::BiasNotPerFeature
                                | FcMisfit::MixesRows
                                | FcMisfit::NotRecovered { .. }
                                | FcMisfit::Groups { .. },
                            ..
                        }
                    )
                });
                if !not_an_fc {
                    return Err(fail("left without an FC's reason", format!("{:?}", r.after.ops), &r));
                }
            }
        }
        FcBlock::Linear { gemm, .. } => {
            // one linear layer (a MatMul and its bias, or a Gemm; parallel Gemms alone are
            // merge_linear's)
            let layers = r.after.op("MatMul") + r.after.op("Gemm");
            let extra = r.after.nodes - layers;
            if layers != 1 || extra > usize::from(!gemm) || r.after.op("Mul") > 0 {
                return Err(fail("not one linear layer", format!("{:?}", r.after.ops), &r));
            }
        }
    }
    Ok(())
}
