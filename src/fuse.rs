//! The library's main steps: fuse a loaded model in place and say what happened.

use crate::error::{Error, Result};
use crate::graph::GraphIndex;
use crate::io::Model;
use crate::passes::{self, Refusal, Rewrite};
use crate::tensor::checked_numel;
use serde::Serialize;
use std::collections::BTreeMap;

/// Size of a graph: nodes, parameters (elements of float initializers), nodes per operator.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub nodes: usize,
    pub params: usize,
    pub ops: BTreeMap<String, usize>,
}

impl Stats {
    pub fn of(model: &Model) -> Stats {
        let g = model.proto.graph.as_ref().unwrap();
        let mut ops = BTreeMap::new();
        for n in &g.node {
            *ops.entry(n.op_type().to_string()).or_insert(0) += 1;
        }
        let params = g
            .initializer
            .iter()
            .filter(|t| crate::tensor::FloatType::from_onnx(t.data_type.unwrap_or(0)).is_some())
            .map(|t| checked_numel(&t.dims).unwrap_or(0))
            .sum();
        Stats { nodes: g.node.len(), params, ops }
    }
    pub fn op(&self, op: &str) -> usize {
        self.ops.get(op).copied().unwrap_or(0)
    }
}

/// What `fuse` did.
#[derive(Clone, Debug, Serialize)]
pub struct FuseReport {
    /// Blocks whose branches were merged into one Conv.
    pub blocks_merged: usize,
    /// BatchNormalizations folded into a Conv.
    pub bns_folded: usize,
    pub rewrites: Vec<Rewrite>,
    /// Candidates left untouched, with the reason.
    pub refused: Vec<Refusal>,
    pub before: Stats,
    pub after: Stats,
}

impl FuseReport {
    /// A short human-readable summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "merged {} block(s), folded {} BatchNormalization(s)\nnodes {} -> {}, parameters {} -> {}, Conv {} -> {}, BatchNormalization {} -> {}, Add {} -> {}\n",
            self.blocks_merged,
            self.bns_folded,
            self.before.nodes,
            self.after.nodes,
            self.before.params,
            self.after.params,
            self.before.op("Conv"),
            self.after.op("Conv"),
            self.before.op("BatchNormalization"),
            self.after.op("BatchNormalization"),
            self.before.op("Add"),
            self.after.op("Add"),
        );
        if self.refused.is_empty() {
            s.push_str("refused: none\n");
        } else {
            s.push_str(&format!("refused {} candidate(s):\n", self.refused.len()));
            for r in &self.refused {
                s.push_str(&format!("  {} at '{}': {}\n", r.rule, r.node, r.reason));
            }
        }
        s
    }
}

/// Check the graph is well formed before any rewrite.
pub fn validate(model: &Model) -> Result<()> {
    let g = model.proto.graph.as_ref().ok_or_else(|| Error::Invalid("no graph".into()))?;
    GraphIndex::new(g).validate(g).map_err(|e| match (&model.path, e) {
        (Some(p), Error::Invalid(msg)) => Error::Format { path: p.clone(), msg },
        (_, e) => e,
    })
}

/// Fuse every re-parameterisable block of `model`, in place.
pub fn fuse(model: &mut Model) -> Result<FuseReport> {
    validate(model)?;
    let before = Stats::of(model);
    let (rewrites, refused) = passes::run(model);
    let after = Stats::of(model);
    Ok(FuseReport {
        blocks_merged: rewrites.iter().filter(|r| r.rule != "fold_bn").count(),
        bns_folded: rewrites.iter().filter(|r| r.rule == "fold_bn").count(),
        rewrites,
        refused,
        before,
        after,
    })
}
