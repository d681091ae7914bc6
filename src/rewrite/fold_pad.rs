//! A zero Pad before a Conv becomes the Conv's own padding: `Conv(Pad(x))` with constant-zero,
//! non-negative, spatial-only amounts is `Conv(x)` with those amounts added to its pads
//! (TorchScript exports `F.pad` before a conv as a Pad whose amounts a ConstantOfShape → … →
//! Cast chain computes).
//!
//! - find: a Conv reading a Pad read by nothing else, whose amounts are constants, zero-valued,
//!   non-negative and on spatial axes only (any other Pad is not a candidate: a crop or a
//!   pad-with-value is for the rules that merge branches).
//! - rewrite: the Conv with explicit pads, reading the Pad's input.

use super::{Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::{is_op, Label};
use crate::kernel::read::{read_conv, read_pad};
use crate::proto::{attribute_proto::AttributeType, AttributeProto};

pub(crate) struct FoldPad;

pub(crate) struct Candidate {
    conv: usize,
    pad: usize,
    amounts: (Vec<i64>, Vec<i64>),
}

impl Rule for FoldPad {
    type Candidate = Candidate;
    type Plan = Vec<i64>;
    const ID: RuleId = RuleId::FOLD_PAD;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let n = cx.node(at);
        if !is_op(n, "Conv") {
            return None;
        }
        let x = n.input.first()?;
        let pad = cx.producer(x)?;
        let pn = cx.node(pad);
        if !is_op(pn, "Pad") || cx.uses(x) != 1 || cx.ix.outputs.contains(x) {
            return None;
        }
        let rank = cx.consts.f64(n.input.get(1)?).ok()?.0.ndim();
        let amounts = read_pad(&cx.consts, pn, rank, cx.opset).ok()?;
        amounts.0.iter().chain(&amounts.1).all(|&p| p >= 0).then_some(Candidate { conv: at, pad, amounts })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Vec<i64>> {
        let n = cx.node(c.conv);
        match read_conv(&cx.consts, n) {
            Ok((k, _)) => {
                let mut pads: Vec<i64> = k.pads_begin.iter().zip(&c.amounts.0).map(|(a, b)| a + b).collect();
                pads.extend(k.pads_end.iter().zip(&c.amounts.1).map(|(a, b)| a + b));
                Checked::Fits(pads)
            }
            Err(err) => Checked::refuse(Reason::Conv { conv: n.label().to_string(), err }),
        }
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, pads: Vec<i64>) -> Patch {
        let mut node = cx.node(c.conv).clone();
        node.input[0] = cx.node(c.pad).input[0].clone();
        node.attribute.retain(|a| a.name() != "pads" && a.name() != "auto_pad");
        node.attribute.push(AttributeProto {
            name: Some("pads".into()),
            ints: pads,
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        });
        let log = Rewrite {
            rule: Self::ID,
            node: node.label().to_string(),
            detail: format!("Pad '{}' into the Conv's padding", cx.node(c.pad).label()),
            weights: vec![],
        };
        Patch { at: c.conv, remove: vec![c.pad], insert: vec![], replace: vec![(c.conv, node)], initializers: vec![], log }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.conv).label().to_string()
    }
}

#[cfg(test)]
mod tests {
    use crate::support::{rand_input, run_f32, Builder, ConvAttrs};

    #[test]
    fn a_zero_pad_before_a_conv_is_its_padding() {
        let mut b = Builder::new(2, 5, 5);
        let p = b.pad("pad", "x", &[0, 0, 1, 2, 0, 0, 2, 0], None);
        let (y, _, _) = b.conv_rand("conv", &p, 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 0, 0, 1]));
        b.output(&y);
        let original = b.build();
        let mut m = b.build();
        crate::rewrite::fuse(&mut m).unwrap();
        let conv = crate::support::only_conv(&m.proto);
        assert_eq!((conv.pads_begin.clone(), conv.pads_end.clone()), (vec![2, 2], vec![2, 1]));
        assert_eq!(m.graph().node.len(), 1);
        let x = rand_input(1, &[1, 2, 5, 5]);
        crate::support::assert_close(&run_f32(&m, std::slice::from_ref(&x)), &run_f32(&original, &[x]), 1e-6, "padded");
    }

    #[test]
    fn a_crop_or_a_pad_with_a_value_is_not_a_candidate() {
        for (pads, value) in [([0, 0, -1, 0, 0, 0, 1, 0], None), ([0, 0, 1, 1, 0, 0, 1, 1], Some(0.5))] {
            let mut b = Builder::new(2, 5, 5);
            let mut p = b.pad("pad", "x", &pads, None);
            if let Some(v) = value {
                let vn = b.initializer("value", &ndarray::arr0(v).into_dyn());
                b.graph.node.last_mut().unwrap().input.push(vn);
                p = b.graph.node.last().unwrap().output[0].clone();
            }
            let (y, _, _) = b.conv_rand("conv", &p, 3, 2, &[3, 3], true, ConvAttrs::default());
            b.output(&y);
            assert!(crate::rewrite::driver::at_node(&b, "conv", |cx, at| super::super::Rule::find(&super::FoldPad, cx, at)).is_none());
        }
    }
}
