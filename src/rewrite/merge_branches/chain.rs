//! Two convolutions in sequence as a branch of a sum (RepNeXt's 1x7 → 7x1 and 1x5 → 5x1 beside
//! a 7x7, a stride-2 1x3 → 3x1 beside a 3x3).
//!
//! Alone, such a chain stays two convs when their composition costs more (merge_sequential). In
//! a sum it costs nothing when a Conv of the sum reading the same input holds the composition —
//! it fits inside that Conv's kernel at a whole tap offset with the same output, stride and groups
//! ([`AffineConv::offset_in`]): the merged sum is that Conv's size with or without the chain. Such
//! a chain is then a branch of that Conv's group, composed in f64 ([`AffineConv::then_conv`], with
//! its exactness conditions) when the group is merged; and only then, so a chain is never
//! composed for a sum that is not merged. Otherwise it is the branch it was (the second Conv,
//! reading the first's output), and merge_sequential says why it stays two ([`chain_in_sum`]).
//!
//! [`AffineConv::offset_in`]: crate::kernel::AffineConv::offset_in
//! [`AffineConv::then_conv`]: crate::kernel::AffineConv::then_conv

use super::branch::{Branch, Kind};
use super::constants::channel_vector;
use super::values::{load, load_chain};
use super::{Checked, Cx, MergeBranches};
use crate::graph::is_op;
use crate::rewrite::sum_tree::root_above;
use crate::rewrite::{kernel_str, ChainSum, Rule};

/// A Conv branch that is two Convs in sequence: the first, the Slice or Pad it reads through (if
/// any), and the tensor it reads.
fn chain_shape(cx: &Cx, b: &Branch) -> Option<(usize, Option<usize>, String)> {
    let Kind::Conv { through: None, .. } = b.kind else { return None };
    let first = cx.producer(&b.source)?;
    if !is_op(cx.node(first), "Conv") || cx.uses(&b.source) != 1 || cx.ix.outputs.contains(&b.source) {
        return None;
    }
    let mut source = cx.node(first).input.first()?.clone();
    let mut through = None;
    if let Some(q) = cx.producer(&source) {
        let pn = cx.node(q);
        if (is_op(pn, "Slice") || is_op(pn, "Pad")) && cx.uses(&source) == 1 {
            through = Some(q);
            source = pn.input[0].clone();
        }
    }
    Some((first, through, source))
}

/// What the sum does with a chain branch.
enum Fate {
    /// Branch `holder` (a Conv of the same input, the largest) holds its composition: the chain
    /// as a branch of that group.
    Held { holder: usize, kernel: Vec<usize>, chain: Branch },
    /// No Conv of the same input holds it; the largest of them (index, kernel).
    NotHeld { largest: Option<(usize, Vec<usize>)> },
}

/// The fate of branch `k` of `branches`, when it is a chain whose composition is exact (else
/// `None`: merge_sequential says why it is not one Conv).
fn fate(cx: &Cx, branches: &[Branch], k: usize) -> Option<Fate> {
    let b = &branches[k];
    let (first, through, source) = chain_shape(cx, b)?;
    let Kind::Conv { conv: second, .. } = b.kind else { return None };
    let (composed, ft) = load_chain(cx, first, through, second).ok()?;
    // the base of the same input's Conv branches (the first of equal ones), as the merge picks it
    let mut largest: Option<(usize, crate::kernel::AffineConv, crate::model::tensor::FloatType)> = None;
    for (j, o) in branches.iter().enumerate() {
        let Kind::Conv { conv, through } = o.kind else { continue };
        if j == k || o.source != source {
            continue;
        }
        // (one that cannot be read: the group is refused, and says why)
        let Ok((c, cft)) = load(cx, conv, through) else { continue };
        // (the largest window, then the most taps: as the merge picks its base)
        let key = |c: &crate::kernel::AffineConv| super::branch::base_key(&c.geometry());
        if largest.as_ref().is_none_or(|(_, l, _)| key(&c) > key(l)) {
            largest = Some((j, c, cft));
        }
    }
    let Some((holder, big, bft)) = largest else { return Some(Fate::NotHeld { largest: None }) };
    let scales_fit = b.scales.iter().all(|s| channel_vector(s, composed.out_channels(), composed.rank()).is_some());
    let fits = big.crop_begin.iter().chain(&big.crop_end).all(|&c| c == 0) && composed.offset_in(&big).is_ok();
    if !(fits && scales_fit && ft == bft) {
        return Some(Fate::NotHeld { largest: Some((holder, big.kernel().to_vec())) });
    }
    let mut nodes = b.nodes.clone();
    nodes.push(first);
    nodes.extend(through);
    let chain = Branch { source, kind: Kind::Chain { first, through, second }, nodes, ..b.clone() };
    Some(Fate::Held { holder, kernel: big.kernel().to_vec(), chain })
}

/// `branches` with every chain a Conv of its group holds as a branch of that group; `None` when
/// there is none.
pub(super) fn promote(cx: &Cx, branches: &[Branch]) -> Option<Vec<Branch>> {
    let mut promoted: Option<Vec<Branch>> = None;
    for k in 0..branches.len() {
        if let Some(Fate::Held { chain, .. }) = fate(cx, branches, k) {
            promoted.get_or_insert_with(|| branches.to_vec())[k] = chain;
        }
    }
    promoted
}

/// When Conv `second` (reading Conv `first`'s output) is a branch of a sum: whether a Conv of the
/// sum holds their composition, and whether the sum is merged.
pub(crate) fn chain_in_sum(cx: &Cx, second: usize) -> Option<ChainSum> {
    let root = root_above(cx, cx.node(second).output.first()?)?;
    let c = MergeBranches.find(cx, root)?;
    let k = c.branches.iter().position(|b| matches!(b.kind, Kind::Conv { conv, .. } if conv == second))?;
    let sum = cx.node(root).name().to_string();
    let name = |j: usize| match c.branches[j].kind {
        Kind::Conv { conv, .. } => cx.node(conv).name().to_string(),
        _ => c.branches[j].leaf.clone(),
    };
    Some(match fate(cx, &c.branches, k)? {
        Fate::Held { holder, kernel, .. } => {
            let merged = match MergeBranches.check(cx, &c) {
                Checked::Fits(p) | Checked::Partly(p, _) => p.merged.iter().any(|m| m.members.contains(&k)),
                Checked::Refused(_) => false,
            };
            ChainSum::Held { sum, conv: name(holder), kernel: kernel_str(&kernel), merged }
        }
        Fate::NotHeld { largest } => {
            ChainSum::NotHeld { sum, largest: largest.map(|(j, k)| (name(j), kernel_str(&k))) }
        }
    })
}

#[cfg(test)]
mod tests {
    use crate::kernel::SeqMisfit;
    use crate::rewrite::{fuse, ChainSum, FuseReport, Reason};
    use crate::support::{assert_close, only_conv, rand_input, run_f32, Builder, ConvAttrs};

    const C: usize = 4;

    /// `name.w` (1xk, stride (1, s)) then `name.h` (kx1, stride (s, 1)), depthwise, on `x`.
    fn chain(b: &mut Builder, name: &str, x: &str, k: usize, s: i64, bias: bool) -> String {
        let p = (k / 2) as i64;
        let wa = ConvAttrs::pads(&[0, p, 0, p]).strides(&[1, s]).group(C as i64);
        let (w, _, _) = b.conv_rand(&format!("{name}.w"), x, C, 1, &[1, k], bias, wa);
        let ha = ConvAttrs::pads(&[p, 0, p, 0]).strides(&[s, 1]).group(C as i64);
        b.conv_rand(&format!("{name}.h"), &w, C, 1, &[k, 1], bias, ha).0
    }

    /// A KxK depthwise Conv of stride `s` (pads K/2, bias) on `x`.
    fn square(b: &mut Builder, name: &str, x: &str, k: usize, s: i64) -> String {
        let p = (k / 2) as i64;
        b.conv_rand(name, x, C, 1, &[k, k], true, ConvAttrs::pads(&[p, p, p, p]).strides(&[s, s]).group(C as i64)).0
    }

    /// Fuse `b`'s model; it must compute what it did (in tract).
    fn fused(b: &Builder) -> (crate::Model, FuseReport) {
        let original = b.build();
        let mut m = b.build();
        let report = fuse(&mut m).unwrap();
        let x = rand_input(3, &[1, C, 9, 10]);
        assert_close(
            &run_f32(&m, std::slice::from_ref(&x)),
            &run_f32(&original, &[x]),
            1e-5,
            "fused vs original, in tract",
        );
        (m, report)
    }

    fn cost_refusal(r: &FuseReport, second: &str) -> Option<ChainSum> {
        let refusal = r
            .refused
            .iter()
            .find(|f| f.node == second)
            .unwrap_or_else(|| panic!("no refusal at '{second}': {:?}", r.refused));
        match &refusal.reason {
            Reason::SequentialCost { sum, .. } => sum.as_deref().cloned(),
            other => panic!("not a cost refusal: {other}"),
        }
    }

    /// RepNeXt's RepDWConvM: 7x7 + 5x3 + 3x5 + (1x7 → 7x1) + (1x5 → 5x1), at stride 1 and 2: the
    /// chains cost nothing in the 7x7, so the block is one 7x7 Conv.
    #[test]
    fn chains_a_conv_of_their_sum_holds_merge_into_it() {
        for s in [1, 2] {
            let mut b = Builder::new(C, 9, 10);
            let big = square(&mut b, "k7", "x", 7, s);
            let (k53, _, _) = b.conv_rand(
                "k53",
                "x",
                C,
                1,
                &[5, 3],
                true,
                ConvAttrs::pads(&[2, 1, 2, 1]).strides(&[s, s]).group(C as i64),
            );
            let c7 = chain(&mut b, "c7", "x", 7, s, false);
            let c5 = chain(&mut b, "c5", "x", 5, s, false);
            let a = b.add("a1", &big, &k53);
            let a = b.add("a2", &a, &c7);
            let y = b.add("a3", &a, &c5);
            b.output(&y);
            let (m, r) = fused(&b);
            assert!(r.refused.is_empty(), "stride {s}: {}", r.summary());
            assert_eq!(only_conv(&m.proto).kernel(), [7, 7]);
            let detail = &r.rewrites.iter().find(|w| w.rule == "merge_branches").unwrap().detail;
            assert!(detail.contains("1x7 then 7x1") && detail.contains("1x5 then 5x1"), "{detail}");
        }
    }

    /// RepNeXt's RepDWConvS at stride 2 (its dilated 2x2 aside): 3x3 stride 2 + (1x3 stride
    /// (1, 2) → 3x1 stride (2, 1), no biases): one 3x3 of stride 2.
    #[test]
    fn a_strided_1x3_3x1_chain_beside_a_strided_3x3_merges_into_it() {
        let mut b = Builder::new(C, 9, 10);
        let sq = square(&mut b, "k3", "x", 3, 2);
        let c3 = chain(&mut b, "c3", "x", 3, 2, false);
        let y = b.add("sum", &sq, &c3);
        b.output(&y);
        let (m, r) = fused(&b);
        assert!(r.refused.is_empty(), "{}", r.summary());
        let k = only_conv(&m.proto);
        assert_eq!((k.kernel(), k.strides.as_slice()), (&[3usize, 3][..], &[2usize, 2][..]));
    }

    /// Alone, a 1x7 → 7x1 chain would become a dense 7x7: it stays two, for its cost.
    #[test]
    fn a_chain_alone_stays_two_for_its_cost() {
        let mut b = Builder::new(C, 9, 10);
        let y = chain(&mut b, "c7", "x", 7, 1, false);
        b.output(&y);
        let (m, r) = fused(&b);
        assert_eq!(m.proto, b.build().proto);
        assert_eq!(cost_refusal(&r, "c7.h"), None);
        assert!(
            r.refused[0].reason.to_string().ends_with("vs 56 weights and 56 multiply-adds for the two: left as two"),
            "{}",
            r.summary()
        );
    }

    /// Beside a 3x3, the 7x7 a chain would become is the sum's largest kernel: merged, the sum
    /// would cost as much as the dense 7x7. It stays two, and says so.
    #[test]
    fn a_chain_no_conv_of_its_sum_holds_stays_two() {
        let mut b = Builder::new(C, 9, 10);
        let sq = square(&mut b, "k3", "x", 3, 1);
        let c7 = chain(&mut b, "c7", "x", 7, 1, false);
        let y = b.add("sum", &sq, &c7);
        b.output(&y);
        let (m, r) = fused(&b);
        assert_eq!(m.proto, b.build().proto);
        assert_eq!(
            cost_refusal(&r, "c7.h"),
            Some(ChainSum::NotHeld { sum: "sum".into(), largest: Some(("k3".into(), "3x3".into())) })
        );
        assert!(
            r.summary().contains("(the largest is the 3x3 Conv 'k3'), so merging it there costs the same: left as two"),
            "{}",
            r.summary()
        );
    }

    /// A 7x7 holds the chain, but the sum is refused (a branch's weight is a graph input): the
    /// chain is not composed either, and says why.
    #[test]
    fn a_chain_held_by_a_sum_that_is_refused_stays_two() {
        let mut b = Builder::new(C, 9, 10);
        let big = square(&mut b, "k7", "x", 7, 1);
        let k3 = square(&mut b, "k3", "x", 3, 1);
        let c7 = chain(&mut b, "c7", "x", 7, 1, false);
        let a = b.add("a1", &big, &k3);
        let y = b.add("a2", &a, &c7);
        b.output(&y);
        let w = b.graph.initializer.iter().find(|t| t.name() == "k3.w").unwrap().clone();
        b.graph.input.push(crate::support::tensor_info("k3.w", crate::proto::tensor_proto::DataType::Float, &w.dims));
        let (m, r) = fused(&b);
        assert_eq!(m.proto, b.build().proto);
        let held = ChainSum::Held { sum: "a2".into(), conv: "k7".into(), kernel: "7x7".into(), merged: false };
        assert_eq!(cost_refusal(&r, "c7.h"), Some(held));
        assert!(r.refused.iter().any(|f| f.rule == "merge_branches" && f.node == "a2"), "{}", r.summary());
    }

    /// A chain whose first Conv has a bias, zero-padded by the second: not one Conv, in a sum or
    /// not; it stays, with its reason, and the sum leaves it out.
    #[test]
    fn a_chain_with_a_biased_padded_border_stays_in_its_sum() {
        let mut b = Builder::new(C, 9, 10);
        let big = square(&mut b, "k7", "x", 7, 1);
        let k3 = square(&mut b, "k3", "x", 3, 1);
        let c7 = chain(&mut b, "c7", "x", 7, 1, true);
        let a = b.add("a1", &big, &k3);
        let y = b.add("a2", &a, &c7);
        b.output(&y);
        let (m, r) = fused(&b);
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Conv", "Conv", "Conv", "Add"], "{}", r.summary());
        let misfit = SeqMisfit::PaddedBias { axis: 0 };
        assert_eq!(r.refused.len(), 1, "{}", r.summary());
        assert_eq!(r.refused[0].reason, Reason::Sequential { first: "c7.w".into(), second: "c7.h".into(), misfit });
    }
}
