//! Conv → BatchNormalization (inference) becomes one Conv: W·γ/σ, (b − μ)·γ/σ + β.

use super::common::{graph, is_op, param_names, read_bn, read_conv, rewired_conv};
use super::{Ctx, Outcome, Patch, Refusal, Rewrite};
use crate::graph::GraphIndex;
use crate::io::Model;

pub fn rule(m: &Model, ix: &GraphIndex, ctx: &Ctx, i: usize) -> Option<Outcome> {
    let g = graph(m);
    let bn = &g.node[i];
    if !is_op(bn, "BatchNormalization") {
        return None;
    }
    let x = bn.input.first()?;
    let &(ci, _) = ix.producer.get(x)?;
    let conv = &g.node[ci];
    if !is_op(conv, "Conv") {
        return None;
    }
    let refuse = |reason: String| Some(Outcome { patch: None, refusals: vec![Refusal { rule: "fold_bn", node: bn.name().to_string(), reason }] });
    if ix.uses(x) != 1 {
        return refuse(format!("output of Conv '{}' is also used outside the block", conv.name()));
    }
    let (mut k, ft) = match read_conv(m, ix, ctx, conv) {
        Ok(k) => k,
        Err(e) => return refuse(format!("Conv '{}': {e}", conv.name())),
    };
    let (b, bft) = match read_bn(m, ix, ctx, bn) {
        Ok(b) => b,
        Err(e) => return refuse(e),
    };
    if b.scale.len() != k.out_channels() {
        return refuse(format!("BatchNormalization of {} channels after a Conv of {}", b.scale.len(), k.out_channels()));
    }
    if bft != ft {
        return refuse("BatchNormalization and Conv have different dtypes".into());
    }
    k.fold_bn(&b);
    let (wname, bname) = param_names(g, ix, conv);
    let node = rewired_conv(conv, &conv.input[0], &wname, &bname, &bn.output[0]);
    Some(Outcome {
        patch: Some(Patch {
            at: i,
            remove: vec![ci, i],
            insert: vec![node],
            initializers: vec![(wname, k.weight, ft), (bname, k.bias.into_dyn(), ft)],
            log: Rewrite { rule: "fold_bn", node: conv.name().to_string(), detail: format!("BatchNormalization '{}' folded", bn.name()) },
        }),
        refusals: vec![],
    })
}
