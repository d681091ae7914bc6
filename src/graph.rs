//! An index over a graph for the rewrite passes: who produces and who consumes each tensor,
//! which tensors are constants, and attribute access with the operators' defaults.

use crate::error::{Error, Result};
use crate::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto, NodeProto, TensorProto};
use std::collections::{HashMap, HashSet};

/// Producers and consumers of every tensor of one graph (not of its subgraphs; a tensor a
/// subgraph reads from the outer scope counts as consumed by the node that holds the subgraph).
#[derive(Debug, Default)]
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
        for (i, t) in g.initializer.iter().enumerate() {
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

    /// Check the graph is well formed: every input is produced, no name is produced twice, no
    /// cycle (nodes may be out of order; ONNX requires topological order, which we check too).
    pub fn validate(&self, g: &GraphProto) -> Result<()> {
        let gname = g.name.as_deref().unwrap_or("graph");
        let mut seen: HashSet<&str> = HashSet::new();
        for v in &g.input {
            if !seen.insert(v.name()) {
                return Err(Error::Invalid(format!("{gname}: duplicate graph input '{}'", v.name())));
            }
        }
        for t in &g.initializer {
            if !self.inputs.contains(t.name()) && !seen.insert(t.name()) {
                return Err(Error::Invalid(format!("{gname}: duplicate initializer '{}'", t.name())));
            }
        }
        let mut defined: HashSet<&str> = seen.clone();
        for n in &g.node {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if defined.contains(o.as_str()) {
                    return Err(Error::Invalid(format!(
                        "{gname}: tensor '{o}' is produced twice (node '{}')",
                        n.name()
                    )));
                }
                defined.insert(o);
            }
        }
        // topological order: every read must be defined earlier
        let mut avail: HashSet<&str> = seen;
        for n in &g.node {
            for r in node_reads(n) {
                if !avail.contains(r.as_str()) {
                    let msg = if defined.contains(r.as_str()) {
                        format!("node '{}' ({}) reads '{r}' before it is produced (a cycle, or nodes out of order)", n.name(), n.op_type())
                    } else {
                        format!("node '{}' ({}) reads '{r}', which nothing produces", n.name(), n.op_type())
                    };
                    return Err(Error::Invalid(format!("{gname}: {msg}")));
                }
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                avail.insert(o);
            }
        }
        for o in &g.output {
            if !avail.contains(o.name()) {
                return Err(Error::Invalid(format!("{gname}: graph output '{}' is not produced", o.name())));
            }
        }
        Ok(())
    }
}

pub fn is_default_domain(n: &NodeProto) -> bool {
    matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

/// The opset version of the default domain.
pub fn default_opset(m: &crate::proto::ModelProto) -> i64 {
    m.opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(1)
}

pub fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name() == name)
}

pub fn attr_int(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).and_then(|a| a.i).unwrap_or(default)
}

pub fn attr_float(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).and_then(|a| a.f).unwrap_or(default)
}

pub fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

pub fn attr_string(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Attributes that hold a reference to a function attribute cannot be resolved here.
pub fn has_ref_attr(n: &NodeProto) -> bool {
    n.attribute.iter().any(|a| a.ref_attr_name.is_some() || a.r#type == Some(AttributeType::Undefined as i32) && a.name.is_none())
}
