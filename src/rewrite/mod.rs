//! The rewrite: rules that replace a re-parameterisable block by the one Conv it equals, run to a
//! fixed point by the [`driver`], with a report of what fired and what was refused and why.
//!
//! # The rule contract
//!
//! A rule ([`Rule`]) is three steps, each with one job:
//! - `find(cx, at)`: is node `at` where this rule's pattern starts? A cheap structural match that
//!   returns the candidate (the nodes involved), or `None`: nothing for this rule here.
//! - `check(cx, candidate)`: read the weights and prove the rewrite exactly equivalent. Returns a
//!   plan (what the rewrite needs: merged kernels in f64) or the [`Reason`]s it cannot be done;
//!   [`Checked::Partly`] when part of the candidate can be done and part cannot.
//! - `rewrite(cx, candidate, plan)`: the graph edit as a [`Patch`] (nodes removed and inserted,
//!   initializers written in f64 and rounded once to their dtype). It never fails.
//!
//! A rule never fires unless the rewrite is exactly equivalent; a refused candidate stays
//! untouched and is reported with its reason. Rules see the graph only through [`Cx`].
//!
//! # Adding a rule
//!
//! One new file in this folder with a unit struct implementing [`Rule`], and one line in the
//! `rules!` list below (the order is the order the driver tries them at each node).

mod affine;
pub(crate) mod driver;
mod patch;
mod reason;
mod sum_tree;
mod weights;

pub use reason::{ChainSum, FcMisfit, Reason, RegionReason};
pub use weights::WeightStats;

pub(crate) use driver::Cx;
pub(crate) use patch::Patch;

use crate::error::{Error, Result};
use crate::graph::{GraphIndex, Label};
use crate::model::tensor::{checked_numel, FloatType};
use crate::model::Model;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// Which rule fired or refused, as reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(&'static str);

impl RuleId {
    pub const FOLD_BN: RuleId = RuleId("fold_bn");
    pub const MERGE_BRANCHES: RuleId = RuleId("merge_branches");
    pub const AFFINE_REGION: RuleId = RuleId("affine_region");
    pub const FOLD_BN_FORWARD: RuleId = RuleId("fold_bn_forward");
    pub const FOLD_BN_LINEAR: RuleId = RuleId("fold_bn_linear");
    pub const MERGE_LINEAR: RuleId = RuleId("merge_linear");
    pub const MERGE_SEQUENTIAL: RuleId = RuleId("merge_sequential");
    pub const FOLD_PAD: RuleId = RuleId("fold_pad");
    pub const FOLD_BN_TRANSPOSED: RuleId = RuleId("fold_bn_transposed");
    pub const MERGE_INTO_FC: RuleId = RuleId("merge_into_fc");
    pub const FOLD_AFFINE: RuleId = RuleId("fold_affine");

    /// Whether the rule folds a BatchNormalization into a layer.
    pub fn folds_bn(self) -> bool {
        matches!(self, RuleId::FOLD_BN | RuleId::FOLD_BN_FORWARD | RuleId::FOLD_BN_LINEAR | RuleId::FOLD_BN_TRANSPOSED)
    }

    /// Whether the rule merges a block (branches, layers in sequence or in parallel) into one.
    pub fn merges_block(self) -> bool {
        matches!(
            self,
            RuleId::MERGE_BRANCHES
                | RuleId::MERGE_SEQUENTIAL
                | RuleId::MERGE_LINEAR
                | RuleId::AFFINE_REGION
                | RuleId::MERGE_INTO_FC
        )
    }

    /// The rule's name in reports (`fold_bn`, ...).
    pub fn name(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl PartialEq<&str> for RuleId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Serialize for RuleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

/// A rewrite rule (see the module docs for the contract).
pub(crate) trait Rule: Sync {
    /// The nodes the pattern matched.
    type Candidate;
    /// What the rewrite needs, computed while proving it exact.
    type Plan;
    const ID: RuleId;
    fn find(&self, cx: &Cx, at: usize) -> Option<Self::Candidate>;
    fn check(&self, cx: &Cx, candidate: &Self::Candidate) -> Checked<Self::Plan>;
    fn rewrite(&self, cx: &Cx, candidate: Self::Candidate, plan: Self::Plan) -> Patch;
    /// The node a refusal of this candidate is reported at.
    fn node(&self, cx: &Cx, candidate: &Self::Candidate) -> String;
}

/// The result of [`Rule::check`].
pub(crate) enum Checked<P> {
    /// The whole candidate can be rewritten.
    Fits(P),
    /// It cannot, for these reasons.
    Refused(Vec<Reason>),
    /// Part of it can (the plan), part of it cannot (the reasons).
    Partly(P, Vec<Reason>),
}

impl<P> Checked<P> {
    /// One reason.
    pub fn refuse(reason: impl Into<Reason>) -> Self {
        Checked::Refused(vec![reason.into()])
    }
}

/// What trying one rule at one node gave.
pub(crate) enum Step {
    /// The pattern is not there.
    Nothing,
    /// The pattern is there but the rewrite cannot be proved.
    Refused(Vec<Refusal>),
    /// The rewrite, and refusals for the parts of the candidate it leaves alone.
    Fired(Patch, Vec<Refusal>),
}

/// A rule as the driver runs it (object safe).
pub(crate) trait Try: Sync {
    fn try_at(&self, cx: &Cx, at: usize) -> Step;
}

impl<R: Rule> Try for R {
    fn try_at(&self, cx: &Cx, at: usize) -> Step {
        let Some(c) = self.find(cx, at) else { return Step::Nothing };
        let refusals = |reasons: Vec<Reason>, node: String| -> Vec<Refusal> {
            reasons.into_iter().map(|reason| Refusal { rule: R::ID, node: node.clone(), reason }).collect()
        };
        let node = self.node(cx, &c);
        let (plan, mut refused) = match self.check(cx, &c) {
            Checked::Fits(plan) => (plan, vec![]),
            Checked::Refused(reasons) => return Step::Refused(refusals(reasons, node)),
            Checked::Partly(plan, reasons) => (plan, refusals(reasons, node.clone())),
        };
        let mut patch = self.rewrite(cx, c, plan);
        // every value written must fit its type; the merged weights' ranges go to the report
        // (one pass over each tensor finds both)
        let mut scans = Vec::with_capacity(patch.initializers.len());
        for (name, a, ft) in &mut patch.initializers {
            let scan = weights::Scan::of_written(a, *ft);
            let (overflow, underflow) = scan.unrepresentable();
            if overflow + underflow > 0 {
                let reason = Reason::NotRepresentable { tensor: name.clone(), dtype: *ft, overflow, underflow };
                refused.push(Refusal { rule: R::ID, node, reason });
                return Step::Refused(refused);
            }
            scans.push(scan);
        }
        let written = patch.insert.iter().chain(patch.replace.iter().map(|r| &r.1));
        for n in written.filter(|n| n.op_type() == "Conv" && n.input.len() > 1) {
            if let Some(k) = patch.initializers.iter().position(|(name, _, _)| *name == n.input[1]) {
                patch.log.weights.push(scans[k].stats(n.label()));
            }
        }
        Step::Fired(patch, refused)
    }
}

/// Declares the rule modules and the list the driver runs, in order: one line per rule.
macro_rules! rules {
    ($($module:ident :: $rule:ident),+ $(,)?) => {
        $(mod $module;)+
        /// Every rule, in the order they are tried at each node.
        pub(crate) const RULES: &[&dyn Try] = &[$(&$module::$rule),+];
    };
}

rules![
    fold_bn::FoldBn,
    fold_bn_transposed::FoldBnTransposed,
    fold_bn_linear::FoldBnLinear,
    fold_pad::FoldPad,
    merge_sequential::MergeSequential,
    merge_branches::MergeBranches,
    merge_linear::MergeLinear,
    affine_region::AffineRegion,
    merge_into_fc::MergeIntoFc,
    fold_bn_forward::FoldBnForward,
    fold_affine::FoldAffine,
];

/// A candidate that was left untouched, and why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Refusal {
    pub rule: RuleId,
    /// The node the candidate was found at (the sum, or the BatchNormalization).
    pub node: String,
    pub reason: Reason,
}

/// A rewrite that fired.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rewrite {
    pub rule: RuleId,
    /// Name of the resulting Conv node.
    pub node: String,
    /// What was merged, e.g. `3 branches (3x3, 3x1, 1x3) + BN`.
    pub detail: String,
    /// The ranges of the weights written (one per Conv the rewrite made).
    pub weights: Vec<WeightStats>,
}

/// Size of a graph: nodes, parameters (elements of float initializers), nodes per operator.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub nodes: usize,
    pub params: usize,
    pub ops: BTreeMap<String, usize>,
}

impl Stats {
    pub fn of(model: &Model) -> Stats {
        let g = model.graph();
        let mut ops = BTreeMap::new();
        for n in &g.node {
            *ops.entry(n.op_type().to_string()).or_insert(0) += 1;
        }
        let params = g
            .initializer
            .iter()
            .filter(|t| FloatType::from_onnx(t.data_type.unwrap_or(0)).is_some())
            .map(|t| checked_numel(&t.dims).unwrap_or(0))
            .sum();
        Stats { nodes: g.node.len(), params, ops }
    }

    /// Nodes of operator `op`.
    pub fn op(&self, op: &str) -> usize {
        self.ops.get(op).copied().unwrap_or(0)
    }
}

/// What `fuse` did.
#[derive(Clone, Debug, Serialize)]
pub struct FuseReport {
    /// Blocks merged into one layer (branches into one Conv, convs in sequence, parallel Gemms).
    pub blocks_merged: usize,
    /// BatchNormalizations folded into a Conv.
    pub bns_folded: usize,
    pub rewrites: Vec<Rewrite>,
    /// Candidates left untouched, with the reason.
    pub refused: Vec<Refusal>,
    pub before: Stats,
    pub after: Stats,
    /// What the user should know about the model as a whole, or about the run (staging folders
    /// of killed runs removed), one line each.
    pub notes: Vec<String>,
    /// Every warning about the merged weights, one line per Conv and problem (the summary puts
    /// those of one kind on one line).
    pub warnings: Vec<String>,
}

impl FuseReport {
    /// A short human-readable summary.
    pub fn summary(&self) -> String {
        let (b, a) = (&self.before, &self.after);
        let mut s = format!(
            "merged {} block(s), folded {} BatchNormalization(s)\nnodes {} -> {}, parameters {} -> {}, Conv {} -> {}, BatchNormalization {} -> {}, Add {} -> {}\n",
            self.blocks_merged,
            self.bns_folded,
            b.nodes,
            a.nodes,
            b.params,
            a.params,
            b.op("Conv"),
            a.op("Conv"),
            b.op("BatchNormalization"),
            a.op("BatchNormalization"),
            b.op("Add"),
            a.op("Add"),
        );
        if self.refused.is_empty() {
            s.push_str("refused: none\n");
        } else {
            s.push_str(&format!("refused {} candidate(s):\n", self.refused.len()));
            for r in &self.refused {
                s.push_str(&format!("  {} at '{}': {}\n", r.rule, r.node, r.reason));
            }
        }
        for w in weights::summarise(self.rewrites.iter().flat_map(|r| &r.weights)) {
            s.push_str(&format!("warning: {w}\n"));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}

/// Check the graph is well formed before any rewrite.
pub fn validate(model: &Model) -> Result<()> {
    let g = model.graph();
    GraphIndex::new(g).validate(g).map_err(|e| match (&model.path, e) {
        (Some(p), Error::Invalid(msg)) => Error::Format { path: p.clone(), msg },
        (_, e) => e,
    })
}

/// Fuse every re-parameterisable block of `model`, in place: every rule runs to a fixed point.
pub fn fuse(model: &mut Model) -> Result<FuseReport> {
    fuse_at(model, &[])
}

/// [`fuse`] for the model run at `input_shapes` (by graph input name; `--input-shape`), where
/// they are given: the shapes the rules and the general path see are those it runs at.
pub fn fuse_at(model: &mut Model, input_shapes: &[(String, Vec<usize>)]) -> Result<FuseReport> {
    validate(model)?;
    let mut notes: Vec<String> = crate::model::transform::training_mode(model).into_iter().collect();
    let frozen_inputs = crate::model::transform::initializer_inputs(model);
    if frozen_inputs > 0 {
        notes.push(format!(
            "{frozen_inputs} initializer(s) are also graph inputs (an export with keep_initializers_as_inputs=True): a runtime may replace them, so no block that reads them is fused; pass --freeze-initializers to treat them as constants"
        ));
    }
    let before = Stats::of(model);
    let (rewrites, refused) = driver::run(model, RULES, input_shapes);
    let after = Stats::of(model);
    Ok(FuseReport {
        notes,
        warnings: rewrites.iter().flat_map(|r| &r.weights).flat_map(|w| w.warnings()).collect(),
        blocks_merged: rewrites.iter().filter(|r| r.rule.merges_block()).count(),
        bns_folded: rewrites.iter().filter(|r| r.rule.folds_bn()).count(),
        rewrites,
        refused,
        before,
        after,
    })
}

/// `conv` with new weight/bias inputs and output.
pub(crate) fn rewired_conv(
    conv: &crate::proto::NodeProto,
    input: &str,
    wname: &str,
    bname: &str,
    output: &str,
) -> crate::proto::NodeProto {
    let mut c = conv.clone();
    c.input = vec![input.to_string(), wname.to_string(), bname.to_string()];
    c.output = vec![output.to_string()];
    c
}

/// The patch of a BatchNormalization folded into the layer before it (a Conv or ConvTranspose
/// at `layer`): one node like the layer, reading its input, writing the BN's output, with the
/// folded weight and bias (under the layer's own names where only it reads them).
pub(crate) fn folded_bn_patch(
    cx: &Cx,
    rule: RuleId,
    layer: usize,
    bn: usize,
    weight: crate::graph::Exact,
    bias: ndarray::ArrayD<f64>,
    ft: crate::model::tensor::FloatType,
) -> Patch {
    let (l, b) = (cx.node(layer), cx.node(bn));
    let (wname, bname) = cx.names().conv_params(cx.ix, l);
    let node = rewired_conv(l, &l.input[0], &wname, &bname, &b.output[0]);
    Patch {
        at: bn,
        remove: vec![layer, bn],
        insert: vec![node],
        replace: vec![],
        initializers: vec![(wname, weight, ft), (bname, bias.into(), ft)],
        log: Rewrite {
            rule,
            node: l.label().to_string(),
            detail: format!("BatchNormalization '{}' folded", b.label()),
            weights: vec![],
        },
    }
}

/// A kernel size as `3x3`.
pub(crate) fn kernel_str(k: &[usize]) -> String {
    k.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}
