//! Cutting two models at the nodes tract cannot run (see [Cuts](super#cuts)): which nodes, the
//! parts between them, and each part as a model of its own.
//!
//! The parts are found in the reference. A tensor's *level* is the number of cut nodes on the
//! longest path from the graph's inputs to it: the graph inputs are at level 0, a node that is
//! not cut writes at the level of its deepest input, a cut node one level deeper. Constants
//! (initializers, Constant nodes and what nodes compute from constants alone) have no level:
//! they stay constants in every part that reads them. Part `k` holds the nodes of level `k`; it
//! reads the graph inputs and the tensors of lower levels its nodes read (the *cut tensors*:
//! written by a cut node, or by an earlier part), and its outputs are the graph outputs it
//! writes and every tensor a cut node or a later part reads. The candidate's parts are the
//! nodes that compute the same outputs from the same inputs: the rewrite keeps tensor names.

use crate::graph::{node_reads, GraphIndex};
use crate::model::tensor::to_f64;
use crate::model::Model;
use crate::proto::{AttributeProto, NodeProto, TensorProto, ValueInfoProto};
use crate::tract::Why;
use std::collections::{HashMap, HashSet};

/// A node at which both models are cut.
#[derive(Clone, Debug)]
pub(crate) struct Cut {
    /// The node in the reference's graph and in the candidate's (by index; `None` where the
    /// candidate has no node writing the same first output).
    pub r: usize,
    pub c: Option<usize>,
    /// Why tract cannot run it, in the reference or (`in_candidate`) only in the candidate.
    pub why: Why,
    pub in_candidate: bool,
    /// How the candidate's node differs from the reference's, if it does.
    pub problem: Option<String>,
}

/// Where a part's cut tensor comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum From {
    /// written by this cut (an index into [`Plan::cuts`])
    Cut(usize),
    /// computed by this earlier part
    Part(usize),
}

/// One part: what it reads and what is compared.
#[derive(Clone, Debug)]
pub(crate) struct PartSpec {
    /// The graph inputs it reads (in graph order), then its cut tensors.
    pub inputs: Vec<String>,
    /// Its cut tensors, and where each comes from.
    pub cut: Vec<(String, From)>,
    /// The tensors compared: the graph outputs it writes, then what later parts and the cuts
    /// read.
    pub outputs: Vec<String>,
}

/// The cut of two models.
#[derive(Debug)]
pub(crate) struct Plan {
    pub cuts: Vec<Cut>,
    pub parts: Vec<PartSpec>,
    /// Nodes of the candidate tract cannot run that no cut pairs with a node of the reference.
    pub candidate_only: HashSet<usize>,
    /// Graph outputs no part computes (written by a cut node, or a graph input or constant).
    pub notes: Vec<String>,
}

/// The first output of a node: what pairs it with the other model's node.
fn key(n: &NodeProto) -> Option<&str> {
    n.output.first().map(|s| s.as_str()).filter(|s| !s.is_empty())
}

/// The cut of `r` and `c`, at the nodes tract cannot run in either (`ur`, `uc`: indices in each
/// graph, and why), paired by the tensor they write first.
pub(crate) fn plan(r: &Model, c: &Model, ur: &[(usize, Why)], uc: &[(usize, Why)]) -> Plan {
    let (rg, cg) = (r.graph(), c.graph());
    let writer = |g: &crate::proto::GraphProto| -> HashMap<String, usize> {
        g.node.iter().enumerate().filter_map(|(i, n)| key(n).map(|k| (k.to_string(), i))).collect()
    };
    let (rw, cw) = (writer(rg), writer(cg));
    let mut cuts: Vec<Cut> = vec![];
    for (i, why) in ur {
        let c = key(&rg.node[*i]).and_then(|k| cw.get(k)).copied();
        cuts.push(Cut { r: *i, c, why: why.clone(), in_candidate: false, problem: None });
    }
    let mut candidate_only = HashSet::new();
    for (j, why) in uc {
        if cuts.iter().any(|cut| cut.c == Some(*j)) {
            continue;
        }
        match key(&cg.node[*j]).and_then(|k| rw.get(k)) {
            Some(&i) if !cuts.iter().any(|cut| cut.r == i) => {
                cuts.push(Cut { r: i, c: Some(*j), why: why.clone(), in_candidate: true, problem: None })
            }
            _ => {
                candidate_only.insert(*j);
            }
        }
    }
    cuts.sort_by_key(|cut| cut.r);
    let (rix, cix) = (GraphIndex::new(rg), GraphIndex::new(cg));
    for cut in &mut cuts {
        cut.problem = match cut.c {
            None => Some(match key(&rg.node[cut.r]) {
                Some(k) => format!("the candidate has no node writing `{k}`"),
                None => "it writes nothing".into(),
            }),
            Some(j) => differs(r, &rix, &rg.node[cut.r], c, &cix, &cg.node[j]),
        };
    }
    let (parts, notes) = parts(r, &cuts);
    Plan { cuts, parts, candidate_only, notes }
}

/// How the candidate's node `b` differs from the reference's `a` (a node the check cannot run:
/// it must be the same, with the same constant inputs).
fn differs(r: &Model, rix: &GraphIndex, a: &NodeProto, c: &Model, cix: &GraphIndex, b: &NodeProto) -> Option<String> {
    let list = |v: &[String]| format!("[{}]", v.join(", "));
    if a.op_type() != b.op_type() || a.domain() != b.domain() {
        return Some(format!(
            "the candidate's node writing `{}` is {} '{}' (domain `{}`), not {} (domain `{}`)",
            key(a).unwrap_or_default(),
            b.op_type(),
            b.name(),
            b.domain(),
            a.op_type(),
            a.domain()
        ));
    }
    if a.input != b.input {
        return Some(format!("in the candidate it reads {} instead of {}", list(&b.input), list(&a.input)));
    }
    if a.output != b.output {
        return Some(format!("in the candidate it writes {} instead of {}", list(&b.output), list(&a.output)));
    }
    if let Some(d) = attributes_differ(&a.attribute, &b.attribute) {
        return Some(d);
    }
    for i in a.input.iter().filter(|i| !i.is_empty()) {
        if is_constant(r, rix, i) || is_constant(c, cix, i) {
            if let Err(why) = same_constant(r, rix, c, cix, i, 0) {
                return Some(format!("its constant input `{i}` differs in the candidate: {why}"));
            }
        }
    }
    None
}

/// The first attribute that differs between two nodes' (by name), said so.
fn attributes_differ(a: &[AttributeProto], b: &[AttributeProto]) -> Option<String> {
    let strip = |x: &AttributeProto| AttributeProto { doc_string: None, ..x.clone() };
    for x in a {
        match b.iter().find(|y| y.name() == x.name()) {
            None => return Some(format!("the candidate's node has no attribute `{}`", x.name())),
            Some(y) if strip(x) != strip(y) => {
                return Some(format!("its attribute `{}` differs in the candidate", x.name()))
            }
            Some(_) => {}
        }
    }
    b.iter()
        .find(|y| !a.iter().any(|x| x.name() == y.name()))
        .map(|y| format!("the candidate's node has an attribute `{}` the reference's has not", y.name()))
}

/// Whether `name` is a constant of `m`: an initializer (not a graph input), or written by a
/// node whose reads are all constants.
fn is_constant(m: &Model, ix: &GraphIndex, name: &str) -> bool {
    fn go(m: &Model, ix: &GraphIndex, name: &str, depth: usize) -> bool {
        if ix.initializer.contains_key(name) {
            return !ix.inputs.contains(name);
        }
        if depth > 256 || ix.inputs.contains(name) {
            return false;
        }
        match ix.producer.get(name) {
            Some(&(i, _)) => node_reads(&m.graph().node[i]).iter().all(|r| go(m, ix, r, depth + 1)),
            None => false,
        }
    }
    go(m, ix, name, 0)
}

/// Whether the constant `name` is the same in both models: the same values, or the same nodes
/// computing it from the same constants.
fn same_constant(
    r: &Model,
    rix: &GraphIndex,
    c: &Model,
    cix: &GraphIndex,
    name: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > 256 {
        return Err("computed too deep to compare".into());
    }
    let (rt, ct) = (rix.initializer.get(name), cix.initializer.get(name));
    if let (Some(&a), Some(&b)) = (rt, ct) {
        return same_values(r, &r.graph().initializer[a], c, &c.graph().initializer[b]);
    }
    match (rix.producer.get(name), cix.producer.get(name)) {
        (Some(&(a, _)), Some(&(b, _))) => {
            let (a, b) = (&r.graph().node[a], &c.graph().node[b]);
            if a.op_type() != b.op_type() || a.domain() != b.domain() || a.input != b.input || a.output != b.output {
                return Err(format!(
                    "computed by {} '{}' in the reference, {} '{}' in the candidate",
                    a.op_type(),
                    a.name(),
                    b.op_type(),
                    b.name()
                ));
            }
            if let Some(d) = attributes_differ(&a.attribute, &b.attribute) {
                return Err(format!("{} '{}': {d}", a.op_type(), a.name()));
            }
            for i in node_reads(a) {
                same_constant(r, rix, c, cix, &i, depth + 1)?;
            }
            Ok(())
        }
        (None, None) if rt.is_none() && ct.is_none() => Err("not a constant of either model".into()),
        _ => Err("an initializer in one model, computed in the other".into()),
    }
}

/// Whether two stored tensors hold the same values (of the same type and shape).
fn same_values(r: &Model, a: &TensorProto, c: &Model, b: &TensorProto) -> Result<(), String> {
    if a.data_type() != b.data_type() || a.dims != b.dims {
        return Err(format!("type or shape {:?} {:?} vs {:?} {:?}", a.data_type(), a.dims, b.data_type(), b.dims));
    }
    let (ra, rb) = (r.raw_bytes(a).map_err(|e| e.to_string())?, c.raw_bytes(b).map_err(|e| e.to_string())?);
    if let (Some(x), Some(y)) = (&ra, &rb) {
        return if x == y { Ok(()) } else { Err("other values".into()) };
    }
    match (to_f64(a, ra.as_deref()), to_f64(b, rb.as_deref())) {
        (Ok(x), Ok(y)) => {
            let same = x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| p.to_bits() == q.to_bits());
            if same {
                Ok(())
            } else {
                Err("other values".into())
            }
        }
        _ => {
            let strip = |t: &TensorProto| TensorProto { name: None, doc_string: None, ..t.clone() };
            if strip(a) == strip(b) {
                Ok(())
            } else {
                Err("other values".into())
            }
        }
    }
}

/// The parts of `m` (the reference) between `cuts` (see the module docs), and notes about
/// graph outputs no part computes.
fn parts(m: &Model, cuts: &[Cut]) -> (Vec<PartSpec>, Vec<String>) {
    let g = m.graph();
    let ix = GraphIndex::new(g);
    let cut_of: HashMap<usize, usize> = cuts.iter().enumerate().map(|(k, c)| (c.r, k)).collect();
    let order = topological(g, &ix);
    // the level of every tensor that is not a constant; a node's level (None: a constant)
    let mut level: HashMap<&str, usize> = HashMap::new();
    for v in g.input.iter().filter(|v| !ix.initializer.contains_key(v.name())) {
        level.insert(v.name(), 0);
    }
    let mut node_level: Vec<Option<usize>> = vec![None; g.node.len()];
    for &i in &order {
        let n = &g.node[i];
        let reads = node_reads(n);
        let deepest = reads.iter().filter_map(|r| level.get(r.as_str())).max().copied();
        let out = if cut_of.contains_key(&i) {
            Some(deepest.unwrap_or(0) + 1)
        } else {
            node_level[i] = deepest;
            deepest
        };
        if let Some(l) = out {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                level.insert(o, l);
            }
        }
    }
    let writer = |t: &str| ix.producer.get(t).map(|&(i, _)| i);
    // who reads each tensor: the levels of the runnable nodes, and whether a cut does
    let mut read_at: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut read_by_cut: HashSet<&str> = HashSet::new();
    for &i in &order {
        let reads = node_reads(&g.node[i]);
        for r in reads {
            let Some((name, _)) = level.get_key_value(r.as_str()) else { continue };
            if cut_of.contains_key(&i) {
                read_by_cut.insert(name);
            } else if let Some(l) = node_level[i] {
                read_at.entry(name).or_default().push(l);
            }
        }
    }
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name()).collect();
    let mut notes = vec![];
    for o in &g.output {
        match writer(o.name()) {
            Some(w) if cut_of.contains_key(&w) => notes.push(format!(
                "output `{}` is written by {} '{}', which tract cannot run: it is not compared (its inputs are)",
                o.name(),
                g.node[w].op_type(),
                g.node[w].name()
            )),
            Some(_) if level.contains_key(o.name()) => {}
            _ => notes.push(format!("output `{}` is a graph input or a constant: not compared", o.name())),
        }
    }
    let levels: Vec<usize> = {
        let mut l: Vec<usize> =
            order.iter().filter(|i| !cut_of.contains_key(i)).filter_map(|&i| node_level[i]).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let mut specs: Vec<(usize, PartSpec)> = vec![];
    for &l in &levels {
        let nodes: Vec<usize> =
            order.iter().copied().filter(|i| !cut_of.contains_key(i) && node_level[*i] == Some(l)).collect();
        let mut spec = PartSpec { inputs: vec![], cut: vec![], outputs: vec![] };
        // what it reads
        // (what its own nodes write is internal; what a cut or an earlier part writes, and the
        // graph inputs, it reads)
        let internal = |t: &str| writer(t).is_some_and(|w| !cut_of.contains_key(&w) && node_level[w] == Some(l));
        let mut reads: Vec<String> = vec![];
        for &i in &nodes {
            for r in node_reads(&g.node[i]) {
                if level.contains_key(r.as_str()) && !internal(&r) && !reads.contains(&r) {
                    reads.push(r);
                }
            }
        }
        for v in &g.input {
            if reads.iter().any(|r| r == v.name()) {
                spec.inputs.push(v.name().to_string());
            }
        }
        for r in reads.iter().filter(|r| !ix.inputs.contains(*r)) {
            let from = match writer(r) {
                Some(w) => match cut_of.get(&w) {
                    Some(&k) => From::Cut(k),
                    None => From::Part(node_level[w].unwrap_or(0)),
                },
                None => continue,
            };
            spec.inputs.push(r.clone());
            spec.cut.push((r.clone(), from));
        }
        // what is compared
        for o in &g.output {
            if writer(o.name()).is_some_and(|w| nodes.contains(&w)) && level.contains_key(o.name()) {
                spec.outputs.push(o.name().to_string());
            }
        }
        for &i in &nodes {
            for o in g.node[i].output.iter().filter(|o| !o.is_empty()) {
                let later = read_at.get(o.as_str()).is_some_and(|ls| ls.iter().any(|&rl| rl > l));
                if (later || read_by_cut.contains(o.as_str()))
                    && !outputs.contains(o.as_str())
                    && level.contains_key(o.as_str())
                {
                    spec.outputs.push(o.clone());
                }
            }
        }
        if !spec.outputs.is_empty() {
            specs.push((l, spec));
        }
    }
    // parts numbered in order; a cut tensor from an earlier part names that part's number
    let number: HashMap<usize, usize> = specs.iter().enumerate().map(|(k, (l, _))| (*l, k)).collect();
    let parts = specs
        .into_iter()
        .map(|(_, mut spec)| {
            for (_, from) in &mut spec.cut {
                if let From::Part(l) = from {
                    *l = number.get(l).copied().unwrap_or(*l);
                }
            }
            spec
        })
        .collect();
    (parts, notes)
}

/// The nodes of `g` in an order where every node comes after those it reads from (the graph's
/// own order when it is one, as ONNX asks).
fn topological(g: &crate::proto::GraphProto, ix: &GraphIndex) -> Vec<usize> {
    let n = g.node.len();
    let mut waiting: Vec<usize> = vec![0; n];
    let mut after: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, node) in g.node.iter().enumerate() {
        let mut from: Vec<usize> =
            node_reads(node).iter().filter_map(|r| ix.producer.get(r).map(|&(p, _)| p)).collect();
        from.sort_unstable();
        from.dedup();
        from.retain(|&p| p != i);
        waiting[i] = from.len();
        for p in from {
            after[p].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &after[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert(j);
            }
        }
    }
    // a cycle (not a valid model): the rest in graph order
    if order.len() < n {
        let placed: HashSet<usize> = order.iter().copied().collect();
        order.extend((0..n).filter(|i| !placed.contains(i)));
    }
    order
}

/// The nodes (by index, in graph order) and initializers of `m` that compute `outputs` from
/// `inputs` and constants, and the graph inputs they read besides `inputs`. `Err` says which
/// tensor cannot be computed so: one no node writes, or one a node in `cut` writes (a node the
/// check cannot run).
pub(crate) struct Slice {
    pub nodes: Vec<usize>,
    pub initializers: Vec<usize>,
    pub graph_inputs: Vec<String>,
}

pub(crate) fn slice(m: &Model, inputs: &[String], outputs: &[String], cut: &HashSet<usize>) -> Result<Slice, String> {
    let g = m.graph();
    let ix = GraphIndex::new(g);
    let stop: HashSet<&str> = inputs.iter().map(|s| s.as_str()).collect();
    let (mut nodes, mut inits, mut graph_inputs) = (HashSet::new(), HashSet::new(), vec![]);
    let mut seen: HashSet<String> = HashSet::new();
    let mut stack: Vec<(String, Option<String>)> = outputs.iter().map(|o| (o.clone(), None)).collect();
    while let Some((t, reader)) = stack.pop() {
        if !seen.insert(t.clone()) || stop.contains(t.as_str()) {
            continue;
        }
        if let Some(&k) = ix.initializer.get(&t) {
            inits.insert(k);
            continue;
        }
        if ix.inputs.contains(&t) {
            graph_inputs.push(t);
            continue;
        }
        let Some(&(i, _)) = ix.producer.get(&t) else {
            return Err(match reader {
                None => format!("it has no tensor `{t}`"),
                Some(r) => format!("it has no tensor `{t}`, which '{r}' reads"),
            });
        };
        let n = &g.node[i];
        if cut.contains(&i) {
            return Err(format!(
                "its `{t}` is written by {} '{}', which tract cannot run, and is no cut tensor of this part",
                n.op_type(),
                n.name()
            ));
        }
        if nodes.insert(i) {
            let name = if n.name().is_empty() { t.clone() } else { n.name().to_string() };
            stack.extend(node_reads(n).into_iter().map(|r| (r, Some(name.clone()))));
        }
    }
    let mut nodes: Vec<usize> = nodes.into_iter().collect();
    nodes.sort_unstable();
    let mut initializers: Vec<usize> = inits.into_iter().collect();
    initializers.sort_unstable();
    graph_inputs.sort_by_key(|n| g.input.iter().position(|v| v.name() == n));
    Ok(Slice { nodes, initializers, graph_inputs })
}

/// `m`'s `slice` as a model of its own: its inputs declared as `inputs` says (a graph input's
/// own declaration, a cut tensor's type and shape), its outputs `outputs` (declared as `m`
/// declares them, where it does); everything else of the model as it is.
pub(crate) fn build(m: &Model, s: &Slice, inputs: &[ValueInfoProto], outputs: &[String]) -> Model {
    let g = m.graph();
    let mut part = m.clone();
    let pg = part.proto.graph.as_mut().expect("a Model has a graph");
    let written: HashSet<&str> = s.nodes.iter().flat_map(|&i| g.node[i].output.iter().map(|o| o.as_str())).collect();
    let declared = |name: &str| -> ValueInfoProto {
        g.output
            .iter()
            .chain(&g.value_info)
            .find(|v| v.name() == name)
            .cloned()
            .unwrap_or_else(|| ValueInfoProto { name: Some(name.to_string()), ..Default::default() })
    };
    pg.node = s.nodes.iter().map(|&i| g.node[i].clone()).collect();
    pg.initializer = s.initializers.iter().map(|&k| g.initializer[k].clone()).collect();
    let kept: HashSet<&str> = pg.initializer.iter().map(|t| t.name()).collect();
    // initializers listed as graph inputs stay listed
    let mut declared_inputs: Vec<ValueInfoProto> = inputs.to_vec();
    declared_inputs.extend(g.input.iter().filter(|v| kept.contains(v.name())).cloned());
    pg.input = declared_inputs;
    pg.output = outputs.iter().map(|o| declared(o)).collect();
    pg.value_info.retain(|v| written.contains(v.name()) && !outputs.iter().any(|o| o == v.name()));
    let reads: HashSet<String> = pg.node.iter().flat_map(node_reads).collect();
    pg.sparse_initializer.retain(|t| t.values.as_ref().is_some_and(|v| reads.contains(v.name())));
    part
}

/// Whether two slices are the same nodes (operator, domain, tensors, attributes; paired by
/// the tensor they write first) with the same constants.
pub(crate) fn same_slices(r: &Model, rs: &Slice, c: &Model, cs: &Slice) -> bool {
    let (rg, cg) = (r.graph(), c.graph());
    if rs.nodes.len() != cs.nodes.len() || rs.initializers.len() != cs.initializers.len() {
        return false;
    }
    let cn: HashMap<&str, &NodeProto> =
        cs.nodes.iter().filter_map(|&j| key(&cg.node[j]).map(|k| (k, &cg.node[j]))).collect();
    let nodes_same = rs.nodes.iter().all(|&i| {
        let a = &rg.node[i];
        key(a).and_then(|k| cn.get(k)).is_some_and(|b| {
            a.op_type() == b.op_type()
                && a.domain() == b.domain()
                && a.input == b.input
                && a.output == b.output
                && attributes_differ(&a.attribute, &b.attribute).is_none()
        })
    });
    nodes_same
        && rs.initializers.iter().all(|&k| {
            let a = &rg.initializer[k];
            cs.initializers
                .iter()
                .map(|&j| &cg.initializer[j])
                .find(|b| b.name() == a.name())
                .is_some_and(|b| same_values(r, a, c, b).is_ok())
        })
}
