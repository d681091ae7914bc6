//! Conv → BatchNormalization (inference) becomes one Conv: W·γ/σ, (b − μ)·γ/σ + β.

use super::{Checked, Cx, Patch, Reason, Rule, RuleId};
use crate::graph::is_op;
use crate::kernel::read::{read_bn, read_conv};
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;

pub(crate) struct FoldBn;

/// The BatchNormalization and the Conv it reads.
pub(crate) struct Candidate {
    bn: usize,
    conv: usize,
}

impl Rule for FoldBn {
    type Candidate = Candidate;
    type Plan = (AffineConv, FloatType);
    const ID: RuleId = RuleId::FOLD_BN;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let bn = cx.node(at);
        if !is_op(bn, "BatchNormalization") {
            return None;
        }
        let conv = cx.producer(bn.input.first()?)?;
        is_op(cx.node(conv), "Conv").then_some(Candidate { bn: at, conv })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Self::Plan> {
        let (bn, conv) = (cx.node(c.bn), cx.node(c.conv));
        if cx.uses(&bn.input[0]) != 1 {
            return Checked::refuse(Reason::UsedOutside { conv: conv.name().to_string() });
        }
        let (mut k, ft) = match read_conv(&cx.consts, conv) {
            Ok(k) => k,
            Err(err) => return Checked::refuse(Reason::Conv { conv: conv.name().to_string(), err }),
        };
        let (b, bft) = match read_bn(&cx.consts, bn) {
            Ok(b) => b,
            Err(err) => return Checked::refuse(Reason::Bn(err)),
        };
        if b.scale.len() != k.out_channels() {
            return Checked::refuse(Reason::BnChannels { bn: b.scale.len(), conv: k.out_channels() });
        }
        if bft != ft {
            return Checked::refuse(Reason::BnConvDtypes);
        }
        k.fold_bn(&b);
        Checked::Fits((k, ft))
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, (k, ft): Self::Plan) -> Patch {
        super::folded_bn_patch(cx, Self::ID, c.conv, c.bn, k.weight, k.bias.into_dyn(), ft)
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.bn).name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::read::{Form, ReadError};
    use crate::rewrite::driver::at_node;
    use crate::support::{Builder, ConvAttrs};

    /// `check` of the candidate at the BatchNormalization named `bn`.
    fn check_at(b: &Builder, bn: &str) -> Checked<(AffineConv, FloatType)> {
        at_node(b, bn, |cx, at| FoldBn.check(cx, &FoldBn.find(cx, at).expect("a Conv → BatchNormalization")))
    }

    fn refused(c: Checked<(AffineConv, FloatType)>) -> Reason {
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
        let Checked::Fits((k, ft)) = check_at(&b, "bn") else { panic!("refused") };
        assert_eq!((k.out_channels(), ft), (3, FloatType::F32));
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
}
