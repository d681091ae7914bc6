//! A graph edit, and applying it: remove nodes, insert new ones where a node was, write
//! initializers; then remove what the edit left dead (and only that).

use super::Rewrite;
use crate::graph::{node_reads, Exact, GraphIndex};
use crate::model::tensor::{from_f64, FloatType};
use crate::model::Model;
use crate::proto::{GraphProto, NodeProto, TensorProto};
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
    pub initializers: Vec<(String, Exact, FloatType)>,
    pub log: Rewrite,
}

/// The initializer of a tensor whose values are not computed yet: its name, type and shape, no
/// data (a read of its data fails: 0 values for its elements).
pub(crate) fn unsettled(name: &str, dims: &[usize], ft: FloatType) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(ft.onnx()),
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// Tensors at least this big have their pages released from the input's memory map when a
/// patch replaces or removes them (smaller ones are not worth a system call).
const RELEASE_BYTES: usize = 1 << 16;

/// The slots of a graph that patches emptied. A patch does not shift the nodes and initializers
/// it leaves alone: a removed node becomes an empty node in place, a removed initializer an
/// unnamed one, a dropped value info is remembered here; the index is updated for just the
/// nodes the patch touched. [`Holes::compact`] removes them all in one pass. This keeps a patch's
/// cost proportional to its own size, not the graph's.
#[derive(Default, Debug, Clone)]
pub(crate) struct Holes {
    nodes: HashSet<usize>,
    inits: HashSet<usize>,
    /// value infos of tensors that no longer exist, or of initializers that changed shape
    value_info: HashSet<String>,
}

impl Holes {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.inits.is_empty() && self.value_info.is_empty()
    }

    /// Whether node `i` is an emptied slot.
    pub fn node(&self, i: usize) -> bool {
        self.nodes.contains(&i)
    }

    /// Whether the value info of `name` was dropped.
    pub fn value_info(&self, name: &str) -> bool {
        self.value_info.contains(name)
    }

    /// Remove the emptied slots from `g` (node order otherwise kept).
    pub fn compact(&mut self, g: &mut GraphProto) {
        self.compact_inserting(g, usize::MAX, Vec::new());
    }

    /// A copy of `g`'s slots compacted, leaving these holes as they are (for a graph that is a
    /// copy of the one they are holes of).
    pub fn compacted(&self, g: &mut GraphProto) {
        self.clone().compact(g);
    }

    /// [`Holes::compact`], inserting `insert` before node `at`.
    fn compact_inserting(&mut self, g: &mut GraphProto, at: usize, insert: Vec<NodeProto>) {
        if self.is_empty() && insert.is_empty() {
            return;
        }
        let old = std::mem::take(&mut g.node);
        g.node.reserve(old.len() + insert.len() - self.nodes.len().min(old.len()));
        let mut insert = Some(insert);
        for (i, n) in old.into_iter().enumerate() {
            if i == at {
                g.node.extend(insert.take().expect("inserted once"));
            }
            if !self.nodes.contains(&i) {
                g.node.push(n);
            }
        }
        if let Some(rest) = insert {
            g.node.extend(rest);
        }
        if !self.inits.is_empty() {
            let mut k = 0;
            g.initializer.retain(|_| {
                k += 1;
                !self.inits.contains(&(k - 1))
            });
        }
        if !self.value_info.is_empty() {
            g.value_info.retain(|v| !self.value_info.contains(v.name()));
        }
        *self = Holes::default();
    }
}

impl Patch {
    /// Apply to `model`, whose graph `ix` indexes (and goes on indexing: it is updated for the
    /// nodes the patch touched); the f64 values written go to `exact`. Nodes and initializers the
    /// patch leaves unread are removed, and so on up the graph; what was alive before stays, even
    /// if nothing reads it. Removed slots are left empty (see [`Holes`]); when the inserted nodes
    /// do not fit in the slot of node `at`, the graph is compacted and re-indexed (and `true`
    /// returned). Tensors
    /// replaced or removed have their pages in the input's memory map released (they are not read
    /// again).
    pub fn apply(
        self,
        model: &mut Model,
        ix: &mut GraphIndex,
        exact: &mut HashMap<String, Exact>,
        holes: &mut Holes,
    ) -> bool {
        let Patch { at, mut remove, mut insert, replace, initializers, .. } = self;
        let mut released: Vec<TensorProto> = Vec::new();
        // (the stored bytes of scaled tensors no longer read)
        let mut released_bytes: Vec<bytes::Bytes> = Vec::new();
        let g = model.graph_mut();
        // (the stored bytes of sums not yet computed stay: they are read when the rewrite ends)
        let kept: HashSet<(usize, usize)> = initializers
            .iter()
            .flat_map(|(_, e, _)| match e {
                Exact::Summed(s) if !s.is_written() => s.stored().collect(),
                _ => vec![],
            })
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        for (name, arr, ft) in initializers {
            let t = match &arr {
                Exact::Values(a) => from_f64(&name, a, ft),
                // computed when the rewrite ends (see `driver::settle`)
                Exact::Scaled(s) => unsettled(&name, &s.dims, ft),
                // (the bytes the check of written weights computed)
                Exact::Summed(s) if s.is_written() => s.encode(&name, ft),
                Exact::Summed(s) => unsettled(&name, s.dims(), ft),
            };
            match ix.initializer.get(&name) {
                Some(&k) => {
                    if g.initializer[k].dims != t.dims {
                        holes.value_info.insert(name.clone());
                    }
                    released.push(std::mem::replace(&mut g.initializer[k], t));
                }
                None => {
                    ix.initializer.insert(name.clone(), g.initializer.len());
                    g.initializer.push(t);
                }
            }
            if let Some(old) = exact.insert(name, arr) {
                released_bytes.extend(old.stored().into_iter().cloned());
            }
        }
        // Reads after the patch = reads before (ix) + `delta`. Removing a node un-reads its inputs;
        // a producer whose outputs are all unread then dies too, and so on up the graph.
        // a node replaced is a node removed and a new one inserted at its place
        remove.extend(replace.iter().map(|r| r.0));
        let in_place: HashMap<usize, NodeProto> = replace.into_iter().collect();
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
        let unread = |ix: &GraphIndex, delta: &HashMap<String, isize>, name: &str| {
            ix.uses(name) as isize + delta.get(name).copied().unwrap_or(0) <= 0
        };
        let mut dead: Vec<usize> = Vec::new();
        let mut seen: HashSet<usize> = HashSet::new();
        let mut dead_inits: Vec<String> = Vec::new();
        let mut work: Vec<usize> = remove;
        while let Some(d) = work.pop() {
            if !seen.insert(d) {
                continue;
            }
            dead.push(d);
            for o in g.node[d].output.iter().filter(|o| !produced_new.contains(*o)) {
                holes.value_info.insert(o.clone());
            }
            for r in node_reads(&g.node[d]) {
                *delta.entry(r.clone()).or_default() -= 1;
                if !unread(ix, &delta, &r) || ix.inputs.contains(&r) || produced_new.contains(&r) {
                    continue;
                }
                if let Some(&(ni, _)) = ix.producer.get(&r) {
                    if !seen.contains(&ni) && g.node[ni].output.iter().all(|o| o.is_empty() || unread(ix, &delta, o)) {
                        work.push(ni);
                    }
                } else if ix.initializer.contains_key(&r) && !dead_inits.contains(&r) {
                    dead_inits.push(r);
                }
            }
        }
        // un-index and empty every dead slot, then fill the replaced ones and `at`
        for &d in &dead {
            let old = std::mem::take(&mut g.node[d]);
            ix.remove_node(d, &old);
            holes.nodes.insert(d);
        }
        let fill = |g: &mut GraphProto, ix: &mut GraphIndex, holes: &mut Holes, i: usize, n: NodeProto| {
            ix.add_node(i, &n);
            g.node[i] = n;
            holes.nodes.remove(&i);
        };
        for (i, n) in in_place {
            fill(g, ix, holes, i, n);
        }
        let fits = insert.is_empty() || (insert.len() == 1 && at < g.node.len() && holes.node(at));
        if fits {
            if let Some(n) = insert.pop() {
                fill(g, ix, holes, at, n);
            }
        }
        for d in dead_inits {
            if let Some(k) = ix.initializer.remove(&d) {
                released.push(std::mem::take(&mut g.initializer[k]));
                holes.inits.insert(k);
            }
            if let Some(old) = exact.remove(&d) {
                released_bytes.extend(old.stored().into_iter().cloned());
            }
        }
        if !fits {
            holes.compact_inserting(g, at, insert);
            *ix = GraphIndex::new(g);
        }
        let stored = released.iter().filter_map(|t| model.raw_bytes(t).ok().flatten());
        for b in stored.chain(released_bytes) {
            if b.len() >= RELEASE_BYTES && !kept.contains(&(b.as_ptr() as usize, b.len())) {
                model.release(&b);
            }
        }
        !fits
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
        let w = b.initializer("w", &ndarray::ArrayD::zeros(ndarray::IxDyn(&[1])));
        let bb = b.node("Add", "b", &[&a, &w], &[], vec![]);
        b.node("Relu", "dead_before", &["x"], &[], vec![]);
        let y = b.node("Neg", "y", &[&bb], &["y"], vec![]);
        b.output(&y);
        let mut m = b.build();
        let mut ix = GraphIndex::new(m.graph());
        let mut neg = m.graph().node[3].clone();
        neg.input = vec!["x".into()];
        let log = Rewrite { rule: RuleId::FOLD_BN, node: "y".into(), detail: String::new(), weights: vec![] };
        let mut holes = Holes::default();
        Patch { at: 3, remove: vec![3], insert: vec![neg], replace: vec![], initializers: vec![], log }.apply(
            &mut m,
            &mut ix,
            &mut HashMap::new(),
            &mut holes,
        );
        assert_eq!(ix, GraphIndex::new(m.graph()), "the index is kept up to date");
        assert_eq!(m.graph().node.len(), 4, "removed nodes leave empty slots");
        holes.compact(m.graph_mut());
        let names: Vec<&str> = m.graph().node.iter().map(|n| n.name()).collect();
        assert_eq!(names, ["dead_before", "y"]);
        assert!(m.graph().initializer.is_empty(), "the initializer only b read is gone");
    }
}
