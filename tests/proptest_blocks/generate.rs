//! Random blocks from the choices: aligned (exactly one convolution) and misaligned.

use super::*;

/// Lay out `kernel` at tap `offset` (per axis) inside the big kernel `k` with dilation `dil`,
/// begin pads `pb` and end pads `pe` (the README's alignment rule, solved for the branch's pads):
/// begin `p - c = P_b - o·D`, end `p - c = P_e - D·(K - k - o)`. Positive amounts pad, negative
/// crop; they go to the Conv's pads, a Pad node or a Slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn place(
    ch: &mut Ch,
    kernel: &[usize],
    offset: &[usize],
    k: usize,
    dil: &[usize],
    strides: &[usize],
    pb: &[i64],
    pe: &[i64],
    groups: usize,
    out: usize,
    is_square: bool,
) -> Geo {
    let r = kernel.len();
    let mut vb = vec![0i64; r];
    let mut ve = vec![0i64; r];
    let mut dilations = vec![1usize; r];
    for a in 0..r {
        let d = dil[a] as i64;
        vb[a] = pb[a] - offset[a] as i64 * d;
        ve[a] = pe[a] - d * (k as i64 - kernel[a] as i64 - offset[a] as i64);
        // a one-tap axis has no dilation to speak of: any will do
        dilations[a] = if kernel[a] > 1 || is_square {
            dil[a]
        } else if ch.chance(25) {
            2
        } else {
            1
        };
    }
    let mut pads = vec![0i64; 2 * r];
    let mut crop = None;
    let mut pad = None;
    if ch.chance(30) {
        // a Pad node: all crops (negative pads) and some or all of the padding
        let (mut nb, mut ne) = (vec![0i64; r], vec![0i64; r]);
        for a in 0..r {
            for (v, n, p) in [(vb[a], &mut nb[a], a), (ve[a], &mut ne[a], r + a)] {
                if v < 0 {
                    *n = v;
                } else {
                    let q = if ch.chance(50) { v } else { ch.pick(v as usize + 1) as i64 };
                    *n = q;
                    pads[p] = v - q;
                }
            }
        }
        if nb.iter().chain(&ne).any(|&v| v != 0) || ch.chance(20) {
            pad = Some((nb, ne));
        } else {
            pads = vb.iter().chain(&ve).map(|&v| v.max(0)).collect();
        }
    } else {
        // conv pads, and a Slice for the crops
        pads = vb.iter().chain(&ve).map(|&v| v.max(0)).collect();
        let cb: Vec<i64> = vb.iter().map(|&v| (-v).max(0)).collect();
        let ce: Vec<i64> = ve.iter().map(|&v| (-v).max(0)).collect();
        if cb.iter().chain(&ce).any(|&c| c > 0) {
            crop = Some((cb, ce));
        }
    }
    // auto_pad where it means exactly these pads (SAME_* pads depend on the input size unless
    // the stride is 1)
    let mut auto_pad = None;
    if ch.chance(25) {
        let same = |upper: bool| {
            (0..r).all(|a| {
                let total = (dilations[a] * (kernel[a] - 1)) as i64;
                let (small, big) = (total / 2, total - total / 2);
                let (b, e) = if upper { (small, big) } else { (big, small) };
                strides[a] == 1 && pads[a] == b && pads[r + a] == e
            })
        };
        if pads.iter().all(|&p| p == 0) && ch.chance(50) {
            auto_pad = Some(AutoPad::Valid);
        } else if same(true) {
            auto_pad = Some(AutoPad::SameUpper);
        } else if same(false) {
            auto_pad = Some(AutoPad::SameLower);
        }
    }
    Geo { kernel: kernel.to_vec(), strides: strides.to_vec(), dilations, pads, auto_pad, crop, pad, groups, out }
}

/// Length of axis `a` at the conv's input (after the Pad node and the Slice).
pub(crate) fn conv_in_len(input: &[usize], g: &Geo, a: usize) -> i64 {
    let mut l = input[a] as i64;
    if let Some((pb, pe)) = &g.pad {
        l += pb[a] + pe[a];
    }
    if let Some((cb, ce)) = &g.crop {
        l -= cb[a] + ce[a];
    }
    l
}

/// The conv's pads on axis `a` for an input of length `lin`, as ONNX defines `auto_pad`.
pub(crate) fn eff_pads(g: &Geo, a: usize, lin: i64) -> (i64, i64) {
    let r = g.kernel.len();
    match g.auto_pad {
        None => (g.pads[a], g.pads[r + a]),
        Some(AutoPad::Valid) => (0, 0),
        Some(m) => {
            let s = g.strides[a] as i64;
            let out = (lin + s - 1) / s;
            let total = ((out - 1) * s + (g.dilations[a] as i64) * (g.kernel[a] as i64 - 1) + 1 - lin).max(0);
            let (small, big) = (total / 2, total - total / 2);
            if m == AutoPad::SameUpper {
                (small, big)
            } else {
                (big, small)
            }
        }
    }
}

/// Replace `auto_pad` by the explicit pads it means (before changing pads).
pub(crate) fn materialise_pads(input: &[usize], g: &mut Geo) {
    if g.auto_pad.is_some() {
        let r = g.kernel.len();
        for a in 0..r {
            let (b, e) = eff_pads(g, a, conv_in_len(input, g, a));
            g.pads[a] = b;
            g.pads[r + a] = e;
        }
        g.auto_pad = None;
    }
}

pub(crate) fn gen_tree(ch: &mut Ch, ls: &[usize]) -> Tree {
    if ls.len() == 1 {
        return Tree::Leaf(ls[0]);
    }
    if ls.len() >= 3 && ch.chance(12) {
        // a Sum over 2.. contiguous parts
        let parts = 2 + ch.pick(ls.len() - 1);
        let mut cuts: Vec<usize> = (1..ls.len()).collect();
        // keep parts-1 cut points
        while cuts.len() > parts - 1 {
            let j = ch.pick(cuts.len());
            cuts.remove(j);
        }
        let mut out = Vec::new();
        let mut start = 0;
        for c in cuts.into_iter().chain([ls.len()]) {
            out.push(gen_tree(ch, &ls[start..c]));
            start = c;
        }
        return Tree::Sum(out);
    }
    let cut = 1 + ch.pick(ls.len() - 1);
    Tree::Add(Box::new(gen_tree(ch, &ls[..cut])), Box::new(gen_tree(ch, &ls[cut..])))
}

/// A random block that is exactly one convolution.
pub(crate) fn gen_aligned(v: &[u16]) -> Block {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let r = ch.of(&[2, 2, 2, 2, 2, 2, 1, 3]);
    let k = if r == 3 { ch.of(&[3, 1, 3]) } else { ch.of(&[3, 5, 7, 1, 3]) };
    let cmax = if r == 3 { 4 } else { 8 };
    let cin = 1 + ch.pick(cmax);
    let identity = ch.chance(25);
    let identity_bn = ch.chance(25);
    let with_id = identity || identity_bn;
    let groups = match ch.pick(4) {
        1 if cin.is_multiple_of(2) => 2,
        2 => cin,
        _ => 1,
    };
    let cout = if with_id { cin } else { groups * (1 + ch.pick((cmax / groups).max(1))) };
    let dil: Vec<usize> = (0..r).map(|_| if ch.chance(30) { 2 } else { 1 }).collect();
    let strides: Vec<usize> = (0..r).map(|_| if !with_id && ch.chance(30) { 2 } else { 1 }).collect();
    // the big conv's pads: "same", smaller (ACNet's crop path), asymmetric, or identity-aligned
    let mode = if with_id { 3 } else { ch.pick(4) };
    let (mut pb, mut pe) = (vec![0i64; r], vec![0i64; r]);
    for a in 0..r {
        let (d, kk) = (dil[a] as i64, k as i64);
        let half = d * (kk / 2);
        (pb[a], pe[a]) = match mode {
            0 => (half, half),
            1 => {
                let p = ch.pick(half as usize + 1) as i64;
                (p, p)
            }
            2 => (ch.pick((d * (kk - 1)) as usize + 1) as i64, ch.pick((d * (kk - 1)) as usize + 1) as i64),
            _ => {
                let o = if ch.chance(30) { ch.pick(k) } else { k / 2 } as i64;
                (d * o, d * (kk - 1 - o))
            }
        };
    }
    let input: Vec<usize> = (0..r)
        .map(|a| {
            let l = if r == 3 { 3 + ch.pick(5) } else { 5 + ch.pick(8) } as i64;
            // the big conv's output must not be empty
            let need = dil[a] as i64 * (k as i64 - 1) + 1 - pb[a] - pe[a];
            l.max(need).max(1) as usize
        })
        .collect();

    // the conv branches' kernels
    let mut kernels: Vec<(String, Vec<usize>)> = vec![("square".into(), vec![k; r])];
    if ch.chance(15) {
        kernels.push(("square2".into(), vec![k; r]));
    }
    let len = |ch: &mut Ch| if ch.chance(30) { 1 + ch.pick(k) } else { k };
    match r {
        2 => {
            if ch.chance(60) {
                let l = len(ch);
                kernels.push(("ver".into(), vec![l, 1]));
            }
            if ch.chance(60) {
                let l = len(ch);
                kernels.push(("hor".into(), vec![1, l]));
            }
        }
        1 => {
            if ch.chance(60) {
                let l = len(ch);
                kernels.push(("short".into(), vec![l]));
            }
        }
        _ => {
            for ax in 0..3 {
                if ch.chance(35) {
                    let mut kv = vec![1; 3];
                    kv[ax] = len(ch);
                    kernels.push((format!("asym{ax}"), kv));
                }
            }
        }
    }
    if k > 2 && ch.chance(15) {
        let l = 1 + ch.pick(k - 1);
        kernels.push(("inner".into(), vec![l; r]));
    }
    if ch.chance(40) || kernels.len() + identity as usize + (identity_bn as usize) < 2 {
        kernels.push(("one".into(), vec![1; r]));
    }

    let operand = |ch: &mut Ch| {
        let form = ch.of(&[Form::Chan, Form::BatchChan, Form::Scalar, Form::One]);
        let src = ch.of(&[Src::Initializer, Src::Initializer, Src::ConstantNode, Src::Reshape, Src::Unsqueeze]);
        let src = if matches!(form, Form::Chan | Form::BatchChan) || src == Src::ConstantNode {
            src
        } else {
            Src::Initializer
        };
        Operand { form, src, first: ch.chance(50) }
    };
    let bn_style = |ch: &mut Ch| BnStyle { epsilon: ch.of(&[1e-5f32, 1e-5, 1e-3, 0.1]), training_attr: ch.chance(20) };
    let mut branches: Vec<Branch> = Vec::new();
    for (name, kv) in kernels {
        let is_square = name.starts_with("square");
        let offset: Vec<usize> = (0..r)
            .map(|a| {
                let room = k - kv[a];
                if room % 2 == 0 && !ch.chance(25) {
                    room / 2
                } else {
                    ch.pick(room + 1)
                }
            })
            .map(|o| if is_square { 0 } else { o })
            .collect();
        let geo = place(ch, &kv, &offset, k, &dil, &strides, &pb, &pe, groups, cout, is_square);
        let bias = ch.chance(35);
        let bn = ch.chance(60).then(|| bn_style(ch));
        let scale = ch.chance(20).then(|| operand(ch));
        // a second KxK may read the first one's weight initializer
        let share_weight = (name == "square2" && ch.chance(40)).then_some(0);
        branches.push(Branch { name, kind: Kind::Conv(geo), bias, bn, scale, share_weight });
    }
    let plain = |name: &str, kind: Kind, bn: Option<BnStyle>, scale: Option<Operand>| Branch {
        name: name.into(),
        kind,
        bias: false,
        bn,
        scale,
        share_weight: None,
    };
    if identity {
        let scale = ch.chance(25).then(|| operand(ch));
        branches.push(plain("id", Kind::Identity, None, scale));
        if ch.chance(10) {
            // x added twice
            let scale = ch.chance(25).then(|| operand(ch));
            branches.push(plain("id2", Kind::Identity, None, scale));
        }
    }
    if identity_bn {
        let st = bn_style(ch);
        let scale = ch.chance(20).then(|| operand(ch));
        branches.push(plain("idbn", Kind::IdentityBn, Some(st), scale));
    }
    // a branch that reads only the padding of the big conv (a one-tap kernel at the far end)
    // crops more than the input has at small sizes: grow the input until every crop leaves one
    let mut input = input;
    for br in &branches {
        let Kind::Conv(g) = &br.kind else { continue };
        for a in 0..r {
            let mut crop = 0;
            if let Some((cb, ce)) = &g.crop {
                crop += cb[a] + ce[a];
            }
            if let Some((pb, pe)) = &g.pad {
                crop += (-pb[a]).max(0) + (-pe[a]).max(0);
            }
            input[a] = input[a].max(crop as usize + 1);
        }
    }
    // a constant bias operand (initializer, Constant node, Reshape'd / Unsqueeze'd constant)
    let const_bias = ch.chance(15).then(|| operand(ch));
    let n = branches.len() + const_bias.is_some() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ch.pick(i + 1);
        order.swap(i, j);
    }
    let tree =
        if ch.chance(20) { Tree::Sum(order.iter().map(|&l| Tree::Leaf(l)).collect()) } else { gen_tree(ch, &order) };
    let bn_after = ch.chance(30).then(|| bn_style(ch));
    let shuffle = ch.chance(30).then(|| ch.pick(1 << 16) as u64);
    let explicit_defaults = ch.chance(30);
    let opset = ch.of(&[17, 17, 13, 11, 10, 9]);
    let slice_negative_axes = opset >= 10 && ch.chance(30);
    let slice_steps = opset >= 10 && ch.chance(30);
    let f64 = ch.chance(10);
    let omit_kernel_shape = ch.chance(15);
    let pre = if ch.chance(20) { ch.of(&[Pre::Relu, Pre::Mul, Pre::Conv, Pre::ConvBn, Pre::Bn]) } else { Pre::None };
    let bystander = ch.chance(10);
    // BatchNormalization has training_mode from opset 14
    for br in &mut branches {
        if let Some(st) = &mut br.bn {
            st.training_attr &= opset >= 14;
        }
    }
    let bn_after = bn_after.map(|st| BnStyle { training_attr: st.training_attr && opset >= 14, ..st });
    Block {
        seed,
        opset,
        k,
        cin,
        cout,
        input,
        branches,
        const_bias,
        tree,
        bn_after,
        f64,
        pre,
        bystander,
        omit_kernel_shape,
        shuffle,
        explicit_defaults,
        slice_negative_axes,
        slice_steps,
        mutations: vec![],
    }
}

/// An aligned block (choices `v`), then 1-3 random changes to one conv branch's geometry each
/// (choices `mv`).
pub(crate) fn gen_misaligned(v: &[u16], mv: &[u16]) -> Block {
    let mut b = gen_aligned(v);
    let ch = &mut Ch { v: mv, i: 0 };
    let r = b.rank();
    // the aligned block's output size
    let target: Vec<usize> = leaf_shapes(&b).expect("aligned block")[0][2..].to_vec();
    let n = 1 + ch.pick(3);
    for _ in 0..n {
        let convs: Vec<usize> =
            (0..b.branches.len()).filter(|&i| matches!(b.branches[i].kind, Kind::Conv(_))).collect();
        let i = convs[ch.pick(convs.len())];
        let a = ch.pick(r);
        let t = ch.of(&[1i64, -1, 2, -2]);
        let side = ch.pick(2);
        let what = ch.pick(10);
        let (cin, cout) = (b.cin, b.cout);
        let name = b.branches[i].name.clone();
        let input = b.input.clone();
        if matches!(what, 5..=7) {
            // the weight changes shape: no more sharing
            for br in &mut b.branches {
                if br.share_weight == Some(i) {
                    br.share_weight = None;
                }
            }
            b.branches[i].share_weight = None;
        }
        let Kind::Conv(g) = &mut b.branches[i].kind else { unreachable!() };
        if matches!(what, 1 | 8 | 9) {
            materialise_pads(&input, g);
        }
        let desc = match what {
            0 => {
                // shift the window by t: same output size, different taps
                let p = g.pad.get_or_insert_with(|| (vec![0; r], vec![0; r]));
                p.0[a] += t;
                p.1[a] -= t;
                format!("{name}: Pad node shifted by {t} on axis {a}")
            }
            1 => {
                let p = &mut g.pads[side * r + a];
                *p = (*p + t).max(0);
                format!("{name}: conv pad {} of axis {a} now {}", ["begin", "end"][side], *p)
            }
            2 => {
                let c = g.crop.get_or_insert_with(|| (vec![0; r], vec![0; r]));
                let v = if side == 0 { &mut c.0[a] } else { &mut c.1[a] };
                *v += t.abs();
                format!("{name}: Slice crop {} of axis {a} now {}", ["begin", "end"][side], *v)
            }
            3 => {
                g.strides[a] = 3 - g.strides[a];
                format!("{name}: stride {} on axis {a}", g.strides[a])
            }
            4 => {
                g.dilations[a] = 3 - g.dilations[a];
                format!("{name}: dilation {} on axis {a}", g.dilations[a])
            }
            5 => {
                g.kernel[a] = (g.kernel[a] as i64 + t).clamp(1, 8) as usize;
                format!("{name}: kernel {} on axis {a}", g.kernel[a])
            }
            6 => {
                let cands: Vec<usize> =
                    (1..=cin).filter(|&d| cin % d == 0 && g.out % d == 0 && d != g.groups).collect();
                if cands.is_empty() {
                    continue;
                }
                g.groups = cands[ch.pick(cands.len())];
                format!("{name}: groups {}", g.groups)
            }
            7 => {
                if cout == 1 {
                    continue;
                }
                g.out = 1;
                if g.groups > 1 {
                    g.groups = 1;
                }
                format!("{name}: one output channel")
            }
            8 => {
                // shift with the conv's own pads
                let (x, y) = (g.pads[a] + t, g.pads[r + a] - t);
                g.pads[a] = x.max(0);
                g.pads[r + a] = y.max(0);
                format!("{name}: conv pads shifted by {t} on axis {a} ({}, {})", g.pads[a], g.pads[r + a])
            }
            _ => {
                // crop one side, pad the other by the same amount: a shift through a Slice
                let c = g.crop.get_or_insert_with(|| (vec![0; r], vec![0; r]));
                let u = t.abs();
                if side == 0 {
                    c.0[a] += u;
                    g.pads[r + a] += u;
                } else {
                    c.1[a] += u;
                    g.pads[a] += u;
                }
                format!("{name}: Slice crop {} of axis {a} by {u}, conv pad on the other side", ["begin", "end"][side])
            }
        };
        b.mutations.push(desc);
    }
    // half the blocks keep their negative Pad amounts (crops), half have them as Slices
    let mut b = if ch.chance(50) { b } else { without_negative_pads(&b) };
    // most changes alter the output size, and a graph whose branches do not broadcast is
    // invalid: mostly, give the changed branches their old output size back by adjusting the
    // end padding (or crop) of each axis, which keeps them misaligned in the begin padding
    if ch.chance(80) {
        for br in &mut b.branches {
            let Kind::Conv(g) = &mut br.kind else { continue };
            for a in 0..r {
                let l = conv_in_len(&b.input, g, a);
                let (ep, ee) = eff_pads(g, a, l);
                let (s, d, k) = (g.strides[a] as i64, g.dilations[a] as i64, g.kernel[a] as i64);
                let span = l + ep + ee - d * (k - 1);
                let t = target[a] as i64;
                if span > (t - 1) * s && span <= t * s {
                    continue;
                }
                materialise_pads(&b.input, g);
                let ce = g.crop.as_ref().map_or(vec![0; r], |c| c.1.clone());
                let want = (t - 1) * s + 1 + ch.pick(s as usize) as i64;
                let mut delta = want - span;
                let crop_end = if ce[a] > 0 { Some(ce[a]) } else { None };
                if delta > 0 {
                    if let Some(c) = crop_end {
                        let u = c.min(delta);
                        g.crop.as_mut().unwrap().1[a] -= u;
                        delta -= u;
                    }
                    g.pads[r + a] += delta;
                } else {
                    let u = g.pads[r + a].min(-delta);
                    g.pads[r + a] -= u;
                    delta += u;
                    if delta < 0 {
                        g.crop.get_or_insert_with(|| (vec![0; r], vec![0; r])).1[a] += -delta;
                    }
                }
            }
        }
        b.mutations.push("output sizes restored through the end pads".into());
    }
    b
}
