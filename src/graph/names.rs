//! Fresh tensor and node names: one generator per rewrite, so that names made for one patch
//! never collide with each other or with any name of the graph.

use super::GraphIndex;
use crate::proto::{GraphProto, NodeProto};
use std::collections::HashSet;

/// Makes names not used anywhere in a graph (nor made before by this generator).
pub(crate) struct Names<'g> {
    /// every name of the graph (see [`graph_names`]; the rewrite driver keeps this set across
    /// patches)
    known: &'g HashSet<String>,
    /// the names made
    made: HashSet<String>,
    /// initializer names handed out as a conv's own by [`Names::conv_params`]
    claimed: HashSet<String>,
}

/// Every name a graph uses: inputs, outputs, initializers, value infos, node inputs and outputs.
pub(crate) fn graph_names(g: &GraphProto) -> HashSet<String> {
    let mut t: HashSet<String> = HashSet::new();
    t.extend(g.input.iter().map(|v| v.name().to_string()));
    t.extend(g.output.iter().map(|v| v.name().to_string()));
    t.extend(g.initializer.iter().map(|t| t.name().to_string()));
    t.extend(g.value_info.iter().map(|v| v.name().to_string()));
    for n in &g.node {
        t.extend(n.input.iter().cloned());
        t.extend(n.output.iter().cloned());
    }
    t
}

impl<'g> Names<'g> {
    /// A generator over a graph whose names are all in `known`.
    pub fn new(known: &'g HashSet<String>) -> Names<'g> {
        Names { known, made: HashSet::new(), claimed: HashSet::new() }
    }

    /// `base`, or `base_1`, `base_2`, ... : the first that is free.
    pub fn fresh(&mut self, base: &str) -> String {
        let taken = |n: &str| self.made.contains(n) || self.known.contains(n);
        let mut name = base.to_string();
        let mut k = 1;
        while taken(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.made.insert(name.clone());
        name
    }

    /// Names for a rewritten conv's weight and bias: the conv's own initializers when nothing
    /// else reads them (and no earlier call of this generator took them), fresh names otherwise.
    pub fn conv_params(&mut self, ix: &GraphIndex, conv: &NodeProto) -> (String, String) {
        let wname = self.own_or_fresh(ix, &conv.input[1]);
        let bname = match conv.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) if self.own(ix, b) => self.claim(b),
            _ => self.fresh(&format!("{wname}_bias")),
        };
        (wname, bname)
    }

    /// The name for a rewritten value of initializer `name`: its own when only one node reads it
    /// (and no earlier call of this generator took it), `{name}_fused` (made fresh) otherwise.
    pub fn own_or_fresh(&mut self, ix: &GraphIndex, name: &str) -> String {
        if self.own(ix, name) {
            self.claim(name)
        } else {
            self.fresh(&format!("{name}_fused"))
        }
    }

    fn own(&self, ix: &GraphIndex, name: &str) -> bool {
        ix.initializer.contains_key(name)
            && ix.uses(name) == 1
            && !ix.inputs.contains(name)
            && !self.claimed.contains(name)
    }

    fn claim(&mut self, name: &str) -> String {
        self.claimed.insert(name.to_string());
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{NodeProto, TensorProto};

    fn graph() -> GraphProto {
        let t = |n: &str| TensorProto { name: Some(n.into()), ..Default::default() };
        let conv = NodeProto {
            op_type: Some("Conv".into()),
            input: vec!["x".into(), "w".into(), "b".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        GraphProto { node: vec![conv], initializer: vec![t("w"), t("b"), t("w_fused")], ..Default::default() }
    }

    #[test]
    fn fresh_names_avoid_the_graph_and_each_other() {
        let g = graph();
        let known = graph_names(&g);
        let mut names = Names::new(&known);
        assert_eq!(names.fresh("y"), "y_1");
        assert_eq!(names.fresh("y"), "y_2");
        assert_eq!(names.fresh("w_fused"), "w_fused_1");
        assert_eq!(names.fresh("new"), "new");
        assert_eq!(names.fresh("new"), "new_1");
    }

    #[test]
    fn a_conv_keeps_its_own_parameter_names_once_per_generator() {
        let g = graph();
        let ix = GraphIndex::new(&g);
        let known = graph_names(&g);
        let mut names = Names::new(&known);
        let conv = &g.node[0];
        assert_eq!(names.conv_params(&ix, conv), ("w".to_string(), "b".to_string()));
        // a second merged conv in the same patch never gets the same names
        let (w2, b2) = names.conv_params(&ix, conv);
        assert_eq!((w2.as_str(), b2.as_str()), ("w_fused_1", "w_fused_1_bias"));
    }
}
