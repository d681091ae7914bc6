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
/// folded and then merged (a BN folded into each branch, then the branches merged; nested sums)
/// is rounded to its dtype once. The graph always holds the rounded values too (tract reads the
/// graph), so an entry can be dropped at any time: it is dropped once the scan has passed every
/// node that could read it, which keeps at most a block's worth of f64 kernels alive.
#[derive(Default)]
pub struct Ctx {
    pub pending: HashMap<String, ArrayD<f64>>,
    /// concrete tensor shapes from tract's analysis of the model, computed when first needed
    pub shapes: std::cell::RefCell<Option<HashMap<String, Vec<usize>>>>,
}

impl Ctx {
    /// Drop the f64 values no rule at node `i` or later can read: rules read a kernel from the
    /// sum, BatchNormalization or scale at most two steps downstream of its Conv (Conv → Mul →
    /// Add), so an entry whose Conv's outputs are consumed, two steps deep, only before `i` is
    /// done with.
    fn evict_before(&mut self, g: &crate::proto::GraphProto, ix: &GraphIndex, i: usize) {
        if self.pending.is_empty() {
            return;
        }
        let horizon = |name: &str| -> usize {
            let mut last = 0;
            let mut frontier: Vec<usize> = ix.consumers_of(name).to_vec();
            for _ in 0..3 {
                let mut next = Vec::new();
                for &c in &frontier {
                    last = last.max(c);
                    for o in &g.node[c].output {
                        next.extend_from_slice(ix.consumers_of(o));
                    }
                }
                frontier = next;
            }
            last
        };
        self.pending.retain(|name, _| horizon(name) >= i);
    }
}

type Rule = fn(&Model, &GraphIndex, &Ctx, usize) -> Option<Outcome>;

pub const RULES: &[(&str, Rule)] = &[("fold_bn", fold_bn::rule), ("merge_branches", merge_branches::rule), ("affine_region", region::rule)];

/// Run every rule to a fixed point. Returns what fired and the refusals still standing.
pub fn run(model: &mut Model) -> (Vec<Rewrite>, Vec<Refusal>) {
    let mut ctx = Ctx::default();
    let mut log = Vec::new();
    // Scan the nodes in order; after a patch, go on from the node it inserted. Repeat whole
    // scans until one makes no change. The index is rebuilt only after a patch.
    // The refusals of the last scan (the one that changed nothing) are those that stand.
    let mut refusals = Vec::new();
    let mut changed = true;
    while changed {
        changed = false;
        refusals.clear();
        let mut i = 0;
        let mut ix = GraphIndex::new(model.proto.graph.as_ref().unwrap());
        loop {
            let g = model.proto.graph.as_ref().unwrap();
            if i >= g.node.len() {
                break;
            }
            let mut fired = None;
            for (_, rule) in RULES {
                match rule(model, &ix, &ctx, i) {
                    Some(Outcome { patch: Some(p), .. }) => {
                        fired = Some(p);
                        break;
                    }
                    Some(o) => refusals.extend(o.refusals),
                    None => {}
                }
            }
            let Some(p) = fired else {
                i += 1;
                ctx.evict_before(g, &ix, i);
                continue;
            };
            changed = true;
            let first_out = p.insert.first().and_then(|n| n.output.first()).cloned();
            log.push(p.log.clone());
            apply(model, &ix, &mut ctx, p);
            let g = model.proto.graph.as_ref().unwrap();
            ix = GraphIndex::new(g);
            if cfg!(debug_assertions) {
                if let Err(e) = ix.validate(g) {
                    panic!("rewrite {:?} broke the graph: {e}", log.last());
                }
            }
            i = first_out.and_then(|o| ix.producer.get(&o).map(|&(n, _)| n)).unwrap_or(0);
        }
    }
    (log, refusals)
}

/// Apply a patch (`ix` indexes the graph before it), then remove what it left dead (only what
/// it made dead: nodes and initializers that were alive before stay, even if nothing reads them).
pub fn apply(model: &mut Model, ix: &GraphIndex, ctx: &mut Ctx, p: Patch) {
    let g = model.proto.graph.as_mut().unwrap();
    for (name, arr, ft) in p.initializers {
        let t = from_f64(&name, &arr, ft);
        match ix.initializer.get(&name) {
            Some(&k) => g.initializer[k] = t,
            None => g.initializer.push(t),
        }
        ctx.pending.insert(name, arr);
    }
    // Reads after the patch = reads before (ix) + `delta`. Removing a node un-reads its inputs;
    // a producer whose outputs are all unread then dies too, and so on up the graph.
    let produced_new: HashSet<String> = p.insert.iter().flat_map(|n| n.output.iter()).filter(|o| !o.is_empty()).cloned().collect();
    let mut delta: HashMap<String, isize> = HashMap::new();
    for n in &p.insert {
        for r in crate::graph::node_reads(n) {
            *delta.entry(r).or_default() += 1;
        }
    }
    let unread = |delta: &HashMap<String, isize>, name: &str| ix.uses(name) as isize + delta.get(name).copied().unwrap_or(0) <= 0;
    let mut dead: HashSet<usize> = HashSet::new();
    let mut dead_inits: HashSet<String> = HashSet::new();
    let mut gone_outputs: HashSet<String> = HashSet::new();
    let mut work: Vec<usize> = p.remove.clone();
    while let Some(d) = work.pop() {
        if !dead.insert(d) {
            continue;
        }
        gone_outputs.extend(g.node[d].output.iter().cloned());
        for r in crate::graph::node_reads(&g.node[d]) {
            *delta.entry(r.clone()).or_default() -= 1;
            if !unread(&delta, &r) || ix.inputs.contains(&r) || produced_new.contains(&r) {
                continue;
            }
            if let Some(&(ni, _)) = ix.producer.get(&r) {
                if !dead.contains(&ni) && g.node[ni].output.iter().all(|o| o.is_empty() || unread(&delta, o)) {
                    work.push(ni);
                }
            } else if ix.initializer.contains_key(&r) {
                dead_inits.insert(r);
            }
        }
    }
    let old = std::mem::take(&mut g.node);
    let mut insert = Some(p.insert);
    for (i, n) in old.into_iter().enumerate() {
        if i == p.at {
            g.node.extend(insert.take().unwrap());
        }
        if !dead.contains(&i) {
            g.node.push(n);
        }
    }
    if let Some(rest) = insert {
        g.node.extend(rest);
    }
    if !dead_inits.is_empty() {
        g.initializer.retain(|t| !dead_inits.contains(t.name()));
        for d in &dead_inits {
            ctx.pending.remove(d);
        }
    }
    // value_info of tensors that no longer exist
    g.value_info.retain(|v| !gone_outputs.contains(v.name()) || produced_new.contains(v.name()));
}
