//! Conv → BatchNormalization (inference) becomes one Conv: W·γ/σ, (b − μ)·γ/σ + β.

use super::{Checked, Cx, Patch, Reason, Rewrite, Rule, RuleId};
use crate::graph::is_op;
use crate::kernel::read::{read_bn, read_conv};
use crate::kernel::AffineConv;
use crate::graph::Names;
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
        let (bn, conv) = (cx.node(c.bn), cx.node(c.conv));
        let (wname, bname) = Names::new(cx.g).conv_params(cx.ix, conv);
        let node = super::rewired_conv(conv, &conv.input[0], &wname, &bname, &bn.output[0]);
        Patch {
            at: c.bn,
            remove: vec![c.conv, c.bn],
            insert: vec![node],
            initializers: vec![(wname, k.weight, ft), (bname, k.bias.into_dyn(), ft)],
            log: Rewrite {
                rule: Self::ID,
                node: conv.name().to_string(),
                detail: format!("BatchNormalization '{}' folded", bn.name()),
            },
        }
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.bn).name().to_string()
    }
}
