//! ConvTranspose → BatchNormalization (inference) becomes one ConvTranspose (the upsampling blocks
//! of detection necks). A transposed kernel is `[C_in, C_out/groups, k...]`: output channel
//! `g·(C_out/groups) + j` is column j of the rows of group g, so the BN's scale t multiplies those
//! columns, and the bias becomes `b·t + s`.

use super::{Checked, Cx, Patch, Reason, Rule, RuleId};
use crate::graph::{attr_int, is_op, Label};
use crate::kernel::read::{read_bn, Form, ReadError};
use crate::model::tensor::FloatType;
use ndarray::{Array1, ArrayD, Axis};

pub(crate) struct FoldBnTransposed;

pub(crate) struct Candidate {
    bn: usize,
    deconv: usize,
}

pub(crate) struct Plan {
    weight: ArrayD<f64>,
    bias: Array1<f64>,
    ft: FloatType,
}

impl Rule for FoldBnTransposed {
    type Candidate = Candidate;
    type Plan = Plan;
    const ID: RuleId = RuleId::FOLD_BN_TRANSPOSED;

    fn find(&self, cx: &Cx, at: usize) -> Option<Candidate> {
        let bn = cx.node(at);
        if !is_op(bn, "BatchNormalization") {
            return None;
        }
        // (through Identity nodes)
        let (deconv, _) = super::affine::producer_through_identity(cx, bn.input.first()?)?;
        is_op(cx.node(deconv), "ConvTranspose").then_some(Candidate { bn: at, deconv })
    }

    fn check(&self, cx: &Cx, c: &Candidate) -> Checked<Plan> {
        let (bn, d) = (cx.node(c.bn), cx.node(c.deconv));
        let conv = d.label().to_string();
        let path = super::affine::producer_through_identity(cx, &bn.input[0]).map_or(vec![], |p| p.1);
        if path.iter().any(|t| cx.uses(t) != 1 || cx.ix.outputs.contains(t)) {
            return Checked::refuse(Reason::UsedOutside { conv });
        }
        let (w, ft) = match cx.consts.f64(&d.input[1]) {
            Ok(v) => v,
            Err(e) => return Checked::refuse(Reason::Conv { conv, err: ReadError::Weight(e) }),
        };
        let groups = attr_int(d, "group", 1);
        if w.ndim() < 3 || groups < 1 || w.shape()[0] % groups as usize != 0 {
            let form = Form::GroupsDivide { groups, out: w.shape().first().copied().unwrap_or(0) };
            return Checked::refuse(Reason::Conv { conv, err: form.into() });
        }
        let (cin, og) = (w.shape()[0], w.shape()[1]);
        let cg = cin / groups as usize;
        let cout = og * groups as usize;
        let bias = match d.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => match cx.consts.f64(b) {
                Ok((a, bft)) if bft == ft && a.len() == cout => a.iter().copied().collect(),
                Ok((a, _)) => {
                    return Checked::refuse(Reason::Conv { conv, err: ReadError::Channels(b.clone(), a.shape().to_vec(), cout) })
                }
                Err(e) => return Checked::refuse(Reason::Conv { conv, err: ReadError::Bias(e) }),
            },
            None => Array1::zeros(cout),
        };
        let (p, bft) = match read_bn(&cx.consts, bn) {
            Ok(v) => v,
            Err(err) => return Checked::refuse(Reason::Bn(err)),
        };
        if p.scale.len() != cout {
            return Checked::refuse(Reason::BnChannels { bn: p.scale.len(), conv: cout });
        }
        if bft != ft {
            return Checked::refuse(Reason::BnConvDtypes);
        }
        let (t, s) = p.affine();
        let mut weight = w;
        for (ci, mut row) in weight.axis_iter_mut(Axis(0)).enumerate() {
            for (j, mut col) in row.axis_iter_mut(Axis(0)).enumerate() {
                col *= t[(ci / cg) * og + j];
            }
        }
        Checked::Fits(Plan { weight, bias: bias * &t + &s, ft })
    }

    fn rewrite(&self, cx: &Cx, c: Candidate, plan: Plan) -> Patch {
        super::folded_bn_patch(cx, Self::ID, c.deconv, c.bn, plan.weight.into(), plan.bias.into_dyn(), plan.ft)
    }

    fn node(&self, cx: &Cx, c: &Candidate) -> String {
        cx.node(c.bn).label().to_string()
    }
}

#[cfg(test)]
mod tests {
    use crate::support::{attr_int, attr_ints, rand_input, run_f32, Builder};

    #[test]
    fn a_grouped_strided_conv_transpose_then_bn_is_one_conv_transpose() {
        grouped_strided_conv_transpose_then_bn(false);
    }

    #[test]
    fn a_conv_transpose_then_identity_then_bn_is_one_conv_transpose() {
        grouped_strided_conv_transpose_then_bn(true);
    }

    fn grouped_strided_conv_transpose_then_bn(identity: bool) {
        // 4 → 6 channels, groups 2, stride 2 (an upsampling neck block)
        let mut b = Builder::new(4, 5, 5);
        let w = b.rand(&[4, 3, 3, 3]);
        let bias = b.rand(&[6]);
        let (w, bias) = (b.initializer("up.w", &w), b.initializer("up.b", &bias));
        let attrs = vec![attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 0, 0]), attr_int("group", 2)];
        let mut y = b.node("ConvTranspose", "up", &["x", &w, &bias], &[], attrs);
        if identity {
            y = b.node("Identity", "id", &[&y], &[], vec![]);
        }
        let (z, _) = b.bn("bn", &y, 6, None);
        b.output(&z);
        let original = b.build();
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["ConvTranspose"], "{:?}", report.refused);
        assert_eq!(report.bns_folded, 1);
        let x = rand_input(1, &[1, 4, 5, 5]);
        crate::support::assert_close(&run_f32(&m, std::slice::from_ref(&x)), &run_f32(&original, &[x]), 1e-5, "folded");
    }

    #[test]
    fn a_conv_transpose_read_elsewhere_keeps_its_bn() {
        let mut b = Builder::new(2, 4, 4);
        let w = b.rand(&[2, 2, 2, 2]);
        let w = b.initializer("up.w", &w);
        let y = b.node("ConvTranspose", "up", &["x", &w], &[], vec![attr_ints("strides", &[2, 2])]);
        let (z, _) = b.bn("bn", &y, 2, None);
        b.output(&z);
        b.output(&y);
        let mut m = b.build();
        let report = crate::rewrite::fuse(&mut m).unwrap();
        assert_eq!(report.refused.len(), 1);
        assert_eq!(report.refused[0].reason, super::Reason::UsedOutside { conv: "up".into() });
    }
}
