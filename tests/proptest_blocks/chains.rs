//! Convolutions in sequence (merge_sequential, fold_pad, with fold_bn and merge_branches around).

use super::*;

/// One conv of a chain.
#[derive(Clone, Debug)]
pub(crate) struct SeqConv {
    pub(crate) kernel: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) dilations: Vec<usize>,
    /// begin per axis, then end per axis
    pub(crate) pads: Vec<i64>,
    pub(crate) groups: usize,
    pub(crate) out: usize,
    pub(crate) bias: bool,
    /// a BatchNormalization after it
    pub(crate) bn: bool,
}

/// x → [zero Pad] → conv → [BN] → conv → [BN] (→ conv → [BN]) [+ 1x1 skip of x [+ x]].
#[derive(Clone, Debug)]
pub(crate) struct Chain {
    pub(crate) seed: u64,
    pub(crate) input: Vec<usize>,
    pub(crate) cin: usize,
    pub(crate) pad: Option<(Vec<i64>, Vec<i64>)>,
    pub(crate) convs: Vec<SeqConv>,
    pub(crate) skip: bool,
    pub(crate) identity: bool,
}

pub(crate) fn gen_chain(v: &[u16]) -> Chain {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let r = ch.of(&[2, 2, 2, 1, 3]);
    let input: Vec<usize> = (0..r).map(|_| if r == 3 { 3 + ch.pick(4) } else { 4 + ch.pick(9) }).collect();
    let cin = 1 + ch.pick(if r == 3 { 3 } else { 6 });
    let pad = ch
        .chance(20)
        .then(|| ((0..r).map(|_| ch.pick(3) as i64).collect(), (0..r).map(|_| ch.pick(3) as i64).collect()));
    let mut len: Vec<i64> = input
        .iter()
        .zip(0..r)
        .map(|(&l, a)| l as i64 + pad.as_ref().map_or(0, |(b, e): &(Vec<i64>, Vec<i64>)| b[a] + e[a]))
        .collect();
    let n = if ch.chance(35) { 3 } else { 2 };
    let (mut c, mut convs) = (cin, vec![]);
    for _ in 0..n {
        let pointwise = ch.chance(40);
        let kernel: Vec<usize> = (0..r)
            .map(|_| {
                if pointwise {
                    1
                } else if r == 3 {
                    ch.of(&[1, 3])
                } else {
                    ch.of(&[1, 3, 3, 5])
                }
            })
            .collect();
        let strides: Vec<usize> = (0..r).map(|_| if ch.chance(20) { 2 } else { 1 }).collect();
        let dilations: Vec<usize> = (0..r).map(|a| if kernel[a] > 1 && ch.chance(15) { 2 } else { 1 }).collect();
        let (groups, out) = match ch.pick(8) {
            0 | 1 => (c, c * (1 + ch.pick(2))), // depthwise, channel multiplier 1 or 2
            2 if c % 2 == 0 => (2, 2 * (1 + ch.pick(3))),
            _ => (1, 1 + ch.pick(8)),
        };
        let padded = ch.chance(50);
        let mut pads: Vec<i64> = (0..2 * r)
            .map(|i| if padded { ch.pick(dilations[i % r] * (kernel[i % r] - 1) + 1) as i64 } else { 0 })
            .collect();
        for a in 0..r {
            // a non-empty output
            let span = (dilations[a] * (kernel[a] - 1)) as i64 + 1;
            if len[a] + pads[a] + pads[r + a] < span {
                pads[r + a] = span - len[a] - pads[a];
            }
            len[a] = (len[a] + pads[a] + pads[r + a] - span) / strides[a] as i64 + 1;
        }
        convs.push(SeqConv { kernel, strides, dilations, pads, groups, out, bias: ch.chance(50), bn: ch.chance(30) });
        c = out;
    }
    let same = pad.is_none() && len.iter().zip(&input).all(|(&l, &i)| l == i as i64);
    let skip = same && ch.chance(40);
    let identity = skip && c == cin && ch.chance(50);
    Chain { seed, input, cin, pad, convs, skip, identity }
}

/// A conv's weight, bias, and the BN after it.
pub(crate) type ConvParams = (ArrayD<f64>, Option<ArrayD<f64>>, Option<Bn>);

pub(crate) struct BuiltChain {
    pub(crate) builder: Builder,
    pub(crate) weights: Vec<ConvParams>,
    pub(crate) skip: Option<(ArrayD<f64>, Option<ArrayD<f64>>)>,
}

pub(crate) fn build_chain(chain: &Chain) -> BuiltChain {
    let r = chain.input.len();
    let mut b = Builder::new(chain.cin, 1, 1);
    let dims: Vec<i64> = [1, chain.cin].iter().chain(&chain.input).map(|&d| d as i64).collect();
    b.graph.input[0] = tensor_info("x", DataType::Float, &dims);
    b.rng = StdRng::seed_from_u64(chain.seed);
    let mut cur = "x".to_string();
    if let Some((pb, pe)) = &chain.pad {
        let amounts: Vec<i64> = [0, 0].iter().chain(pb).chain(&[0, 0]).chain(pe).copied().collect();
        cur = b.pad("pad", &cur, &amounts, None);
    }
    let mut c = chain.cin;
    let mut weights = vec![];
    for (i, sc) in chain.convs.iter().enumerate() {
        let attrs = ConvAttrs::pads(&sc.pads)
            .strides(&sc.strides.iter().map(|&v| v as i64).collect::<Vec<_>>())
            .dilations(&sc.dilations.iter().map(|&v| v as i64).collect::<Vec<_>>())
            .group(sc.groups as i64);
        let (y, w, bias) = b.conv_rand(&format!("c{i}"), &cur, sc.out, c / sc.groups, &sc.kernel, sc.bias, attrs);
        cur = y;
        let bn_p = sc.bn.then(|| {
            let (y, p) =
                bn(&mut b, &format!("c{i}.bn"), &cur, sc.out, BnStyle { epsilon: 1e-5, training_attr: false }, &[]);
            cur = y;
            p
        });
        weights.push((w, bias, bn_p));
        c = sc.out;
    }
    let mut skip = None;
    if chain.skip {
        let (s, w, bias) = b.conv_rand("skip", "x", c, chain.cin, &vec![1; r], true, ConvAttrs::default());
        cur = b.add("add", &cur, &s);
        skip = Some((w, bias));
        if chain.identity {
            cur = b.add("add_id", &cur, "x");
        }
    }
    b.output(&cur);
    BuiltChain { builder: b, weights, skip }
}

/// The chain computed here, conv by conv, in f64.
pub(crate) fn chain_reference(chain: &Chain, built: &BuiltChain, x: &ArrayD<f64>) -> ArrayD<f64> {
    let r = chain.input.len();
    let mut y = match &chain.pad {
        Some((pb, pe)) => pad_signed(x, pb, pe),
        None => x.clone(),
    };
    for (sc, (w, bias, bn_p)) in chain.convs.iter().zip(&built.weights) {
        let g = Geo {
            kernel: sc.kernel.clone(),
            strides: sc.strides.clone(),
            dilations: sc.dilations.clone(),
            pads: sc.pads.clone(),
            auto_pad: None,
            crop: None,
            pad: None,
            groups: sc.groups,
            out: sc.out,
        };
        y = naive_conv(&y, w, bias.as_ref(), &g);
        if let Some(p) = bn_p {
            y = p.apply(&y);
        }
    }
    if let Some((w, bias)) = &built.skip {
        let g = Geo {
            kernel: vec![1; r],
            strides: vec![1; r],
            dilations: vec![1; r],
            pads: vec![0; 2 * r],
            auto_pad: None,
            crop: None,
            pad: None,
            groups: 1,
            out: w.shape()[0],
        };
        y = y + naive_conv(x, w, bias.as_ref(), &g);
        if chain.identity {
            y += x;
        }
    }
    y
}

/// Whether the rules must merge the chain into one Conv: the later convs do not pad, no skip,
/// and each merge (left to right) holds no more weights and multiply-adds per output than its two.
pub(crate) fn chain_must_merge(chain: &Chain) -> bool {
    if chain.skip || chain.convs.iter().skip(1).any(|c| c.pads.iter().any(|&p| p != 0)) {
        return false;
    }
    let r = chain.input.len();
    let weights = |c: &SeqConv, cin: usize| c.out * (cin / c.groups) * c.kernel.iter().product::<usize>();
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    // the merged conv so far: (kernel, strides, dilations, groups, out)
    let first = &chain.convs[0];
    let (mut k, mut s, mut d, mut g, mut o) =
        (first.kernel.clone(), first.strides.clone(), first.dilations.clone(), first.groups, first.out);
    for next in &chain.convs[1..] {
        let w1 = o * (chain.cin / g) * k.iter().product::<usize>();
        let w2 = weights(next, o);
        let g2 = if next.groups == g { g } else { 1 };
        let mut k2 = vec![0; r];
        let mut d2 = vec![0; r];
        for a in 0..r {
            let step1 = if k[a] > 1 { d[a] } else { 0 };
            let step2 = if next.kernel[a] > 1 { next.dilations[a] * s[a] } else { 0 };
            d2[a] = gcd(step1, step2).max(1);
            k2[a] = (step1 * (k[a] - 1) + step2 * (next.kernel[a] - 1)) / d2[a] + 1;
        }
        let merged = next.out * (chain.cin / g2) * k2.iter().product::<usize>();
        let macs = w1 * next.strides.iter().product::<usize>() + w2;
        if merged > w1 + w2 || merged > macs {
            return false;
        }
        s = (0..r).map(|a| s[a] * next.strides[a]).collect();
        (k, d, g, o) = (k2, d2, g2, next.out);
    }
    true
}

pub(crate) fn check_chain(chain: &Chain) -> Result<(), TestCaseError> {
    let built = build_chain(chain);
    let original = built.builder.build();
    let mut m = built.builder.build();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    let shape: Vec<usize> = [1, chain.cin].iter().chain(&chain.input).copied().collect();
    let x = rand_input(chain.seed ^ 0x5eed, &shape);
    let want = chain_reference(chain, &built, &x);
    if want.iter().all(|v| v.abs() < 1e-3) {
        // a last conv that reads only padding, without bias: nothing to compare
        return Err(TestCaseError::reject("the chain's output is (almost) zero"));
    }
    // the reference is the model's function (else the check below proves nothing)
    close(&run_f32(&original, std::slice::from_ref(&x)), &want, 1e-5)
        .map_err(|e| fail("the reference computed here", e, &r))?;
    close(&run_f32(&m, &[x]), &want, 1e-5).map_err(|e| fail("fused vs the chain computed here", e, &r))?;
    let conv_weights = |m: &Model| -> usize {
        let g = graph(&m.proto);
        g.node.iter().filter(|n| n.op_type() == "Conv").map(|n| init_f64(&m.proto, &n.input[1]).len()).sum()
    };
    if conv_weights(&m) > conv_weights(&original) {
        return Err(fail("more weights", format!("{} -> {}", conv_weights(&original), conv_weights(&m)), &r));
    }
    if chain_must_merge(chain) && r.after.op("Conv") != 1 {
        return Err(fail("not merged", format!("{:?}", r.after.ops), &r));
    }
    // a conv padding an axis on which an earlier one (merged or not) has a window is never one
    // Conv with it: no candidate
    let r_ = chain.input.len();
    let windows = (1..chain.convs.len()).any(|i| {
        let c = &chain.convs[i];
        (0..r_).any(|a| (c.pads[a] != 0 || c.pads[r_ + a] != 0) && chain.convs[..i].iter().any(|p| p.kernel[a] > 1))
    });
    if r.after.op("Conv") > 1 && r.refused.is_empty() && !windows {
        return Err(fail("convs left in sequence without a reason", format!("{:?}", r.after.ops), &r));
    }
    tract_verify(&original, &m).map_err(|e| fail("tract", e, &r))?;
    Ok(())
}
