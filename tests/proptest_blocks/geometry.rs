//! The geometry of branches (issues 25 and 27): blocks whose branches are placed by paddings on
//! each side (asymmetric, TensorFlow's "same" at a stride), `auto_pad` (NOTSET, SAME_UPPER,
//! SAME_LOWER, VALID), strides 1-3, input sizes even and odd, and dilations 1-3 around a large
//! base kernel; some branches are placed on the base's taps at the input size, others anywhere.
//!
//! The expectation is worked out here from the block's description, tap by tap: a branch lands
//! in the base when every one of its taps reads an input position the base reads with one of its
//! taps (relative to the output position), both give the same output size at the input size, the
//! strides, groups and channels are the same, and it never crops and pads one side. Then
//! merge_branches must merge the block (and the one Conv equal the branches computed here);
//! otherwise it must not, and every reason it gives must be true of the block.

use super::*;
use acnet_onnx::{Misfit, Reason};

/// A branch's geometry as it reads x: per axis, taps, dilation, stride, padding and crop (the
/// Pad node's, the Slice's and the Conv's own, `auto_pad` resolved at the Conv's input size).
#[derive(Clone, Debug)]
pub(crate) struct Eff {
    pub(crate) k: Vec<i64>,
    pub(crate) d: Vec<i64>,
    pub(crate) s: Vec<i64>,
    pub(crate) pb: Vec<i64>,
    pub(crate) pe: Vec<i64>,
    pub(crate) cb: Vec<i64>,
    pub(crate) ce: Vec<i64>,
    pub(crate) groups: usize,
    pub(crate) out_channels: usize,
    /// output size per axis
    pub(crate) out: Vec<i64>,
}

impl Eff {
    /// Input positions tap `i` reads on axis `a`, relative to `y·s` for output `y`.
    fn taps(&self, a: usize) -> Vec<i64> {
        (0..self.k[a]).map(|i| -self.pb[a] + self.cb[a] + i * self.d[a]).collect()
    }
    /// How many input positions its taps span (the window), per axis.
    fn window(&self) -> i64 {
        (0..self.k.len()).map(|a| (self.k[a] - 1) * if self.k[a] > 1 { self.d[a] } else { 0 } + 1).product()
    }
    fn volume(&self) -> i64 {
        self.k.iter().product()
    }
}

/// The geometry of branch `i` (a Conv, or the identity: one tap, stride 1, no padding).
pub(crate) fn eff(bl: &Block, i: usize) -> Eff {
    let r = bl.rank();
    match &bl.branches[i].kind {
        Kind::Conv(g) => {
            let mut e = Eff {
                k: g.kernel.iter().map(|&k| k as i64).collect(),
                d: g.dilations.iter().map(|&d| d as i64).collect(),
                s: g.strides.iter().map(|&s| s as i64).collect(),
                pb: vec![0; r],
                pe: vec![0; r],
                cb: vec![0; r],
                ce: vec![0; r],
                groups: g.groups,
                out_channels: g.out,
                out: vec![0; r],
            };
            for a in 0..r {
                let lin = conv_in_len(&bl.input, g, a);
                let (cp, cq) = eff_pads(g, a, lin);
                let (nb, ne) = g.pad.as_ref().map_or((0, 0), |(b, e)| (b[a], e[a]));
                let (sb, se) = g.crop.as_ref().map_or((0, 0), |(b, e)| (b[a], e[a]));
                e.pb[a] = cp + nb.max(0);
                e.pe[a] = cq + ne.max(0);
                e.cb[a] = sb + (-nb).max(0);
                e.ce[a] = se + (-ne).max(0);
                let span = lin + cp + cq - e.d[a] * (e.k[a] - 1);
                e.out[a] = ((span - 1).div_euclid(e.s[a]) + 1).max(0);
            }
            e
        }
        _ => Eff {
            k: vec![1; r],
            d: vec![1; r],
            s: vec![1; r],
            pb: vec![0; r],
            pe: vec![0; r],
            cb: vec![0; r],
            ce: vec![0; r],
            groups: 0,
            out_channels: bl.cin,
            out: bl.input.iter().map(|&l| l as i64).collect(),
        },
    }
}

/// Why branch `e` does not land in the base `b`, found tap by tap (`None`: it lands).
fn misfit(e: &Eff, b: &Eff, identity: bool) -> Option<String> {
    if !identity && (e.groups != b.groups || e.out_channels != b.out_channels) {
        return Some("groups or channels".into());
    }
    for a in 0..e.k.len() {
        if e.s[a] != b.s[a] {
            return Some(format!("stride on axis {a}"));
        }
        if (e.cb[a] > 0 && e.pb[a] > 0) || (e.ce[a] > 0 && e.pe[a] > 0) {
            return Some(format!("crop and pad on axis {a}"));
        }
        if e.out[a] != b.out[a] {
            return Some(format!("output size on axis {a}"));
        }
        let base = b.taps(a);
        if let Some(t) = e.taps(a).iter().find(|t| !base.contains(t)) {
            return Some(format!("tap reading {t} on axis {a} is none of the base's {base:?}"));
        }
    }
    None
}

/// The base merge_branches takes: the Conv branch of the largest window, then the most taps;
/// `None` when two share the largest (the first of them is the base, in the sum's order, which
/// is not the description's).
pub(crate) fn base_of(bl: &Block, effs: &[Eff]) -> Option<usize> {
    let convs: Vec<usize> = (0..bl.branches.len()).filter(|&i| matches!(bl.branches[i].kind, Kind::Conv(_))).collect();
    let key = |i: usize| (effs[i].window(), effs[i].volume());
    let best = convs.iter().map(|&i| key(i)).max()?;
    let at: Vec<usize> = convs.into_iter().filter(|&i| key(i) == best).collect();
    (at.len() == 1).then(|| at[0])
}

/// On axis `a`, whether some tap of `e` reads a position off the base's lattice (its taps'
/// positions extended both ways: one every `D`), and whether some lies past its window.
fn off_lattice(e: &Eff, b: &Eff, a: usize) -> (bool, bool) {
    let base = b.taps(a);
    let step = if b.k[a] > 1 { b.d[a] } else { 0 };
    let on = |t: i64| if step == 0 { t == base[0] } else { (t - base[0]).rem_euclid(step) == 0 };
    let taps = e.taps(a);
    let off = taps.iter().any(|&t| !on(t) && step > 0);
    let outside = taps.iter().any(|t| !base.contains(t));
    (off, outside)
}

/// TensorFlow's "same" pads (ONNX's SAME_UPPER) of a kernel `k`, dilation `d`, stride `s` on
/// an input of `len`.
fn tf_same(len: usize, k: usize, s: usize, d: usize) -> (i64, i64) {
    let g = Geo {
        kernel: vec![k],
        strides: vec![s],
        dilations: vec![d],
        pads: vec![0, 0],
        auto_pad: Some(AutoPad::SameUpper),
        crop: None,
        pad: None,
        groups: 1,
        out: 1,
    };
    eff_pads(&g, 0, len as i64)
}

/// A conv branch's window (input positions its taps span) and taps: the base is the largest.
fn key_of(g: &Geo) -> (usize, usize) {
    let w =
        (0..g.kernel.len()).map(|a| if g.kernel[a] > 1 { (g.kernel[a] - 1) * g.dilations[a] + 1 } else { 1 }).product();
    (w, g.kernel.iter().product())
}

fn key(b: &Branch) -> (usize, usize) {
    match &b.kind {
        Kind::Conv(g) => key_of(g),
        _ => (0, 0),
    }
}

/// A random block for the geometry property: drawn again at a larger input size (the same
/// choices) until every branch's crop leaves its Conv an input.
pub(crate) fn gen_geometry(v: &[u16]) -> Block {
    let mut at_least: Vec<usize> = vec![];
    let mut bl = gen_geometry_at(v, &at_least);
    for _ in 0..4 {
        let need = needed_input(&bl);
        if need.iter().zip(&bl.input).all(|(n, l)| n <= l) {
            break;
        }
        at_least = need;
        bl = gen_geometry_at(v, &at_least);
    }
    bl
}

/// The input size every branch's crop needs (one element left).
fn needed_input(bl: &Block) -> Vec<usize> {
    let mut need = bl.input.clone();
    for br in &bl.branches {
        let Kind::Conv(g) = &br.kind else { continue };
        for (a, n) in need.iter_mut().enumerate() {
            let mut crop = 0;
            if let Some((cb, ce)) = &g.crop {
                crop += cb[a] + ce[a];
            }
            if let Some((pb, pe)) = &g.pad {
                crop += (-pb[a]).max(0) + (-pe[a]).max(0);
            }
            *n = (*n).max(crop as usize + 1);
        }
    }
    need
}

fn gen_geometry_at(v: &[u16], at_least: &[usize]) -> Block {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let r = ch.of(&[2, 2, 2, 1]);
    let cin = 1 + ch.pick(4);
    let identity = ch.chance(20);
    let groups = match ch.pick(5) {
        1 | 2 => cin,
        3 if cin.is_multiple_of(2) => 2,
        _ => 1,
    };
    let cout = if identity || groups == cin { cin } else { groups * (1 + ch.pick(3)) };
    // the base: a large kernel, dilation 1-3, stride 1-3 per axis
    let big = ch.of(&[3, 5, 7, 9, 13]);
    let kk: Vec<usize> = (0..r).map(|_| if ch.chance(15) { ch.of(&[1, 3, 5]) } else { big }).collect();
    let dd: Vec<usize> = (0..r).map(|_| ch.of(&[1, 1, 1, 2, 3])).collect();
    let strides: Vec<usize> = (0..r).map(|_| if identity { 1 } else { ch.of(&[1, 1, 2, 2, 3]) }).collect();
    let mut input: Vec<usize> = (0..r).map(|a| (1 + ch.pick(16)).max(at_least.get(a).copied().unwrap_or(0))).collect();
    // its padding: "same", TensorFlow's "same" at the stride, per side, or auto_pad
    let mode = ch.pick(7);
    let auto_pad = match mode {
        4 => Some(AutoPad::SameUpper),
        5 => Some(AutoPad::SameLower),
        6 => Some(AutoPad::Valid),
        _ => None,
    };
    let mut pads = vec![0i64; 2 * r];
    for a in 0..r {
        let span = (dd[a] * (kk[a] - 1)) as i64;
        (pads[a], pads[r + a]) = match mode {
            0 => (span / 2, span - span / 2),
            1 => tf_same(input[a], kk[a], strides[a], dd[a]),
            2 | 3 => (ch.pick(span as usize + 1) as i64, ch.pick(span as usize + 1) as i64),
            _ => (0, 0),
        };
        // the base's output must not be empty
        let total = if auto_pad == Some(AutoPad::Valid) { 0 } else { pads[a] + pads[r + a] };
        let need = span + 1 - if auto_pad.is_some() && auto_pad != Some(AutoPad::Valid) { span } else { total };
        input[a] = input[a].max(need.max(1) as usize);
    }
    let base_geo = Geo {
        kernel: kk.clone(),
        strides: strides.clone(),
        dilations: dd.clone(),
        pads,
        auto_pad,
        crop: None,
        pad: None,
        groups,
        out: cout,
    };
    // the base's padding and output size at the input size
    let (pb, pe): (Vec<i64>, Vec<i64>) = (0..r).map(|a| eff_pads(&base_geo, a, input[a] as i64)).unzip();
    let outs: Vec<i64> = (0..r)
        .map(|a| (input[a] as i64 + pb[a] + pe[a] - (dd[a] * (kk[a] - 1)) as i64 - 1) / strides[a] as i64 + 1)
        .collect();
    let conv = |name: String, g: Geo, ch: &mut Ch| Branch {
        name,
        kind: Kind::Conv(g),
        bias: ch.chance(40),
        bn: ch.chance(30).then_some(BnStyle { epsilon: 1e-5, training_attr: false }),
        scale: None,
        share_weight: None,
    };
    let mut branches = vec![conv("base".into(), base_geo, ch)];
    let n = 1 + ch.pick(4);
    let base_key = key(&branches[0]);
    for j in 0..n {
        // the kernel: square, one axis long (Kx1, 1xK), one tap
        let shape = ch.pick(5);
        let long = ch.pick(r);
        let mut k: Vec<usize> = (0..r)
            .map(|a| match shape {
                0 | 1 => 1 + ch.pick(7),
                2 | 3 if a == long => 1 + ch.pick(7),
                _ => 1,
            })
            .collect();
        // placed on the base's taps (one every `step`), or anywhere
        let aligned = ch.chance(70);
        let mut g = Geo {
            kernel: vec![],
            strides: strides.clone(),
            dilations: vec![1; r],
            pads: vec![0; 2 * r],
            auto_pad: None,
            crop: None,
            pad: None,
            groups,
            out: cout,
        };
        let mut step = vec![1i64; r];
        for a in 0..r {
            let (kb, db) = (kk[a] as i64, dd[a] as i64);
            if aligned {
                step[a] = if kb > 1 { ch.of(&[1, 1, 1, 2, 3]) } else { 1 };
                k[a] = k[a].min(((kb - 1) / step[a] + 1) as usize);
                g.dilations[a] = if k[a] > 1 { (step[a] * db) as usize } else { ch.of(&[1, 1, 2, 3]) };
            } else {
                g.dilations[a] = ch.of(&[1, 1, 2, 3]);
                if ch.chance(15) {
                    g.strides[a] = ch.of(&[1, 2, 3]);
                }
            }
        }
        g.kernel = k;
        // one base: not the window and taps of the base
        if key_of(&g) == base_key {
            if let Some(a) = (0..r).find(|&a| g.kernel[a] > 1) {
                g.kernel[a] -= 1;
            }
        }
        // signed begin and end amounts per axis (negative: crop); the end gives the base's output
        // size (always when placed on its taps), or one (broadcast: a valid graph whose output
        // sizes differ)
        let restore = aligned || ch.chance(80);
        let (mut vb, mut ve) = (vec![0i64; r], vec![0i64; r]);
        for a in 0..r {
            let (kb, db) = (kk[a] as i64, dd[a] as i64);
            let (ka, d, s) = (g.kernel[a] as i64, g.dilations[a] as i64, g.strides[a] as i64);
            vb[a] = if aligned {
                let o = ch.pick((kb - (ka - 1) * step[a]) as usize) as i64;
                pb[a] - o * db
            } else {
                ch.pick(6) as i64 - 2
            };
            // L + vb + ve - d(k-1) - 1 in [(O-1)s, Os)
            let target = if restore || ch.chance(50) { outs[a] } else { 1 };
            ve[a] = (target - 1) * s + d * (ka - 1) + 1 - input[a] as i64 + ch.pick(s as usize) as i64 - vb[a];
        }
        // the amounts: a Pad node (crops included), or Conv pads and a Slice for the crops
        if vb.iter().chain(&ve).any(|&v| v < 0) && ch.chance(30) {
            g.pad = Some((vb.clone(), ve.clone()));
        } else {
            for a in 0..r {
                g.pads[a] = vb[a].max(0);
                g.pads[r + a] = ve[a].max(0);
            }
            let (mut cb, mut ce): (Vec<i64>, Vec<i64>) = (0..r).map(|a| ((-vb[a]).max(0), (-ve[a]).max(0))).unzip();
            if !aligned && ch.chance(15) {
                // a crop and a pad of one side (the same output size): it reads zeros where x
                // has values
                let (a, end) = (ch.pick(r), ch.chance(50));
                let (c, p) = if end { (&mut ce[a], r + a) } else { (&mut cb[a], a) };
                *c += 1;
                g.pads[p] += 1;
            }
            if cb.iter().chain(&ce).any(|&c| c > 0) {
                g.crop = Some((cb, ce));
            } else if ch.chance(30) {
                // auto_pad where it gives these pads at the input size, or (seldom) anywhere
                let mode = ch.of(&[AutoPad::SameUpper, AutoPad::SameLower, AutoPad::Valid]);
                let mut t = g.clone();
                t.auto_pad = Some(mode);
                let same = (0..r).all(|a| eff_pads(&t, a, input[a] as i64) == (g.pads[a], g.pads[r + a]));
                if same || ch.chance(15) {
                    g.auto_pad = Some(mode);
                }
            }
        }
        let name = format!("b{j}");
        branches.push(conv(name, g, ch));
    }
    // the identity where the base keeps the size
    let identity = identity && (0..r).all(|a| outs[a] == input[a] as i64);
    if identity {
        let bn = ch.chance(40).then_some(BnStyle { epsilon: 1e-3, training_attr: false });
        let kind = if bn.is_some() { Kind::IdentityBn } else { Kind::Identity };
        branches.push(Branch { name: "id".into(), kind, bias: false, bn, scale: None, share_weight: None });
    }
    let mut order: Vec<usize> = (0..branches.len()).collect();
    for i in (1..order.len()).rev() {
        let j = ch.pick(i + 1);
        order.swap(i, j);
    }
    let tree =
        if ch.chance(20) { Tree::Sum(order.iter().map(|&l| Tree::Leaf(l)).collect()) } else { gen_tree(ch, &order) };
    Block { seed, k: kk[0], cin, cout, input, branches, tree, ..Block::plain() }
}

/// Whether the refusal `misfit` of branch `i` against the base is true of the block.
fn misfit_is_true(m: &Misfit, e: &Eff, b: &Eff, bl: &Block) -> Result<(), String> {
    let ok = match *m {
        Misfit::Stride { small, large, axis } => {
            e.s[axis] == small as i64 && b.s[axis] == large as i64 && small != large
        }
        Misfit::Dilation { small, large, axis } => {
            e.k[axis] > 1 && e.d[axis] == small && b.d[axis] == large && small % large != 0 && off_lattice(e, b, axis).0
        }
        Misfit::BetweenTaps { axis, .. } => off_lattice(e, b, axis).0,
        Misfit::DoesNotFit { axis, .. } => off_lattice(e, b, axis) == (false, true),
        Misfit::OutputSize { axis, small, large, input } => {
            e.out[axis] == small && b.out[axis] == large && small != large && bl.input[axis] == input
        }
        Misfit::CropAndPad { axis } => (e.cb[axis] > 0 && e.pb[axis] > 0) || (e.ce[axis] > 0 && e.pe[axis] > 0),
        Misfit::Groups(x, y) => x != y && y == b.groups,
        Misfit::OutChannels(x, y) => x != y && x == e.out_channels && y == b.out_channels,
        // the input size is fixed (declared); no crop is negative; ranks are equal
        Misfit::OutputSizeVaries { .. }
        | Misfit::NegativeCrop { .. }
        | Misfit::Rank(..)
        | Misfit::InChannelsPerGroup(..) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("untrue: {m}\nbranch {e:?}\nbase {b:?}"))
    }
}

pub(crate) fn check_geometry(bl: &Block) -> Result<(), TestCaseError> {
    let Ok(shapes) = leaf_shapes(bl) else { return Err(TestCaseError::reject("invalid conv")) };
    if broadcast(&shapes).is_none() {
        return Err(TestCaseError::reject("branch shapes do not broadcast"));
    }
    let effs: Vec<Eff> = (0..bl.branches.len()).map(|i| eff(bl, i)).collect();
    let Some(base) = base_of(bl, &effs) else { return Err(TestCaseError::reject("two bases")) };
    // what merge_branches must do, tap by tap
    let mut misfits: Vec<(usize, String)> = (0..bl.branches.len())
        .filter(|&i| i != base)
        .filter_map(|i| misfit(&effs[i], &effs[base], !matches!(bl.branches[i].kind, Kind::Conv(_))).map(|m| (i, m)))
        .collect();
    if effs[base].cb.iter().chain(&effs[base].ce).any(|&c| c > 0) {
        // (the merged Conv would have to crop)
        misfits.push((base, "the base crops".into()));
    }
    let built = build(bl);
    let original = built.builder.build();
    let mut m = built.builder.build();
    let r = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    let merged = r.rewrites.iter().any(|w| w.rule == RuleId::MERGE_BRANCHES);
    if misfits.is_empty() && !merged {
        return Err(fail("every branch lands in the base, but the block was not merged", "", &r));
    }
    if merged && !misfits.is_empty() {
        return Err(fail("merged, but a branch does not land in the base", format!("{misfits:?}"), &r));
    }
    // every reason given is true
    let branch_of = |leaf: &str| {
        if leaf == "x" {
            return bl.branches.iter().position(|b| b.kind == Kind::Identity);
        }
        bl.branches.iter().position(|b| leaf.split('.').next() == Some(b.name.as_str()))
    };
    for f in r.refused.iter().filter(|f| f.rule == RuleId::MERGE_BRANCHES) {
        let truth = match &f.reason {
            Reason::Misfit { branch, misfit } => match branch_of(branch) {
                Some(i) if i != base => misfit_is_true(misfit, &effs[i], &effs[base], bl),
                _ => Err(format!("no such branch: {branch}")),
            },
            Reason::CroppedBase { .. } => match &bl.branches[base].kind {
                Kind::Conv(g)
                    if g.crop.is_some() || g.pad.as_ref().is_some_and(|p| p.0.iter().chain(&p.1).any(|&v| v < 0)) =>
                {
                    Ok(())
                }
                _ => Err("the base has no crop".into()),
            },
            other => Err(format!("unexpected: {other}")),
        };
        truth.map_err(|e| fail("a reason that is not true", e, &r))?;
        if misfits.is_empty() {
            return Err(fail("refused a block whose branches all land in the base", &f.reason, &r));
        }
    }
    if m.proto != original.proto {
        tract_verify(&tract_runnable(&original), &tract_runnable(&m)).map_err(|e| fail("tract", e, &r))?;
    }
    if r.after.ops == fused_ops(bl) {
        let tol = if r.rewrites.iter().any(|w| w.rule == "affine_region") { 1e-5 } else { 1e-6 };
        check_independent(bl, &built, &m, tol).map_err(|e| fail("fused conv vs the branches computed here", e, &r))?;
    } else if merged {
        return Err(fail("merged, but not into one Conv", format!("{:?}", r.after.ops), &r));
    }
    Ok(())
}
