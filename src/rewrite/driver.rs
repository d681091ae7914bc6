//! The driver: tries every rule at every node, applies the patch of the first that fires, and
//! repeats whole scans until one changes nothing. What rules see of the model is a [`Cx`].

use super::patch::Holes;
use super::{Refusal, Rewrite, Step, Try};
use crate::graph::{default_opset, graph_names, is_op, Consts, Exact, GraphIndex, Names};
use crate::model::tensor::{checked_numel, FloatType};
use crate::model::Model;
use crate::proto::{GraphProto, NodeProto, TensorProto};
use crate::tract::shapes::Free;
use crate::tract::ShapeFacts;
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

/// How many sums, scales and norms past the first three steps from a kernel's readers the exact
/// cache looks through for the root of the sum that may merge it (see [`Cache::evict_before`]).
const SUM_DEPTH: usize = 64;

/// State kept across patches.
pub(crate) struct Cache {
    /// The exact f64 values of the tensors the rewrite wrote, so that a kernel folded and then
    /// merged (a BN folded into each branch, then the branches merged; nested sums) is rounded to
    /// its dtype once. The graph holds the rounded values of held ones ([`Exact::Values`], an
    /// [`Exact::Summed`] whose bytes are written: branches merged) too, so such an entry can be
    /// dropped at any time: it is dropped once the scan has passed every node that could read
    /// it ([`Cache::evict_before`]), which keeps at most a block's worth alive. A deferred one —
    /// a scaled stored tensor ([`Exact::Scaled`]: a BN folded into the Conv that stores it), or
    /// a sum of them not yet computed — is small (views of the stored bytes, factors per
    /// channel, tap positions) and stays until the rewrite ends, when the graph gets its values
    /// ([`settle`]); until then the graph's initializer has no data, and whatever reads the
    /// graph's tensors reads [`Cache::settled`].
    pub exact: HashMap<String, Exact>,
    /// The names of the held entries of `exact` (not deferred): the ones eviction looks at.
    held: HashSet<String>,
    /// Every name the graph has used since the rewrite began (names of removed tensors stay
    /// taken), so that fresh names are found without reading the graph.
    names: HashSet<String>,
    /// The slots patches emptied, not yet compacted away.
    holes: Holes,
    /// tract's analysis of the model at the shapes it runs at, computed when first needed.
    facts: RefCell<Option<ShapeFacts>>,
    /// The shapes the graph declares (value infos, then graph inputs), by name; read once.
    declared: RefCell<Option<HashMap<String, Option<Vec<Dim>>>>>,
    /// Input shapes given by the user (`--input-shape`), overriding the declared ones.
    given: Vec<(String, Vec<usize>)>,
}

/// A declared dim: a value, or a symbol by its name (`None`: no name).
#[derive(Clone, Debug)]
enum Dim {
    Value(usize),
    Symbol(Option<String>),
}

impl Cache {
    #[cfg(test)]
    pub fn new(g: &GraphProto) -> Cache {
        Cache::with_inputs(g, vec![])
    }

    /// A cache for a model run at `given` input shapes (by input name) where they are given.
    pub fn with_inputs(g: &GraphProto, given: Vec<(String, Vec<usize>)>) -> Cache {
        Cache {
            exact: HashMap::new(),
            held: HashSet::new(),
            names: graph_names(g),
            holes: Holes::default(),
            facts: RefCell::default(),
            declared: RefCell::default(),
            given,
        }
    }

    /// Forget the declared shapes read so far: the graph's value infos were compacted, and the
    /// dropped ones (tensors gone, initializers reshaped) are no longer marked as holes.
    fn forget_declared(&mut self) {
        *self.declared.get_mut() = None;
    }

    /// Drop the f64 values no rule at node `i` or later can read: rules read a kernel from a
    /// BatchNormalization or scale at most two steps downstream of its Conv (Conv → Mul → Add),
    /// or from the root of the sum its block's branches meet in (a sum of k terms is k − 1 Adds
    /// deep: MobileOne's, or a residual Add on an ACNet block's sum). So an entry is done with
    /// once `i` is past every node three steps from its readers and past the sums, scales and
    /// norms that follow (up to [`SUM_DEPTH`] more). Dropped earlier, a merge would read the
    /// value rounded to its dtype, and round it twice.
    fn evict_before(&mut self, g: &GraphProto, ix: &GraphIndex, i: usize) {
        if self.held.is_empty() {
            return;
        }
        // (the operators of sums and of the scales and norms between them: FastViT's layer scale)
        let affine =
            |n: &NodeProto| matches!(n.op_type(), "Add" | "Sub" | "Sum" | "Mul" | "Div" | "BatchNormalization");
        let horizon = |name: &str| -> usize {
            let mut last = 0;
            let mut seen: HashSet<usize> = HashSet::new();
            let mut frontier: Vec<usize> = ix.consumers_of(name).to_vec();
            for depth in 0..3 + SUM_DEPTH {
                let mut next = Vec::new();
                for &c in &frontier {
                    if !seen.insert(c) || (depth >= 3 && !affine(&g.node[c])) {
                        continue;
                    }
                    last = last.max(c);
                    for o in &g.node[c].output {
                        next.extend_from_slice(ix.consumers_of(o));
                    }
                }
                if next.is_empty() {
                    break;
                }
                frontier = next;
            }
            last
        };
        // (only the held ones: the deferred ones stay until the rewrite ends, and looking at
        // them at every node would make the rewrite quadratic in their number)
        let (held, exact) = (&mut self.held, &mut self.exact);
        held.retain(|name| {
            if exact.get(name).is_none_or(|e| e.deferred()) {
                return false;
            }
            let keep = horizon(name) >= i;
            if !keep {
                exact.remove(name);
            }
            keep
        });
    }

    /// Whether some initializer of the graph has no data yet (see [`Exact::Scaled`]).
    fn unsettled(&self) -> bool {
        self.exact.values().any(Exact::deferred)
    }

    /// `t` as the graph will hold it once the rewrite ends: its values computed if it is an
    /// initializer the rewrite wrote and has not computed yet, else `None` (it is as it is).
    pub fn settled(&self, t: &TensorProto) -> Option<TensorProto> {
        settled(&self.exact, t)
    }
}

fn settled(exact: &HashMap<String, Exact>, t: &TensorProto) -> Option<TensorProto> {
    let e = exact.get(t.name()).filter(|e| e.deferred())?;
    let ft = FloatType::from_onnx(t.data_type.unwrap_or(0))?;
    if t.raw_data.is_some() || !t.external_data.is_empty() {
        return None;
    }
    e.encode(t.name(), ft)
}

/// Give the graph's initializers that have no data yet their values (in parallel: each is a pass
/// over its stored tensor, whose pages in the input's memory map are let go of once read), and
/// forget them.
pub(crate) fn settle(model: &mut Model, cache: &mut Cache) {
    use rayon::prelude::*;
    if !cache.unsettled() {
        return;
    }
    let (exact, m) = (&cache.exact, &*model);
    let done: Vec<(usize, TensorProto)> = m
        .graph()
        .initializer
        .par_iter()
        .enumerate()
        .filter_map(|(k, t)| {
            let s = settled(exact, t)?;
            for from in exact.get(t.name()).map(Exact::stored).unwrap_or_default() {
                m.release(from);
            }
            Some((k, s))
        })
        .collect();
    let g = model.graph_mut();
    for (k, t) in done {
        g.initializer[k] = t;
    }
    cache.exact.retain(|_, e| !e.deferred());
}

/// What a rule sees: the model, its graph's index, its constants, and cached analyses.
pub(crate) struct Cx<'a> {
    pub model: &'a Model,
    pub g: &'a GraphProto,
    pub ix: &'a GraphIndex,
    pub consts: Consts<'a>,
    /// The opset of the default domain.
    pub opset: i64,
    cache: &'a Cache,
}

impl<'a> Cx<'a> {
    pub fn new(model: &'a Model, ix: &'a GraphIndex, cache: &'a Cache) -> Cx<'a> {
        Cx {
            model,
            g: model.graph(),
            ix,
            consts: Consts { model, ix, exact: &cache.exact },
            opset: default_opset(&model.proto),
            cache,
        }
    }

    pub fn node(&self, i: usize) -> &'a NodeProto {
        &self.g.node[i]
    }

    /// The index of the node that writes `name`.
    pub fn producer(&self, name: &str) -> Option<usize> {
        self.ix.producer.get(name).map(|&(n, _)| n)
    }

    pub fn producer_node(&self, name: &str) -> Option<&'a NodeProto> {
        self.producer(name).map(|p| &self.g.node[p])
    }

    /// How many times `name` is read (a graph output counts as one read).
    pub fn uses(&self, name: &str) -> usize {
        self.ix.uses(name)
    }

    /// Initializer `t` with its values: see [`Cache::settled`].
    pub fn settled(&self, t: &TensorProto) -> Option<TensorProto> {
        self.cache.settled(t)
    }

    /// Initializer `name` as stored (its bytes, type and shape), when it is a float tensor of rank
    /// 3 or more the rewrite has not written, whose bytes are all there; else `None` (its values
    /// are read).
    pub fn stored_weight(&self, name: &str) -> Option<(Bytes, FloatType, Vec<usize>)> {
        if self.consts.exact.contains_key(name) || !self.ix.initializer.contains_key(name) {
            return None;
        }
        let t = self.ix.constant(self.g, name)?;
        let ft = FloatType::from_onnx(t.data_type.unwrap_or(0))?;
        let n = checked_numel(&t.dims).ok()?;
        let raw = self.model.raw_bytes(t).ok()??;
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        (n.checked_mul(ft.size()) == Some(raw.len()) && dims.len() >= 3).then_some((raw, ft, dims))
    }

    /// A generator of fresh names for one patch.
    pub fn names(&self) -> Names<'a> {
        Names::new(&self.cache.names)
    }

    /// Concrete shape of a tensor at the shapes the model runs at: its declared shape (a hint:
    /// symbolic dims take the values the graph fixes, see [`crate::tract::shapes`]), else
    /// tract's analysis of the whole model (done once).
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let (g, holes) = (self.g, &self.cache.holes);
        let declared = {
            let mut declared = self.cache.declared.borrow_mut();
            let declared = declared.get_or_insert_with(|| declared_shapes(g, &self.cache.given));
            // (a dropped value info is no longer the tensor's; the graph inputs' never drop)
            declared.get(name).filter(|_| !holes.value_info(name)).cloned().flatten()
        };
        if let Some(d) = declared {
            let symbols = self.symbols_if_cheap();
            let resolved: Option<Vec<usize>> = d
                .iter()
                .map(|d| match d {
                    Dim::Value(v) => Some(*v),
                    Dim::Symbol(s) => match &symbols {
                        Some(m) => s.as_ref().and_then(|s| m.get(s).copied()),
                        None => None,
                    },
                })
                .collect();
            if resolved.is_some() {
                return resolved;
            }
            if d.iter().any(|d| matches!(d, Dim::Symbol(Some(_)))) {
                let facts = self.facts();
                let by_name: Option<Vec<usize>> = d
                    .iter()
                    .map(|d| match d {
                        Dim::Value(v) => Some(*v),
                        Dim::Symbol(s) => s.as_ref().and_then(|s| facts.symbols.get(s)).map(|v| v.value),
                    })
                    .collect();
                if let Some(v) = by_name {
                    return Some(v);
                }
            }
        }
        self.facts().shapes.get(name).cloned()
    }

    /// The spatial size (axes 2 and after) of tensor `name` when it is the only one the model
    /// runs at: its shape ([`Cx::shape_of`]) when no graph input has a symbolic dim left free,
    /// or when tract's analysis with the free ones as symbols finds those dims fixed. `None`
    /// otherwise: symbolic spatial dims (the model runs at any size), or not known.
    pub fn fixed_spatial(&self, name: &str) -> Option<Vec<usize>> {
        let shape = self.shape_of(name).filter(|s| s.len() >= 3)?;
        let spatial = shape[2..].to_vec();
        if self.inputs_declared_fixed() {
            return Some(spatial);
        }
        let facts = self.facts();
        let fixed = match &facts.free {
            Free::Nothing => true,
            Free::Dims(m) => m
                .get(name)
                .is_some_and(|d| d.len() == shape.len() && d[2..].iter().zip(&spatial).all(|(a, b)| *a == Some(*b))),
            Free::Unknown => false,
        };
        fixed.then_some(spatial)
    }

    /// Whether every graph input (initializers aside) has a declared or given shape of numbers.
    fn inputs_declared_fixed(&self) -> bool {
        let g = self.g;
        let mut declared = self.cache.declared.borrow_mut();
        let declared = declared.get_or_insert_with(|| declared_shapes(g, &self.cache.given));
        g.input.iter().filter(|v| !self.ix.initializer.contains_key(v.name())).all(|v| {
            declared
                .get(v.name())
                .is_some_and(|d| d.as_ref().is_some_and(|d| d.iter().all(|d| matches!(d, Dim::Value(_)))))
        })
    }

    /// The values of the graph inputs' symbolic dims, by name, when they are known without
    /// analysing the model: from the analysis if it was done, else when no Reshape could fix one
    /// (then each is 1); `None` otherwise.
    fn symbols_if_cheap(&self) -> Option<HashMap<String, usize>> {
        if let Some(f) = self.cache.facts.borrow().as_ref() {
            return Some(f.symbols.iter().map(|(k, v)| (k.clone(), v.value)).collect());
        }
        // (a Reshape to a constant shape with a -1 fixes nothing; one to a computed shape may)
        let fixing = self.g.node.iter().any(|n| {
            is_op(n, "Reshape") && n.input.get(1).is_some_and(|t| self.consts.i64(t).map_or(true, |v| !v.contains(&-1)))
        });
        if fixing {
            return None;
        }
        let g = self.g;
        let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
        let mut m = HashMap::new();
        for v in g.input.iter().filter(|v| !inits.contains(v.name())) {
            if self.cache.given.iter().any(|(n, _)| n == v.name()) {
                continue;
            }
            for d in crate::graph::declared_dim_names(v).into_iter().flatten() {
                if let Err(name) = d {
                    m.insert(name, 1);
                }
            }
        }
        Some(m)
    }

    /// tract's analysis of the model as it is now (done once).
    pub fn facts(&self) -> std::cell::Ref<'_, ShapeFacts> {
        if self.cache.facts.borrow().is_none() {
            let holes = &self.cache.holes;
            let f = if holes.is_empty() && !self.cache.unsettled() {
                crate::tract::shapes::analyse(self.model, &self.cache.given)
            } else {
                let mut m = self.model.clone();
                Holes::compacted(holes, m.graph_mut());
                for t in &mut m.graph_mut().initializer {
                    if let Some(s) = self.cache.settled(t) {
                        *t = s;
                    }
                }
                crate::tract::shapes::analyse(&m, &self.cache.given)
            };
            *self.cache.facts.borrow_mut() = Some(f);
        }
        std::cell::Ref::map(self.cache.facts.borrow(), |f| f.as_ref().expect("computed"))
    }
}

/// The shapes the graph declares (value infos, then graph inputs; given input shapes first).
fn declared_shapes(g: &GraphProto, given: &[(String, Vec<usize>)]) -> HashMap<String, Option<Vec<Dim>>> {
    let mut m = HashMap::new();
    for (name, s) in given {
        m.insert(name.clone(), Some(s.iter().map(|&v| Dim::Value(v)).collect()));
    }
    for v in g.value_info.iter().chain(&g.input) {
        let dims = crate::graph::declared_dim_names(v).map(|d| {
            d.into_iter()
                .map(|d| match d {
                    Ok(v) => Dim::Value(v),
                    Err(name) => Dim::Symbol(Some(name).filter(|n| !n.is_empty())),
                })
                .collect()
        });
        m.entry(v.name().to_string()).or_insert(dims);
    }
    m
}

/// Run `rules` to a fixed point. Returns what fired and the refusals still standing.
pub(crate) fn run(
    model: &mut Model,
    rules: &[&dyn Try],
    given: &[(String, Vec<usize>)],
) -> (Vec<Rewrite>, Vec<Refusal>) {
    let mut cache = Cache::with_inputs(model.graph(), given.to_vec());
    let mut log = Vec::new();
    // Scan the nodes in order; after a patch, go on from the node it inserted. Repeat whole
    // scans until one makes no change. A patch updates the index for the nodes it touched and
    // leaves the slots it emptied in place (see `Holes`); they are compacted between scans.
    // The refusals of the last scan (the one that changed nothing) are those that stand.
    let mut refusals = Vec::new();
    let mut changed = true;
    // every rewrite removes nodes or merges weights, so a model takes a few rewrites per node at
    // most; past this bound a rule would be rewriting what it rewrote (a bug): stop there, with a
    // model that is still valid and equivalent
    let budget = 64 + 8 * model.graph().node.len();
    while changed && log.len() < budget {
        changed = false;
        refusals.clear();
        let mut i = 0;
        cache.holes.compact(model.graph_mut());
        cache.forget_declared();
        let mut ix = GraphIndex::new(model.graph());
        while i < model.graph().node.len() && log.len() < budget {
            if cache.holes.node(i) {
                i += 1;
                continue;
            }
            let fired = {
                let cx = Cx::new(model, &ix, &cache);
                let mut fired = None;
                for rule in rules {
                    match rule.try_at(&cx, i) {
                        Step::Nothing => {}
                        Step::Refused(r) => refusals.extend(r),
                        Step::Fired(p, r) => {
                            refusals.extend(r);
                            fired = Some(p);
                            break;
                        }
                    }
                }
                fired
            };
            let Some(p) = fired else {
                i += 1;
                cache.evict_before(model.graph(), &ix, i);
                continue;
            };
            changed = true;
            // go on from the first node the patch wrote (inserted, or replaced in place)
            let first_out = p
                .insert
                .first()
                .or_else(|| p.replace.iter().min_by_key(|r| r.0).map(|r| &r.1))
                .and_then(|n| n.output.first())
                .cloned();
            for n in p.insert.iter().chain(p.replace.iter().map(|r| &r.1)) {
                cache.names.extend(n.input.iter().chain(&n.output).cloned());
            }
            cache.names.extend(p.initializers.iter().map(|t| t.0.clone()));
            log.push(p.log.clone());
            debug_assert!(log.len() < budget, "rules keep rewriting: {:?}", log.last());
            let held: Vec<String> =
                p.initializers.iter().filter(|(_, e, _)| !e.deferred()).map(|(n, _, _)| n.clone()).collect();
            if p.apply(model, &mut ix, &mut cache.exact, &mut cache.holes) {
                cache.forget_declared();
            }
            cache.held.extend(held);
            if cfg!(debug_assertions) {
                let fresh = GraphIndex::new(model.graph());
                assert_eq!(ix, fresh, "rewrite {:?}: the index kept across patches is not the graph's", log.last());
                let mut g = model.graph().clone();
                cache.holes.compacted(&mut g);
                if let Err(e) = GraphIndex::new(&g).validate(&g) {
                    panic!("rewrite {:?} broke the graph: {e}", log.last());
                }
            }
            i = first_out.and_then(|o| ix.producer.get(&o).map(|&(n, _)| n)).unwrap_or(0);
        }
    }
    cache.holes.compact(model.graph_mut());
    settle(model, &mut cache);
    (log, refusals)
}

/// Test helper: run `f` on a context of `b`'s model, at the node named `name`.
#[cfg(test)]
pub(crate) fn at_node<T>(b: &crate::support::Builder, name: &str, f: impl FnOnce(&Cx, usize) -> T) -> T {
    let m = b.build();
    let (ix, cache) = (GraphIndex::new(m.graph()), Cache::new(m.graph()));
    let at = m.graph().node.iter().position(|n| n.name() == name).expect("a node of that name");
    f(&Cx::new(&m, &ix, &cache), at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::{Checked, Patch, Reason, Rule, RuleId};

    /// A toy rule: an `Identity` node is dropped, its readers read its input (refused when its
    /// output is a graph output).
    struct DropIdentity;

    impl Rule for DropIdentity {
        type Candidate = usize;
        type Plan = ();
        const ID: RuleId = RuleId("drop_identity");
        fn find(&self, cx: &Cx, at: usize) -> Option<usize> {
            crate::graph::is_op(cx.node(at), "Identity").then_some(at)
        }
        fn check(&self, cx: &Cx, &at: &usize) -> Checked<()> {
            if cx.ix.outputs.contains(&cx.node(at).output[0]) {
                return Checked::refuse(Reason::NoConv);
            }
            Checked::Fits(())
        }
        fn rewrite(&self, cx: &Cx, at: usize, _: ()) -> Patch {
            let n = cx.node(at);
            let (from, to) = (&n.output[0], &n.input[0]);
            let mut remove = vec![at];
            let mut insert = Vec::new();
            for &c in cx.ix.consumers_of(from) {
                let mut reader = cx.node(c).clone();
                for i in reader.input.iter_mut().filter(|i| *i == from) {
                    *i = to.clone();
                }
                remove.push(c);
                insert.push(reader);
            }
            let log = Rewrite { rule: Self::ID, node: n.name().to_string(), detail: "dropped".into(), weights: vec![] };
            Patch { at, remove, insert, replace: vec![], initializers: vec![], log }
        }
        fn node(&self, cx: &Cx, &at: &usize) -> String {
            cx.node(at).name().to_string()
        }
    }

    fn node(op: &str, name: &str, i: &str, o: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: vec![i.into()],
            output: vec![o.into()],
            ..Default::default()
        }
    }

    fn model(nodes: Vec<NodeProto>, output: &str) -> Model {
        use crate::proto::{ModelProto, OperatorSetIdProto, ValueInfoProto};
        let vi = |n: &str| ValueInfoProto { name: Some(n.into()), ..Default::default() };
        let g = GraphProto { node: nodes, input: vec![vi("x")], output: vec![vi(output)], ..Default::default() };
        let opset = OperatorSetIdProto { version: Some(17), ..Default::default() };
        Model::from_proto(ModelProto {
            graph: Some(g),
            ir_version: Some(8),
            opset_import: vec![opset],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn a_toy_rule_plugs_into_the_driver() {
        let mut m =
            model(vec![node("Relu", "r", "x", "a"), node("Identity", "id", "a", "b"), node("Neg", "n", "b", "y")], "y");
        let (log, refused) = run(&mut m, &[&DropIdentity], &[]);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].rule, "drop_identity");
        assert!(refused.is_empty());
        let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Relu", "Neg"]);
        assert_eq!(m.graph().node[1].input, ["a"]);
    }

    #[test]
    fn a_refused_candidate_stays_and_is_reported_once() {
        let mut m = model(vec![node("Relu", "r", "x", "a"), node("Identity", "id", "a", "y")], "y");
        let before = m.proto.clone();
        let (log, refused) = run(&mut m, &[&DropIdentity], &[]);
        assert!(log.is_empty());
        assert_eq!(refused.len(), 1);
        assert_eq!((refused[0].rule, refused[0].node.as_str()), (RuleId("drop_identity"), "id"));
        assert_eq!(m.proto, before);
    }

    /// x → t1 → t2 → t3 → t4 → y through five Relus (a, b, c, d, e).
    fn relu_chain() -> Model {
        model(
            vec![
                node("Relu", "a", "x", "t1"),
                node("Relu", "b", "t1", "t2"),
                node("Relu", "c", "t2", "t3"),
                node("Relu", "d", "t3", "t4"),
                node("Relu", "e", "t4", "y"),
            ],
            "y",
        )
    }

    #[test]
    fn exact_values_are_evicted_once_the_scan_passed_their_readers() {
        let m = relu_chain();
        let ix = GraphIndex::new(m.graph());
        let mut cache = Cache::new(m.graph());
        cache.exact.insert("t1".into(), ndarray::ArrayD::zeros(ndarray::IxDyn(&[1])).into());
        cache.held.insert("t1".into());
        // t1 is read by b (1), whose output is read by c (2), then d (3): kept until node 3 is passed
        cache.evict_before(m.graph(), &ix, 3);
        assert!(cache.exact.contains_key("t1"));
        cache.evict_before(m.graph(), &ix, 4);
        assert!(cache.exact.is_empty());
    }

    /// A sum whose bytes are written is held and dropped past its readers like an f64 array;
    /// deferred entries — a scaled stored weight, a sum not yet computed — stay until the
    /// rewrite ends (the graph has no bytes for them before), and eviction leaves them alone.
    #[test]
    fn written_sums_are_evicted_and_deferred_values_stay() {
        use crate::model::tensor::{Scaled, Summed};
        let m = relu_chain();
        let ix = GraphIndex::new(m.graph());
        let mut cache = Cache::new(m.graph());
        let scaled = Scaled::new(bytes::Bytes::from(vec![0u8; 8]), FloatType::F32, vec![1, 2, 1], vec![2.0]).unwrap();
        let unwritten = Summed::new(scaled.clone(), vec![], vec![]).unwrap();
        let mut written = unwritten.clone();
        written.write(FloatType::F32, |_| ());
        let entries = [("t1", Exact::Summed(written)), ("t2", Exact::Summed(unwritten)), ("t3", Exact::Scaled(scaled))];
        for (name, e) in entries {
            if !e.deferred() {
                cache.held.insert(name.into());
            }
            cache.exact.insert(name.into(), e);
        }
        assert_eq!(cache.held, HashSet::from(["t1".to_string()]));
        cache.evict_before(m.graph(), &ix, 4);
        let mut left: Vec<&String> = cache.exact.keys().collect();
        left.sort();
        assert_eq!(left, ["t2", "t3"]);
        assert!(cache.held.is_empty());
    }

    /// Past three steps, the sums (and scales) a block's branches meet in keep a kernel's exact
    /// values: the root of a long sum may still merge it; anything else ends the look-ahead.
    #[test]
    fn exact_values_are_kept_until_the_scan_passed_the_root_of_their_sum() {
        let add = |name: &str, a: &str, o: &str| NodeProto {
            op_type: Some("Add".into()),
            name: Some(name.into()),
            input: vec![a.into(), "x".into()],
            output: vec![o.into()],
            ..Default::default()
        };
        let m = model(
            vec![
                node("Relu", "a", "x", "t1"),
                node("Relu", "b", "t1", "t2"),
                add("s1", "t2", "u1"),
                add("s2", "u1", "u2"),
                add("s3", "u2", "u3"),
                add("s4", "u3", "u4"),
                node("Relu", "r", "u4", "v"),
                add("s5", "v", "y"),
            ],
            "y",
        );
        let ix = GraphIndex::new(m.graph());
        let mut cache = Cache::new(m.graph());
        cache.exact.insert("t1".into(), ndarray::ArrayD::zeros(ndarray::IxDyn(&[1])).into());
        cache.held.insert("t1".into());
        // t1 is read by b (1); then s1 (2), s2 (3) and on through the sums to s4 (5); the Relu
        // (6) ends them, and the Add after it (7) is not looked at
        cache.evict_before(m.graph(), &ix, 5);
        assert!(cache.exact.contains_key("t1"));
        cache.evict_before(m.graph(), &ix, 6);
        assert!(cache.exact.is_empty());
    }

    /// A rule that rewrites an Identity into the same Identity, for ever.
    struct Again;

    impl Rule for Again {
        type Candidate = usize;
        type Plan = ();
        const ID: RuleId = RuleId("again");
        fn find(&self, cx: &Cx, at: usize) -> Option<usize> {
            crate::graph::is_op(cx.node(at), "Identity").then_some(at)
        }
        fn check(&self, _: &Cx, _: &usize) -> Checked<()> {
            Checked::Fits(())
        }
        fn rewrite(&self, cx: &Cx, at: usize, _: ()) -> Patch {
            let log = Rewrite {
                rule: Self::ID,
                node: cx.node(at).name().to_string(),
                detail: String::new(),
                weights: vec![],
            };
            Patch {
                at,
                remove: vec![at],
                insert: vec![cx.node(at).clone()],
                replace: vec![],
                initializers: vec![],
                log,
            }
        }
        fn node(&self, cx: &Cx, &at: &usize) -> String {
            cx.node(at).name().to_string()
        }
    }

    /// A rule that keeps rewriting (a bug) cannot hang the driver (debug builds stop on it).
    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "rules keep rewriting"))]
    fn a_rule_that_keeps_rewriting_is_stopped() {
        let mut m = model(vec![node("Identity", "id", "x", "y")], "y");
        let (log, _) = run(&mut m, &[&Again], &[]);
        assert_eq!(log.len(), 64 + 8);
        assert_eq!(m.graph().node.len(), 1);
    }
}
