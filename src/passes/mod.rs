//! Rewrite rules. Each rule looks at one node, and either finds nothing (`None`), or returns an
//! [`Outcome`]: a patch that is exactly equivalent, and/or refusals that say why a candidate was
//! left untouched. The driver applies patches until none fires.

pub mod common;
pub mod fold_bn;
pub mod merge_branches;
pub mod region;

use crate::graph::GraphIndex;
use crate::io::Model;
use crate::proto::NodeProto;
use crate::tensor::{from_f64, FloatType};
use ndarray::ArrayD;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// A candidate that was left untouched, and why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Refusal {
    pub rule: &'static str,
    /// The node the candidate was found at (the sum, or the BatchNormalization).
    pub node: String,
    pub reason: String,
}

/// A rewrite that fired.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rewrite {
    pub rule: &'static str,
    /// Name of the resulting Conv node.
    pub node: String,
    /// What was merged, e.g. `3 branches (3x3, 3x1, 1x3) + BN`.
    pub detail: String,
}

/// What a rule returns: a patch, and/or refusals.
#[derive(Default)]
pub struct Outcome {
    pub patch: Option<Patch>,
    pub refusals: Vec<Refusal>,
}

/// A graph edit: remove nodes, insert new ones where node `at` was, set initializers.
pub struct Patch {
    pub at: usize,
    pub remove: Vec<usize>,
    pub insert: Vec<NodeProto>,
    /// Initializers to write (replacing one of the same name in place, or appended), kept in f64.
    pub initializers: Vec<(String, ArrayD<f64>, FloatType)>,
    pub log: Rewrite,
}

/// State across rewrites: the exact f64 values of the tensors the passes wrote, so that a kernel
/// folded in one pass and merged in the next is rounded to its dtype once, at the end.
#[derive(Default)]
pub struct Ctx {
    pub pending: HashMap<String, ArrayD<f64>>,
    /// concrete tensor shapes from tract's analysis of the model, computed when first needed
    pub shapes: std::cell::RefCell<Option<HashMap<String, Vec<usize>>>>,
}

type Rule = fn(&Model, &GraphIndex, &Ctx, usize) -> Option<Outcome>;

pub const RULES: &[(&str, Rule)] = &[("fold_bn", fold_bn::rule), ("merge_branches", merge_branches::rule), ("affine_region", region::rule)];

/// Run every rule to a fixed point. Returns what fired and the refusals still standing.
pub fn run(model: &mut Model) -> (Vec<Rewrite>, Vec<Refusal>) {
    let mut ctx = Ctx::default();
    let mut log = Vec::new();
    // Scan the nodes in order; after a patch, go on from the node it inserted. Repeat whole
    // scans until one makes no change.
    let mut changed = true;
    while changed {
        changed = false;
        let mut i = 0;
        loop {
            let g = model.proto.graph.as_ref().unwrap();
            if i >= g.node.len() {
                break;
            }
            let ix = GraphIndex::new(g);
            let mut fired = None;
            for (_, rule) in RULES {
                if let Some(Outcome { patch: Some(p), .. }) = rule(model, &ix, &ctx, i) {
                    fired = Some(p);
                    break;
                }
            }
            let Some(p) = fired else {
                i += 1;
                continue;
            };
            changed = true;
            let first_out = p.insert.first().and_then(|n| n.output.first()).cloned();
            log.push(p.log.clone());
            apply(model, &mut ctx, p);
            let g = model.proto.graph.as_ref().unwrap();
            if cfg!(debug_assertions) {
                if let Err(e) = GraphIndex::new(g).validate(g) {
                    panic!("rewrite {:?} broke the graph: {e}", log.last());
                }
            }
            i = first_out.and_then(|o| g.node.iter().position(|n| n.output.contains(&o))).unwrap_or(0);
        }
    }
    // one last scan for the refusals that stand
    let g = model.proto.graph.as_ref().unwrap();
    let ix = GraphIndex::new(g);
    let mut refusals = Vec::new();
    for i in 0..g.node.len() {
        for (_, rule) in RULES {
            if let Some(o) = rule(model, &ix, &ctx, i) {
                refusals.extend(o.refusals);
            }
        }
    }
    (log, refusals)
}

/// Apply a patch, then remove what it left dead (only what it made dead: nodes and
/// initializers that were alive before stay, even if nothing reads them).
pub fn apply(model: &mut Model, ctx: &mut Ctx, p: Patch) {
    let g = model.proto.graph.as_mut().unwrap();
    let removed: HashSet<usize> = p.remove.iter().copied().collect();
    let mut candidates: Vec<String> = Vec::new();
    let mut gone_outputs: HashSet<String> = HashSet::new();
    for &r in &p.remove {
        candidates.extend(crate::graph::node_reads(&g.node[r]));
        gone_outputs.extend(g.node[r].output.iter().cloned());
    }
    let old = std::mem::take(&mut g.node);
    let mut insert = Some(p.insert);
    for (i, n) in old.into_iter().enumerate() {
        if i == p.at {
            g.node.extend(insert.take().unwrap());
        }
        if !removed.contains(&i) {
            g.node.push(n);
        }
    }
    if let Some(rest) = insert {
        g.node.extend(rest);
    }
    for (name, arr, ft) in p.initializers {
        let t = from_f64(&name, &arr, ft);
        match g.initializer.iter_mut().find(|t| t.name() == name) {
            Some(slot) => *slot = t,
            None => g.initializer.push(t),
        }
        ctx.pending.insert(name, arr);
    }
    // cascade: producers and initializers the removed nodes were the last readers of
    loop {
        let ix = GraphIndex::new(g);
        let mut dead_nodes: HashSet<usize> = HashSet::new();
        let mut dead_inits: HashSet<String> = HashSet::new();
        for c in &candidates {
            if ix.uses(c) > 0 || ix.inputs.contains(c) {
                continue;
            }
            if let Some(&(ni, _)) = ix.producer.get(c) {
                if g.node[ni].output.iter().all(|o| o.is_empty() || ix.uses(o) == 0) {
                    dead_nodes.insert(ni);
                }
            } else if ix.initializer.contains_key(c) {
                dead_inits.insert(c.clone());
            }
        }
        if dead_nodes.is_empty() && dead_inits.is_empty() {
            break;
        }
        candidates.clear();
        for &d in &dead_nodes {
            candidates.extend(crate::graph::node_reads(&g.node[d]));
            gone_outputs.extend(g.node[d].output.iter().cloned());
        }
        let mut k = 0;
        g.node.retain(|_| {
            k += 1;
            !dead_nodes.contains(&(k - 1))
        });
        g.initializer.retain(|t| !dead_inits.contains(t.name()));
        for d in &dead_inits {
            ctx.pending.remove(d);
        }
    }
    // value_info of tensors that no longer exist
    let ix = GraphIndex::new(g);
    g.value_info.retain(|v| !gone_outputs.contains(v.name()) || ix.producer.contains_key(v.name()));
}
