//! Two convolutions in sequence with nothing between become one (the expand → KxK → squeeze
//! convolutions of efficient super-resolution networks, 1x1 → KxK, KxK → 1x1), composed in f64
//! with the biases pushed through (see [`AffineConv::then_conv`]).
//!
//! - find: a Conv reading the output of another Conv that nothing else reads (not when the first
//!   has a window and the second pads: that is never one Conv).
//! - check: the composition is exact ([`SeqMisfit`]: the second may zero-pad the first's output
//!   only where the first is a one-tap kernel without bias), and worth it: the composed Conv holds
//!   no more weights and costs no more multiply-adds per output position than the two (1x1 →
//!   depthwise 5x5 would become a dense 5x5, many times the cost: refused, with the numbers). A
//!   chain that is a branch of a sum whose Conv holds the composition costs nothing there:
//!   merge_branches composes it when it merges the sum (the refusal says so, or why not).
//! - rewrite: one Conv, with the second's node name, reads the first's input.

use super::merge_branches::chain_in_sum;
use super::{kernel_str, rewired_conv, Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{attr_ints, attr_string, is_op, Label};
use crate::kernel::read::read_conv;
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;
use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};

pub(crate) struct MergeSequential;

pub(crate) struct Candidate {
    first: usize,
    second: usize,
}

impl Rule for MergeSequential {
    type Candidate = Candidate;
    type Plan = (AffineConv, FloatType);
    const ID: RuleId = RuleId::MERGE_SEQUENTIAL;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let n = cx.node(at);
        if !is_op(n, "Conv") {
            return None;
        }
        let y = n.input.first()?;
        let first = cx.producer(y)?;
        if !is_op(cx.node(first), "Conv") || cx.uses(y) != 1 || cx.ix.outputs.contains(y) {
            return None;
        }
        // two window convs, the second padding the first's output (a 3x3 after a 3x3): never one
        // Conv, so not a candidate (checked on the attributes, before any weight is read)
        let kernel = |n: &NodeProto| -> Option<Vec<i64>> {
            let w = cx.ix.constant(cx.g, n.input.get(1)?)?;
            (w.dims.len() > 2).then(|| w.dims[2..].to_vec())
        };
        // per axis: the second pads it (explicitly, or SAME with a kernel longer than 1); an axis
        // the second does not have is not padded (convs of two ranks: the check refuses them)
        let padded = |a: usize| {
            let k = kernel(n).unwrap_or_default();
            let r = k.len();
            a < r
                && (attr_ints(n, "pads").is_some_and(|p| p.len() == 2 * r && (p[a] != 0 || p[r + a] != 0))
                    || attr_string(n, "auto_pad").is_some_and(|s| s.starts_with("SAME")) && k[a] > 1)
        };
        let windows = kernel(cx.node(first)).is_some_and(|k| (0..k.len()).any(|a| k[a] > 1 && padded(a)));
        (!windows).then_some(Candidate { first, second: at })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Self::Plan> {
        let (n1, n2) = (cx.node(c.first), cx.node(c.second));
        let read = |n: &NodeProto| {
            read_conv(&cx.consts, n).map_err(|err| Reason::Conv { conv: n.label().to_string(), err })
        };
        let ((k1, f1), (k2, f2)) = match (read(n1), read(n2)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Checked::refuse(e),
        };
        if f1 != f2 {
            return Checked::refuse(Reason::BranchDtypes);
        }
        let (first, second) = (n1.label().to_string(), n2.label().to_string());
        let k = match k1.then_conv(&k2) {
            Ok(k) => k,
            Err(misfit) => return Checked::refuse(Reason::Sequential { first, second, misfit }),
        };
        // worth it: weights, and multiply-adds per output position (the first runs at the
        // second's stride² more positions)
        let chain_weights = k1.weight.len() + k2.weight.len();
        let chain_macs = k1.weight.len() * k2.strides.iter().product::<usize>() + k2.weight.len();
        let weights = k.weight.len();
        if weights > chain_weights || weights > chain_macs {
            // in a sum whose Conv holds the composition, merge_branches composes them as it
            // merges the sum, at no cost (and only then); say which
            let sum = chain_in_sum(cx, c.second).map(Box::new);
            return Checked::refuse(Reason::SequentialCost {
                first,
                second,
                kernel: kernel_str(k.kernel()),
                weights,
                chain_weights,
                chain_macs,
                sum,
            });
        }
        Checked::Fits((k, f2))
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, (k, ft): Self::Plan) -> Patch {
        let (n1, n2) = (cx.node(c.first), cx.node(c.second));
        let (wname, bname) = cx.names().conv_params(cx.ix, n2);
        let mut node = rewired_conv(n2, &n1.input[0], &wname, &bname, &n2.output[0]);
        // no bias when neither had one (it is zero)
        let biased = |n: &NodeProto| n.input.get(2).is_some_and(|b| !b.is_empty());
        let bias = (biased(n1) || biased(n2)).then_some(bname);
        if bias.is_none() {
            node.input.truncate(2);
        }
        let r = k.rank();
        let ints = |name: &str, v: Vec<i64>| AttributeProto {
            name: Some(name.into()),
            ints: v,
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        };
        node.attribute.retain(|a| !matches!(a.name(), "pads" | "auto_pad" | "strides" | "dilations" | "kernel_shape" | "group"));
        let mut pads = k.pads_begin.clone();
        pads.extend(&k.pads_end);
        node.attribute.push(ints("kernel_shape", k.kernel().iter().map(|&v| v as i64).collect()));
        node.attribute.push(ints("pads", pads));
        node.attribute.push(ints("strides", k.strides.iter().map(|&v| v as i64).collect()));
        node.attribute.push(ints("dilations", k.dilations.iter().map(|&v| v as i64).collect()));
        node.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(k.groups as i64),
            r#type: Some(AttributeType::Int as i32),
            ..Default::default()
        });
        let detail = format!(
            "Conv '{}' {} then Conv '{}' {} into one {} ({}-d)",
            n1.label(),
            kernel_str(&cx.consts.f64(&n1.input[1]).map(|(w, _)| w.shape()[2..].to_vec()).unwrap_or_default()),
            n2.label(),
            kernel_str(&cx.consts.f64(&n2.input[1]).map(|(w, _)| w.shape()[2..].to_vec()).unwrap_or_default()),
            kernel_str(k.kernel()),
            r
        );
        Patch {
            at: c.second,
            remove: vec![c.first, c.second],
            insert: vec![node],
            replace: vec![],
            initializers: std::iter::once((wname, k.weight.into(), ft))
                .chain(bias.map(|b| (b, k.bias.into_dyn().into(), ft)))
                .collect(),
            log: Rewrite { rule: Self::ID, node: n2.label().to_string(), detail, weights: vec![] },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.second).label().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::SeqMisfit;
    use crate::rewrite::driver::at_node;
    use crate::support::{affine, rand_input, Builder, ConvAttrs};

    fn check_at(b: &Builder, conv: &str) -> Checked<(AffineConv, FloatType)> {
        at_node(b, conv, |cx, at| MergeSequential.check(cx, &MergeSequential.find(cx, at).expect("a Conv after a Conv")))
    }

    fn refused(c: Checked<(AffineConv, FloatType)>) -> Reason {
        match c {
            Checked::Refused(mut r) if r.len() == 1 => r.remove(0),
            _ => panic!("expected one refusal"),
        }
    }

    #[test]
    fn expand_kxk_squeeze_is_one_conv() {
        // 1x1 (pads 1, 4 → 8) → 3x3 stride 2 (8 → 8) → 1x1 (8 → 4)
        let mut b = Builder::new(4, 7, 7);
        let (a, wa, ba) = b.conv_rand("expand", "x", 8, 4, &[1, 1], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (k, wk, bk) = b.conv_rand("kxk", &a, 8, 8, &[3, 3], true, ConvAttrs::default().strides(&[2, 2]));
        let (y, wy, by) = b.conv_rand("squeeze", &k, 4, 8, &[1, 1], true, ConvAttrs::default());
        b.output(&y);
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert_eq!(report.blocks_merged, 2);
        let fused = crate::support::only_conv(&m.proto);
        assert_eq!((fused.kernel(), fused.strides.as_slice()), (&[3usize, 3][..], &[2usize, 2][..]));
        let x = rand_input(1, &[1, 4, 7, 7]);
        let want = affine(&wy, by.as_ref(), 1, &[1, 1], &[1, 1], &[0, 0, 0, 0]).apply(
            &affine(&wk, bk.as_ref(), 1, &[2, 2], &[1, 1], &[0, 0, 0, 0])
                .apply(&affine(&wa, ba.as_ref(), 1, &[1, 1], &[1, 1], &[1, 1, 1, 1]).apply(&x)),
        );
        crate::support::assert_close(&fused.apply(&x), &want, 1e-6, "composed (weights rounded to f32)");
    }

    #[test]
    fn padding_a_biased_intermediate_is_refused() {
        let mut b = Builder::new(4, 6, 6);
        let (a, _, _) = b.conv_rand("pw", "x", 4, 4, &[1, 1], true, ConvAttrs::default());
        let (y, _, _) = b.conv_rand("kxk", &a, 4, 4, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        b.output(&y);
        assert_eq!(
            refused(check_at(&b, "kxk")),
            Reason::Sequential { first: "pw".into(), second: "kxk".into(), misfit: SeqMisfit::PaddedBias { axis: 0 } }
        );
    }

    #[test]
    fn pointwise_then_depthwise_stays_two_convs() {
        let mut b = Builder::new(8, 9, 9);
        let (a, _, _) = b.conv_rand("pw", "x", 8, 8, &[1, 1], true, ConvAttrs::pads(&[2, 2, 2, 2]));
        let (y, _, _) = b.conv_rand("dw", &a, 8, 1, &[5, 5], true, ConvAttrs::default().group(8));
        b.output(&y);
        assert_eq!(
            refused(check_at(&b, "dw")),
            Reason::SequentialCost {
                first: "pw".into(),
                second: "dw".into(),
                kernel: "5x5".into(),
                weights: 8 * 8 * 25,
                chain_weights: 64 + 200,
                chain_macs: 64 + 200,
                sum: None
            }
        );
    }
}
