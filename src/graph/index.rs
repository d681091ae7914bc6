//! An index over one graph: who produces and who consumes each tensor, which tensors are
//! initializers, graph inputs and outputs; and the graph's well-formedness check.

use super::attrs::is_default_domain;
use super::Label;
use crate::error::{Error, Result};
use crate::proto::{GraphProto, NodeProto, TensorProto};
use std::collections::{HashMap, HashSet};

/// Producers and consumers of every tensor of one graph (not of its subgraphs; a tensor a
/// subgraph reads from the outer scope counts as consumed by the node that holds the subgraph).
#[derive(Debug, Default, PartialEq)]
pub struct GraphIndex {
    /// tensor name → (node index, output slot)
    pub producer: HashMap<String, (usize, usize)>,
    /// tensor name → consuming node indices, once per use (a node reading it twice is listed twice)
    pub consumers: HashMap<String, Vec<usize>>,
    /// initializer name → index in `graph.initializer`
    pub initializer: HashMap<String, usize>,
    pub inputs: HashSet<String>,
    pub outputs: HashSet<String>,
}

/// Names a subgraph reads that it does not define itself.
fn outer_reads(g: &GraphProto, out: &mut Vec<String>) {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.input.iter().map(|v| v.name()));
    defined.extend(g.initializer.iter().map(|t| t.name()));
    defined.extend(g.sparse_initializer.iter().filter_map(|s| s.values.as_ref()).map(|t| t.name()));
    for n in &g.node {
        defined.extend(n.output.iter().map(|s| s.as_str()));
    }
    for n in &g.node {
        for i in &n.input {
            if !i.is_empty() && !defined.contains(i.as_str()) {
                out.push(i.clone());
            }
        }
        for a in &n.attribute {
            let mut inner = Vec::new();
            if let Some(sg) = &a.g {
                outer_reads(sg, &mut inner);
            }
            for sg in &a.graphs {
                outer_reads(sg, &mut inner);
            }
            out.extend(inner.into_iter().filter(|i| !defined.contains(i.as_str())));
        }
    }
}

/// All tensor names a node reads: its inputs and what its subgraphs read from outside.
pub fn node_reads(n: &NodeProto) -> Vec<String> {
    let mut v: Vec<String> = n.input.iter().filter(|i| !i.is_empty()).cloned().collect();
    for a in &n.attribute {
        if let Some(sg) = &a.g {
            outer_reads(sg, &mut v);
        }
        for sg in &a.graphs {
            outer_reads(sg, &mut v);
        }
    }
    v
}

impl GraphIndex {
    pub fn new(g: &GraphProto) -> GraphIndex {
        let mut ix = GraphIndex::default();
        // (an initializer without a name is a slot the rewrite emptied; a model that has one
        // is refused on load)
        for (i, t) in g.initializer.iter().enumerate().filter(|(_, t)| !t.name().is_empty()) {
            ix.initializer.insert(t.name().to_string(), i);
        }
        ix.inputs.extend(g.input.iter().map(|v| v.name().to_string()));
        ix.outputs.extend(g.output.iter().map(|v| v.name().to_string()));
        for (ni, n) in g.node.iter().enumerate() {
            for (slot, o) in n.output.iter().enumerate() {
                if !o.is_empty() {
                    ix.producer.insert(o.clone(), (ni, slot));
                }
            }
            for r in node_reads(n) {
                ix.consumers.entry(r).or_default().push(ni);
            }
        }
        ix
    }

    /// Forget node `i` (about to be removed or replaced): its outputs lose their producer, its
    /// reads lose this consumer.
    pub fn remove_node(&mut self, i: usize, n: &NodeProto) {
        for (slot, o) in n.output.iter().enumerate() {
            if self.producer.get(o) == Some(&(i, slot)) {
                self.producer.remove(o);
            }
        }
        for r in node_reads(n) {
            if let Some(c) = self.consumers.get_mut(&r) {
                c.retain(|&k| k != i);
                if c.is_empty() {
                    self.consumers.remove(&r);
                }
            }
        }
    }

    /// Index node `n`, now at position `i`. Consumer lists stay in node order, as
    /// [`GraphIndex::new`] builds them.
    pub fn add_node(&mut self, i: usize, n: &NodeProto) {
        for (slot, o) in n.output.iter().enumerate() {
            if !o.is_empty() {
                self.producer.insert(o.clone(), (i, slot));
            }
        }
        for r in node_reads(n) {
            let c = self.consumers.entry(r).or_default();
            let at = c.partition_point(|&k| k <= i);
            c.insert(at, i);
        }
    }

    /// How many times a tensor is read, counting a graph output as one read.
    pub fn uses(&self, name: &str) -> usize {
        self.consumers.get(name).map_or(0, |c| c.len()) + usize::from(self.outputs.contains(name))
    }

    pub fn consumers_of(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map_or(&[], |c| c.as_slice())
    }

    pub fn producer_node<'g>(&self, g: &'g GraphProto, name: &str) -> Option<&'g NodeProto> {
        self.producer.get(name).map(|&(i, _)| &g.node[i])
    }

    /// The constant tensor behind a name: an initializer that is not also a graph input
    /// (an initializer listed as input can be overridden at run time, so it is not constant),
    /// or the output of a Constant node holding a tensor.
    pub fn constant<'g>(&self, g: &'g GraphProto, name: &str) -> Option<&'g TensorProto> {
        if let Some(&i) = self.initializer.get(name) {
            if self.inputs.contains(name) {
                return None;
            }
            return Some(&g.initializer[i]);
        }
        let n = self.producer_node(g, name)?;
        if n.op_type() == "Constant" && is_default_domain(n) {
            return n.attribute.iter().find(|a| a.name() == "value").and_then(|a| a.t.as_ref());
        }
        None
    }

    /// Check the graph is well formed: no tensor name defined twice (graph inputs,
    /// initializers, node outputs), every read defined, no cycle, nodes in topological order
    /// (as ONNX requires), every graph output produced.
    pub fn validate(&self, g: &GraphProto) -> Result<()> {
        let gname = g.name.as_deref().filter(|n| !n.is_empty()).unwrap_or("graph");
        let err = |msg: String| Err(Error::Invalid(format!("{gname}: {msg}")));
        let mut inputs: HashSet<&str> = HashSet::new();
        for v in &g.input {
            if v.name().is_empty() {
                return err("a graph input has no name".into());
            }
            if !inputs.insert(v.name()) {
                return err(format!("duplicate graph input '{}'", v.name()));
            }
        }
        let mut inits: HashSet<&str> = HashSet::new();
        let sparse = g.sparse_initializer.iter().filter_map(|s| s.values.as_ref()).map(|t| t.name());
        for name in g.initializer.iter().map(|t| t.name()).chain(sparse) {
            if name.is_empty() {
                return err("an initializer has no name".into());
            }
            if !inits.insert(name) {
                return err(format!("duplicate initializer '{name}'"));
            }
        }
        // an initializer may also be listed as a graph input (its default value)
        let seen: HashSet<&str> = inputs.union(&inits).copied().collect();
        let mut defined: HashSet<&str> = seen.clone();
        for n in &g.node {
            let mut outs: HashSet<&str> = HashSet::new();
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if !outs.insert(o) {
                    return err(format!("node '{}' ({}) lists output '{o}' twice", n.label(), n.op_type()));
                }
                if defined.contains(o.as_str()) {
                    let what = if inputs.contains(o.as_str()) {
                        "a graph input"
                    } else if inits.contains(o.as_str()) {
                        "an initializer"
                    } else {
                        "another node's output"
                    };
                    return err(format!(
                        "duplicate tensor name '{o}': output of node '{}' ({}) and {what}",
                        n.label(),
                        n.op_type()
                    ));
                }
                defined.insert(o);
            }
        }
        // topological order: every read must be defined earlier
        let mut avail: HashSet<&str> = seen;
        for n in &g.node {
            for r in node_reads(n) {
                if !avail.contains(r.as_str()) {
                    let msg = if !defined.contains(r.as_str()) {
                        format!("node '{}' ({}) reads '{r}', which nothing produces", n.label(), n.op_type())
                    } else if let Some(c) = self.cycle_node(g) {
                        let c = &g.node[c];
                        format!("a cycle: node '{}' ({}) depends on its own output", c.label(), c.op_type())
                    } else {
                        format!(
                            "nodes are not in topological order: node '{}' ({}) reads '{r}' before it is produced",
                            n.label(),
                            n.op_type()
                        )
                    };
                    return err(msg);
                }
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                avail.insert(o);
            }
        }
        for o in &g.output {
            if !avail.contains(o.name()) {
                return err(format!("graph output '{}' is not produced", o.name()));
            }
        }
        Ok(())
    }

    /// A node on a cycle, if the graph has one (Kahn's algorithm; then walk back from a node
    /// left over until a node repeats).
    fn cycle_node(&self, g: &GraphProto) -> Option<usize> {
        let n = g.node.len();
        let deps: Vec<Vec<usize>> = g
            .node
            .iter()
            .map(|nd| node_reads(nd).iter().filter_map(|r| self.producer.get(r).map(|&(p, _)| p)).collect())
            .collect();
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut pending: Vec<usize> = vec![0; n];
        for (i, d) in deps.iter().enumerate() {
            pending[i] = d.len();
            for &p in d {
                users[p].push(i);
            }
        }
        let mut ready: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
        let mut done = vec![false; n];
        while let Some(i) = ready.pop() {
            done[i] = true;
            for &u in &users[i] {
                pending[u] -= 1;
                if pending[u] == 0 {
                    ready.push(u);
                }
            }
        }
        // every node left over depends on another left over; walking back must repeat
        let mut cur = (0..n).find(|&i| !done[i])?;
        let mut visited = vec![false; n];
        while !visited[cur] {
            visited[cur] = true;
            cur = *deps[cur].iter().find(|&&p| !done[p])?;
        }
        Some(cur)
    }
}
