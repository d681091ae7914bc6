//! A graph edit, and applying it: remove nodes, insert new ones where a node was, write
//! initializers; then remove what the edit left dead (and only that).

use super::Rewrite;
use crate::graph::{node_reads, GraphIndex};
use crate::model::tensor::{from_f64, FloatType};
use crate::model::Model;
use crate::proto::{NodeProto, TensorProto};
use ndarray::ArrayD;
use std::collections::{HashMap, HashSet};

/// A graph edit: remove nodes, insert new ones where node `at` was, replace nodes in place, set
/// initializers.
pub(crate) struct Patch {
    pub at: usize,
    pub remove: Vec<usize>,
    pub insert: Vec<NodeProto>,
    /// Nodes replaced where they are (index, new node), e.g. readers re-wired to another tensor.
    pub replace: Vec<(usize, NodeProto)>,
    /// Initializers to write (replacing one of the same name in place, or appended), in f64.
    pub initializers: Vec<(String, ArrayD<f64>, FloatType)>,
    pub log: Rewrite,
}

/// Tensors at least this big have their pages released from the input's memory map when a
/// patch replaces or removes them (smaller ones are not worth a system call).
const RELEASE_BYTES: usize = 1 << 16;

impl Patch {
    /// Apply to `model` (`ix` indexes its graph before the patch); the f64 values written go to
    /// `exact`. Nodes and initializers the patch leaves unread are removed, and so on up the
    /// graph; what was alive before stays, even if nothing reads it. Tensors replaced or removed
    /// have their pages in the input's memory map released (they are not read again).
    pub fn apply(self, model: &mut Model, ix: &GraphIndex, exact: &mut HashMap<String, ArrayD<f64>>) {
        let Patch { at, mut remove, insert, replace, initializers, .. } = self;
        let mut released: Vec<TensorProto> = Vec::new();
        let g = model.graph_mut();
        let mut reshaped: HashSet<String> = HashSet::new();
        for (name, arr, ft) in initializers {
            let t = from_f64(&name, &arr, ft);
            if ix.initializer.get(&name).is_some_and(|&k| g.initializer[k].dims != t.dims) {
                reshaped.insert(name.clone());
            }
            match ix.initializer.get(&name) {
                Some(&k) => released.push(std::mem::replace(&mut g.initializer[k], t)),
                None => g.initializer.push(t),
            }
            exact.insert(name, arr);
        }
        // Reads after the patch = reads before (ix) + `delta`. Removing a node un-reads its inputs;
        // a producer whose outputs are all unread then dies too, and so on up the graph.
        // a node replaced is a node removed and a new one inserted at its place
        remove.extend(replace.iter().map(|r| r.0));
        let mut in_place: HashMap<usize, NodeProto> = replace.into_iter().collect();
        let produced_new: HashSet<String> = insert
            .iter()
            .chain(in_place.values())
            .flat_map(|n| n.output.iter())
            .filter(|o| !o.is_empty())
            .cloned()
            .collect();
        let mut delta: HashMap<String, isize> = HashMap::new();
        for n in insert.iter().chain(in_place.values()) {
            for r in node_reads(n) {
                *delta.entry(r).or_default() += 1;
            }
        }
        let unread = |delta: &HashMap<String, isize>, name: &str| {
            ix.uses(name) as isize + delta.get(name).copied().unwrap_or(0) <= 0
        };
        let mut dead: HashSet<usize> = HashSet::new();
        let mut dead_inits: HashSet<String> = HashSet::new();
        let mut gone_outputs: HashSet<String> = HashSet::new();
        let mut work: Vec<usize> = remove;
        while let Some(d) = work.pop() {
            if !dead.insert(d) {
                continue;
            }
            gone_outputs.extend(g.node[d].output.iter().cloned());
            for r in node_reads(&g.node[d]) {
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
        let mut insert = Some(insert);
        for (i, n) in old.into_iter().enumerate() {
            if i == at {
                g.node.extend(insert.take().expect("inserted once"));
            }
            if let Some(r) = in_place.remove(&i) {
                g.node.push(r);
            } else if !dead.contains(&i) {
                g.node.push(n);
            }
        }
        if let Some(rest) = insert {
            g.node.extend(rest);
        }
        g.node.extend(in_place.into_values());
        if !dead_inits.is_empty() {
            g.initializer.retain(|t| {
                let dies = dead_inits.contains(t.name());
                if dies {
                    released.push(t.clone());
                }
                !dies
            });
            for d in &dead_inits {
                exact.remove(d);
            }
        }
        // value_info of tensors that no longer exist, or of initializers of another shape now
        g.value_info.retain(|v| {
            (!gone_outputs.contains(v.name()) || produced_new.contains(v.name())) && !reshaped.contains(v.name())
        });
        for t in &released {
            if let Ok(Some(b)) = model.raw_bytes(t) {
                if b.len() >= RELEASE_BYTES {
                    model.release(&b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::RuleId;
    use crate::support::Builder;

    /// x → a → b → y: replacing the last node by one reading x kills a and b (and b's
    /// initializer); a node that was dead before the patch stays.
    #[test]
    fn a_patch_removes_what_it_left_dead_and_nothing_else() {
        let mut b = Builder::new(1, 2, 2);
        let a = b.node("Relu", "a", &["x"], &[], vec![]);
        let w = b.initializer("w", &ArrayD::zeros(ndarray::IxDyn(&[1])));
        let bb = b.node("Add", "b", &[&a, &w], &[], vec![]);
        b.node("Relu", "dead_before", &["x"], &[], vec![]);
        let y = b.node("Neg", "y", &[&bb], &["y"], vec![]);
        b.output(&y);
        let mut m = b.build();
        let ix = GraphIndex::new(m.graph());
        let mut neg = m.graph().node[3].clone();
        neg.input = vec!["x".into()];
        let log = Rewrite { rule: RuleId::FOLD_BN, node: "y".into(), detail: String::new(), weights: vec![] };
        Patch { at: 3, remove: vec![3], insert: vec![neg], replace: vec![], initializers: vec![], log }.apply(
            &mut m,
            &ix,
            &mut HashMap::new(),
        );
        let names: Vec<&str> = m.graph().node.iter().map(|n| n.name()).collect();
        assert_eq!(names, ["dead_before", "y"]);
        assert!(m.graph().initializer.is_empty(), "the initializer only b read is gone");
    }
}
