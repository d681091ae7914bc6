//! Conv → BatchNormalization (inference) becomes one Conv: W·γ/σ, (b − μ)·γ/σ + β.
//!
//! When the weight is a stored tensor the rewrite has not written, the folded weight is not
//! computed here: it is the stored bytes and a factor per output channel ([`Exact::Scaled`]),
//! computed by whatever reads it next (a merge of the block's branches reads it from there) or,
//! for a Conv only folded, written from the stored bytes in one pass when the rewrite ends.

use super::{Checked, Cx, Patch, Reason, Rule, RuleId};
use crate::graph::{is_op, Exact, Label};
use crate::kernel::read::{read_bn, read_conv_form, read_conv_unresolved};
use crate::model::tensor::{FloatType, Scaled};
use ndarray::{Array1, ArrayD};

pub(crate) struct FoldBn;

/// The BatchNormalization and the Conv it reads.
pub(crate) struct Candidate {
    bn: usize,
    conv: usize,
}

impl Rule for FoldBn {
    type Candidate = Candidate;
    /// The folded weight, the folded bias, their type.
    type Plan = (Exact, ArrayD<f64>, FloatType);
    const ID: RuleId = RuleId::FOLD_BN;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let bn = cx.node(at);
        if !is_op(bn, "BatchNormalization") {
            return None;
        }
        // (through Identity nodes: paddle2onnx writes Conv → Add → Identity → BatchNormalization)
        let (conv, _) = super::affine::producer_through_identity(cx, bn.input.first()?)?;
        is_op(cx.node(conv), "Conv").then_some(Candidate { bn: at, conv })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Self::Plan> {
        let (bn, conv) = (cx.node(c.bn), cx.node(c.conv));
        let path = super::affine::producer_through_identity(cx, &bn.input[0]).map_or(vec![], |p| p.1);
        if path.iter().any(|t| cx.uses(t) != 1) {
            return Checked::refuse(Reason::UsedOutside { conv: conv.label().to_string() });
        }
        let refuse_conv = |err| Checked::refuse(Reason::Conv { conv: conv.label().to_string(), err });
        let stored = conv.input.get(1).and_then(|w| cx.stored_weight(w));
        // the weight's values are read now only when they are not a stored tensor (and the
        // padding never: the fold does not depend on it, and the Conv keeps it as written)
        let (weight, bias, ft) = match &stored {
            Some((_, ft, dims)) => match read_conv_form(&cx.consts, conv, dims, *ft) {
                Ok(f) => (None, f.bias.unwrap_or_else(|| Array1::zeros(dims[0])), *ft),
                Err(err) => return refuse_conv(err),
            },
            None => match read_conv_unresolved(&cx.consts, conv) {
                Ok((w, f, ft)) => {
                    let o = w.shape()[0];
                    (Some(w), f.bias.unwrap_or_else(|| Array1::zeros(o)), ft)
                }
                Err(err) => return refuse_conv(err),
            },
        };
        let (b, bft) = match read_bn(&cx.consts, bn) {
            Ok(b) => b,
            Err(err) => return Checked::refuse(Reason::Bn(err)),
        };
        if b.scale.len() != bias.len() {
            return Checked::refuse(Reason::BnChannels { bn: b.scale.len(), conv: bias.len() });
        }
        if bft != ft {
            return Checked::refuse(Reason::BnConvDtypes);
        }
        // (what `AffineConv::fold_bn` computes: each output channel's weights times a, b·a + c)
        let (a, c) = b.affine();
        let bias = (&bias * &a + &c).into_dyn();
        let weight = match (weight, stored) {
            (Some(mut w), _) => {
                for (o, mut w) in w.outer_iter_mut().enumerate() {
                    w *= a[o];
                }
                Exact::Values(w)
            }
            (None, Some((raw, ft, dims))) => {
                Exact::Scaled(Scaled::new(raw, ft, dims, a.to_vec()).expect("sizes checked by stored_weight"))
            }
            (None, None) => unreachable!("a weight read or stored"),
        };
        Checked::Fits((weight, bias, ft))
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, (weight, bias, ft): Self::Plan) -> Patch {
        super::folded_bn_patch(cx, Self::ID, c.conv, c.bn, weight, bias, ft)
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.bn).label().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::read::{Form, ReadError};
    use crate::rewrite::driver::at_node;
    use crate::support::{Builder, ConvAttrs};

    /// `check` of the candidate at the BatchNormalization named `bn`.
    fn check_at(b: &Builder, bn: &str) -> Checked<(Exact, ArrayD<f64>, FloatType)> {
        at_node(b, bn, |cx, at| FoldBn.check(cx, &FoldBn.find(cx, at).expect("a Conv → BatchNormalization")))
    }

    fn refused(c: Checked<(Exact, ArrayD<f64>, FloatType)>) -> Reason {
        match c {
            Checked::Refused(mut r) if r.len() == 1 => r.remove(0),
            _ => panic!("expected one refusal"),
        }
    }

    #[test]
    fn a_conv_then_bn_folds() {
        let mut b = Builder::new(2, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 3, 2, &[3, 3], true, ConvAttrs::pads(&[1, 1, 1, 1]));
        let (z, _) = b.bn("bn", &y, 3, None);
        b.output(&z);
        let Checked::Fits((w, bias, ft)) = check_at(&b, "bn") else { panic!("refused") };
        assert_eq!((w.to_f64().shape(), bias.len(), ft), (&[3, 2, 3, 3][..], 3, FloatType::F32));
    }

    #[test]
    fn a_conv_read_elsewhere_too_is_refused() {
        let mut b = Builder::new(2, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 3, 2, &[3, 3], false, ConvAttrs::default());
        let (z, _) = b.bn("bn", &y, 3, None);
        b.output(&z);
        b.output(&y);
        assert_eq!(refused(check_at(&b, "bn")), Reason::UsedOutside { conv: "conv".into() });
    }

    #[test]
    fn a_training_mode_bn_is_refused() {
        let mut b = Builder::new(2, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 3, 2, &[3, 3], false, ConvAttrs::default());
        let (z, _) = b.bn("bn", &y, 3, Some(1));
        b.output(&z);
        assert_eq!(refused(check_at(&b, "bn")), Reason::Bn(ReadError::Form(Form::BnTrainingMode)));
    }

    #[test]
    fn a_bn_of_other_channels_is_refused() {
        let mut b = Builder::new(2, 5, 5);
        let (y, _, _) = b.conv_rand("conv", "x", 3, 2, &[3, 3], false, ConvAttrs::default());
        let (z, _) = b.bn("bn", &y, 4, None);
        b.output(&z);
        assert_eq!(refused(check_at(&b, "bn")), Reason::BnChannels { bn: 4, conv: 3 });
    }

    /// The fold never depends on the Conv's padding: an `auto_pad` that pads by the input size
    /// (SAME_UPPER at stride 2, on a size not fixed) folds, and stays as written; so does a
    /// weight that is not a stored tensor (a Constant node's).
    #[test]
    fn a_conv_padded_by_the_input_size_folds_and_keeps_its_auto_pad() {
        for constant in [false, true] {
            let mut b = Builder::new(2, 6, 6);
            crate::support::symbolic_input(&mut b, "x", &[Some(1), Some(2), None, None]);
            let (y, _, _) = b.conv_rand("conv", "x", 3, 2, &[3, 3], true, ConvAttrs::default().strides(&[2, 2]));
            b.graph.node[0].attribute.push(crate::support::attr_string("auto_pad", "SAME_UPPER"));
            if constant {
                // the weight as a Constant node's value
                let k = b.graph.initializer.iter().position(|t| t.name() == "conv.w").unwrap();
                let t = b.graph.initializer.remove(k);
                let attr = crate::proto::AttributeProto {
                    name: Some("value".into()),
                    t: Some(t),
                    r#type: Some(crate::proto::attribute_proto::AttributeType::Tensor as i32),
                    ..Default::default()
                };
                b.graph.node.insert(0, crate::proto::NodeProto {
                    op_type: Some("Constant".into()),
                    name: Some("w".into()),
                    output: vec!["conv.w".into()],
                    attribute: vec![attr],
                    ..Default::default()
                });
            }
            let (z, _) = b.bn("bn", &y, 3, None);
            b.output(&z);
            assert!(matches!(check_at(&b, "bn"), Checked::Fits(_)), "constant weight: {constant}");
            let original = b.build();
            let mut m = b.build();
            let report = crate::rewrite::fuse(&mut m).unwrap();
            assert_eq!(report.bns_folded, 1, "{:?}", report.refused);
            let conv = m.graph().node.iter().find(|n| n.op_type() == "Conv").unwrap();
            assert_eq!(crate::graph::attr_string(conv, "auto_pad").as_deref(), Some("SAME_UPPER"));
            assert!(m.graph().node.iter().all(|n| n.op_type() != "BatchNormalization"));
            for (h, w) in [(6, 6), (7, 9)] {
                let x = crate::support::rand_input(2, &[1, 2, h, w]);
                let want = crate::support::run_f32(&original, std::slice::from_ref(&x));
                crate::support::assert_close(&crate::support::run_f32(&m, &[x]), &want, 1e-5, &format!("{h}x{w}"));
            }
        }
    }
}
