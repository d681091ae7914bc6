//! Chains of two convolutions as branches of a sum (RepNeXt's 1x7 → 7x1 beside a 7x7):
//! merge_branches composes a chain when a Conv of the sum reading the same input holds the
//! composition, as it merges the sum; otherwise the chain stays two convs, with a reason.

use super::*;
use acnet_onnx::{ChainSum, Reason};

/// One chain: `first` then `second` (2-d, C → C), optionally times a per-channel constant.
#[derive(Clone, Debug)]
pub(crate) struct SumChain {
    pub(crate) first: SeqConv,
    pub(crate) second: SeqConv,
    pub(crate) scale: bool,
}

/// `x` → KxK (stride S, pads K/2, groups g) [+ an aligned smaller Conv] + chains, summed in a
/// shuffled order; every branch has the KxK's output size.
#[derive(Clone, Debug)]
pub(crate) struct SumWithChains {
    pub(crate) seed: u64,
    pub(crate) input: Vec<usize>,
    pub(crate) c: usize,
    pub(crate) groups: usize,
    pub(crate) stride: usize,
    pub(crate) big: usize,
    /// a smaller Conv placed at the centre of the KxK
    pub(crate) small: Option<Vec<usize>>,
    pub(crate) chains: Vec<SumChain>,
    /// the order of the branches in the sum (0: the KxK, 1: the small one, 2..: the chains)
    pub(crate) order: Vec<usize>,
}

/// A convolution of x in the block (a branch, or a chain's composition), as it decides where it
/// lands in another: kernel, dilations, pads, groups (all have the block's stride and channels).
#[derive(Clone, Debug, PartialEq)]
struct Window {
    kernel: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<i64>,
    pads_end: Vec<i64>,
    groups: usize,
}

impl Window {
    fn volume(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Whether its taps are on some axis `d > 1` apart (a stride of a chain's first on an axis
    /// where only the second has a window).
    fn dilated(&self) -> bool {
        self.dilations.iter().zip(&self.kernel).any(|(&d, &k)| d > 1 && k > 1)
    }

    /// Whether it fits inside `big` (undilated) at a whole tap offset with the same output size
    /// (computed here, as `offset_in` does not see it).
    fn inside(&self, big: &Window) -> bool {
        self.groups == big.groups
            && (0..2).all(|a| {
                let span = (self.dilations[a] * (self.kernel[a] - 1)) as i64;
                let big_span = big.kernel[a] as i64 - 1;
                let same_size =
                    self.pads_begin[a] + self.pads_end[a] - span == big.pads_begin[a] + big.pads_end[a] - big_span;
                let o = big.pads_begin[a] - self.pads_begin[a];
                same_size && o >= 0 && o + span <= big_span
            })
    }
}

/// The composition of a chain, or `None` when it is not one convolution (the second zero-pads an
/// axis on which the first has a window or a bias).
fn composed(ch: &SumChain) -> Option<Window> {
    let (f, s) = (&ch.first, &ch.second);
    let (mut k, mut d) = (vec![0; 2], vec![1; 2]);
    let (mut pb, mut pe) = (vec![0; 2], vec![0; 2]);
    for a in 0..2 {
        let (p2b, p2e) = (s.pads[a], s.pads[2 + a]);
        if (p2b != 0 || p2e != 0) && (f.kernel[a] != 1 || f.bias) {
            return None;
        }
        let s1 = f.strides[a];
        // taps of the first 1 apart, of the second s1 apart (one tap: no step)
        let step1 = if f.kernel[a] > 1 { 1 } else { 0 };
        let step2 = if s.kernel[a] > 1 { s1 } else { 0 };
        d[a] = if step1 == 1 { 1 } else { step2.max(1) };
        k[a] = (step1 * (f.kernel[a] - 1) + step2 * (s.kernel[a] - 1)) / d[a] + 1;
        pb[a] = f.pads[a] + s1 as i64 * p2b;
        pe[a] = f.pads[2 + a] + s1 as i64 * p2e;
    }
    let groups = if f.groups == s.groups { f.groups } else { 1 };
    Some(Window { kernel: k, dilations: d, pads_begin: pb, pads_end: pe, groups })
}

/// The block's own square convs (the KxK, the small one) as windows.
fn squares(bl: &SumWithChains) -> Vec<Window> {
    let p = (bl.big / 2) as i64;
    let square = |k: Vec<usize>| {
        let pads: Vec<i64> = k.iter().map(|&k| p - (bl.big - k) as i64 / 2).collect();
        Window { kernel: k, dilations: vec![1, 1], pads_begin: pads.clone(), pads_end: pads, groups: bl.groups }
    };
    [Some(vec![bl.big, bl.big]), bl.small.clone()].into_iter().flatten().map(square).collect()
}

/// What the sum's Convs of x are once merge_sequential has composed the cheap chains: the base
/// (the largest: the merged Conv's window) and whether every one fits inside it (the group
/// merges); `None` when not decided here (a dilated composition: merge_branches' geometry; or
/// two largest of different windows: which is the base depends on the operands' order).
fn group(bl: &SumWithChains) -> Option<(Window, bool)> {
    let mut convs = squares(bl);
    for ch in &bl.chains {
        if let Some(w) = composed(ch) {
            if w.dilated() {
                return None;
            }
            if !costly(bl, ch) {
                convs.push(w);
            }
        }
    }
    let largest = convs.iter().map(Window::volume).max().expect("the KxK");
    let bases: Vec<&Window> = convs.iter().filter(|w| w.volume() == largest).collect();
    if bases.iter().any(|w| *w != bases[0]) {
        return None;
    }
    let base = bases[0].clone();
    let fits = convs.iter().all(|w| w.inside(&base));
    Some((base, fits))
}

/// Whether the chain alone costs more composed than as two (merge_sequential's criterion:
/// weights, and multiply-adds per output position).
fn costly(bl: &SumWithChains, ch: &SumChain) -> bool {
    let Some(Window { kernel: k, groups, .. }) = composed(ch) else { return false };
    let w = |sc: &SeqConv| bl.c * (bl.c / sc.groups) * sc.kernel.iter().product::<usize>();
    let (w1, w2) = (w(&ch.first), w(&ch.second));
    let merged = bl.c * (bl.c / groups) * k.iter().product::<usize>();
    merged > w1 + w2 || merged > w1 * ch.second.strides.iter().product::<usize>() + w2
}

pub(crate) fn gen_chain_sum(v: &[u16]) -> SumWithChains {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let c = 1 + ch.pick(4);
    let depthwise = !ch.chance(30);
    let groups = if depthwise { c } else { 1 };
    let stride = if ch.chance(35) { 2 } else { 1 };
    let big = ch.of(&[3, 5, 7, 7]);
    let input: Vec<usize> = (0..2).map(|_| 5 + ch.pick(8)).collect();
    let p = (big / 2) as i64;
    let small = ch.chance(40).then(|| {
        let k0 = ch.of(&[1, 3, 5]).min(big);
        let k1 = ch.of(&[1, 3, 5]).min(big);
        vec![k0, k1]
    });
    let n = 1 + usize::from(ch.chance(40));
    let mut chains = vec![];
    for _ in 0..n {
        // kernels: separable (1xk then kx1, or kx1 then 1xk), pointwise first, or any
        let (k1, k2) = match ch.pick(6) {
            0..=2 => {
                let k = ch.of(&[3, 5, 7]);
                if ch.chance(50) {
                    (vec![1, k], vec![k, 1])
                } else {
                    (vec![k, 1], vec![1, k])
                }
            }
            3 => (vec![1, 1], vec![ch.of(&[1, 3, 5]), ch.of(&[1, 3, 5])]),
            _ => (vec![ch.of(&[1, 3]), ch.of(&[1, 3])], vec![ch.of(&[1, 3]), ch.of(&[1, 3])]),
        };
        // the stride on each axis is carried by the first or the second
        let on_first: Vec<bool> = (0..2).map(|_| ch.chance(50)).collect();
        let s1: Vec<usize> = (0..2).map(|a| if on_first[a] { stride } else { 1 }).collect();
        let s2: Vec<usize> = (0..2).map(|a| if on_first[a] { 1 } else { stride }).collect();
        // pads: the composition at the centre of the KxK (or, when larger, centred on itself),
        // the output size the KxK's; the second pads an axis where the first is one tap, if drawn
        let kc: Vec<i64> = (0..2).map(|a| ((k1[a] - 1) + (k2[a] - 1) * s1[a] + 1) as i64).collect();
        let (mut f_pads, mut s_pads) = (vec![0i64; 4], vec![0i64; 4]);
        for a in 0..2 {
            let mut pb = if kc[a] <= big as i64 { p - (big as i64 - kc[a]) / 2 } else { (kc[a] - 1) / 2 };
            if ch.chance(25) {
                // shifted (the output size kept): may no longer fit
                pb += ch.of(&[-2, -1, 1, 2]);
                pb = pb.max(0).min(kc[a] - 1);
            }
            let pe = 2 * p - big as i64 + kc[a] - pb;
            let second_pads = k1[a] == 1 && ch.chance(60) && pb % s1[a] as i64 == 0 && pe % s1[a] as i64 == 0;
            if second_pads {
                s_pads[a] = pb / s1[a] as i64;
                s_pads[2 + a] = pe / s1[a] as i64;
            } else {
                f_pads[a] = pb;
                f_pads[2 + a] = pe;
            }
        }
        let g1 = if depthwise && !ch.chance(10) { c } else { 1 };
        let g2 = if depthwise && !ch.chance(10) { c } else { 1 };
        let conv = |kernel: Vec<usize>, strides: Vec<usize>, pads: Vec<i64>, groups: usize, bias: bool| SeqConv {
            kernel,
            strides,
            dilations: vec![1, 1],
            pads,
            groups,
            out: c,
            bias,
            bn: false,
        };
        let bias1 = ch.chance(20);
        let bias2 = ch.chance(50);
        let first = conv(k1, s1, f_pads, g1, bias1);
        let second = conv(k2, s2, s_pads, g2, bias2);
        chains.push(SumChain { first, second, scale: ch.chance(20) });
    }
    let mut order: Vec<usize> = (0..2 + n).filter(|&i| i != 1 || small.is_some()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    SumWithChains { seed, input, c, groups, stride, big, small, chains, order }
}

/// A conv's weight, bias and geometry.
type ConvAndGeo = (ArrayD<f64>, Option<ArrayD<f64>>, Geo);

struct BuiltSum {
    builder: Builder,
    /// per branch (in `order`'s numbering), the convs' parameters and geometry, and the scale
    convs: BTreeMap<usize, Vec<ConvAndGeo>>,
    scales: BTreeMap<usize, ArrayD<f64>>,
}

fn geo(sc: &SeqConv) -> Geo {
    Geo {
        kernel: sc.kernel.clone(),
        strides: sc.strides.clone(),
        dilations: sc.dilations.clone(),
        pads: sc.pads.clone(),
        auto_pad: None,
        crop: None,
        pad: None,
        groups: sc.groups,
        out: sc.out,
    }
}

fn build_sum(bl: &SumWithChains) -> BuiltSum {
    let mut b = Builder::new(bl.c, bl.input[0], bl.input[1]);
    b.rng = StdRng::seed_from_u64(bl.seed);
    let (c, s, p) = (bl.c, bl.stride, (bl.big / 2) as i64);
    let mut convs = BTreeMap::new();
    let mut scales = BTreeMap::new();
    let mut leaves = BTreeMap::new();
    let conv = |b: &mut Builder, name: &str, x: &str, sc: &SeqConv| {
        let attrs = ConvAttrs::pads(&sc.pads)
            .strides(&sc.strides.iter().map(|&v| v as i64).collect::<Vec<_>>())
            .group(sc.groups as i64);
        let (y, w, bias) = b.conv_rand(name, x, sc.out, c / sc.groups, &sc.kernel, sc.bias, attrs);
        (y, (w, bias, geo(sc)))
    };
    let square = |k: Vec<usize>| {
        let pads: Vec<i64> = (0..4).map(|i| p - (bl.big - k[i % 2]) as i64 / 2).collect();
        SeqConv {
            kernel: k,
            strides: vec![s, s],
            dilations: vec![1, 1],
            pads,
            groups: bl.groups,
            out: c,
            bias: true,
            bn: false,
        }
    };
    let (y, params) = conv(&mut b, "big", "x", &square(vec![bl.big, bl.big]));
    leaves.insert(0, y);
    convs.insert(0, vec![params]);
    if let Some(k) = &bl.small {
        let (y, params) = conv(&mut b, "small", "x", &square(k.clone()));
        leaves.insert(1, y);
        convs.insert(1, vec![params]);
    }
    for (i, ch) in bl.chains.iter().enumerate() {
        let (mid, p1) = conv(&mut b, &format!("c{i}.w"), "x", &ch.first);
        let (mut y, p2) = conv(&mut b, &format!("c{i}.h"), &mid, &ch.second);
        if ch.scale {
            let a = b.rand(&[c, 1, 1]);
            let name = b.initializer(&format!("c{i}.scale"), &a);
            y = b.node("Mul", &format!("c{i}.mul"), &[&y, &name], &[], vec![]);
            scales.insert(2 + i, a);
        }
        leaves.insert(2 + i, y);
        convs.insert(2 + i, vec![p1, p2]);
    }
    let mut acc = leaves[&bl.order[0]].clone();
    for (j, i) in bl.order.iter().enumerate().skip(1) {
        acc = b.add(&format!("add{j}"), &acc, &leaves[i]);
    }
    b.output(&acc);
    BuiltSum { builder: b, convs, scales }
}

/// The block computed here, branch by branch, in f64.
fn sum_reference(built: &BuiltSum, x: &ArrayD<f64>) -> ArrayD<f64> {
    let mut acc: Option<ArrayD<f64>> = None;
    for (i, convs) in &built.convs {
        let mut y = x.clone();
        for (w, bias, g) in convs {
            y = naive_conv(&y, w, bias.as_ref(), g);
        }
        if let Some(a) = built.scales.get(i) {
            y *= &a.view().insert_axis(ndarray::Axis(0));
        }
        acc = Some(match acc {
            None => y,
            Some(a) => a + y,
        });
    }
    acc.expect("a branch")
}

pub(crate) fn check_chain_sum(bl: &SumWithChains) -> Result<(), TestCaseError> {
    let built = build_sum(bl);
    let original = built.builder.build();
    let mut m = built.builder.build();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    let shape = [1, bl.c, bl.input[0], bl.input[1]];
    let x = rand_input(bl.seed ^ 0x5eed, &shape);
    let want = sum_reference(&built, &x);
    close(&run_f32(&original, std::slice::from_ref(&x)), &want, 1e-5)
        .map_err(|e| fail("the reference computed here", e, &r))?;
    close(&run_f32(&m, &[x]), &want, 1e-5).map_err(|e| fail("fused vs the block computed here", e, &r))?;
    // the cost is judged on the merge: no chain is made a dense kernel the sum does not take
    let conv_weights = |m: &Model| -> usize {
        let g = graph(&m.proto);
        g.node.iter().filter(|n| n.op_type() == "Conv").map(|n| init_f64(&m.proto, &n.input[1]).len()).sum()
    };
    if conv_weights(&m) > conv_weights(&original) {
        return Err(fail("more weights", format!("{} -> {}", conv_weights(&original), conv_weights(&m)), &r));
    }
    let g = graph(&m.proto);
    let stays = |i: usize| {
        let (first, second) = (format!("c{i}.w"), format!("c{i}.h"));
        g.node.iter().any(|n| n.name() == first) && g.node.iter().any(|n| n.name() == second)
    };
    // the group of x's Convs, once the cheap chains are composed: a chain that costs more
    // composed is held when it fits inside the group's base (the largest)
    let Some((base, merges)) = group(bl) else { return Ok(()) };
    let held = |ch: &SumChain| composed(ch).is_some_and(|w| w.inside(&base));
    for (i, ch) in bl.chains.iter().enumerate() {
        let second = format!("c{i}.h");
        let refusal = r.refused.iter().find(|f| f.node == second).map(|f| &f.reason);
        if composed(ch).is_none() {
            // not one convolution: never composed
            if !stays(i) {
                return Err(fail(
                    &format!("chain {i} is not one Conv but was composed"),
                    format!("{:?}", r.after.ops),
                    &r,
                ));
            }
        } else if costly(bl, ch) && held(ch) && merges {
            // held by the base of a group that merges: merged into it
            if stays(i) {
                return Err(fail(&format!("chain {i} is held but stays"), format!("{:?}", r.after.ops), &r));
            }
        } else if costly(bl, ch) && !held(ch) {
            // costlier composed and not held: two convs, and the reason names the sum
            let sum_named = matches!(refusal, Some(Reason::SequentialCost { sum: Some(s), .. })
                if matches!(**s, ChainSum::NotHeld { .. }));
            if !stays(i) || !sum_named {
                return Err(fail(&format!("chain {i}: not held, costly"), format!("{refusal:?}"), &r));
            }
        }
    }
    if merges && bl.chains.iter().all(|ch| composed(ch).is_some() && (held(ch) || !costly(bl, ch))) {
        // every branch fits the base: the block is one Conv of its size
        let convs: Vec<_> = g.node.iter().filter(|n| n.op_type() == "Conv").collect();
        let kernel = convs.first().map(|n| init_f64(&m.proto, &n.input[1]).shape()[2..].to_vec());
        if convs.len() != 1 || kernel != Some(base.kernel.clone()) || !r.refused.is_empty() {
            return Err(fail("not one Conv of the base", format!("{:?} {base:?}", r.after.ops), &r));
        }
    }
    Ok(())
}
