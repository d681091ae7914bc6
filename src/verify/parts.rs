//! The check of two models cut at the nodes tract cannot run (see [Cuts](super#cuts)): every
//! part between the cuts checked as a model of its own ([`super::check`]), on the graph inputs
//! it reads and random values for its cut tensors, the same for both models.

use super::check::{batch_axis, check, check_signature, Checked, Progress};
use super::cut::{build, plan, same_slices, slice, From, Plan};
use super::inputs::{draw_inputs, sample, Drawn, ResolvedInput};
use super::prepared::Prepared;
use super::report::{CutNode, OutputReport, PartReport, VerifyReport};
use super::VerifyOptions;
use crate::error::Error;
use crate::model::Model;
use crate::proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto};
use crate::tract::{declared_signature, infer_inputs, is_float, DeclDim, InputFact, PartialFact, Why};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tract_onnx::prelude::{DatumType, Tensor};

/// The nodes to cut at, in each model (by index in its graph), and why.
#[derive(Clone, Debug, Default)]
pub(crate) struct Unrunnable {
    pub r: Vec<(usize, Why)>,
    pub c: Vec<(usize, Why)>,
}

impl Unrunnable {
    pub fn is_empty(&self) -> bool {
        self.r.is_empty() && self.c.is_empty()
    }

    /// Add the node tract refused (`node`: its name, or its first output) where either model
    /// has it; `false` when neither has it or it is cut already.
    pub fn add_refused(&mut self, r: &Model, c: &Model, node: &str, msg: &str) -> bool {
        let find = |m: &Model| {
            let g = m.graph();
            g.node.iter().position(|n| n.name() == node).or_else(|| {
                g.node.iter().position(|n| n.name().is_empty() && n.output.first().is_some_and(|o| o == node))
            })
        };
        let mut added = false;
        for (m, list) in [(r, &mut self.r), (c, &mut self.c)] {
            if let Some(i) = find(m) {
                if !list.iter().any(|(j, _)| *j == i) {
                    // (tract's own words, after the node it names)
                    let why = msg.split_once("): ").map_or(msg, |(_, m)| m);
                    list.push((i, Why::Typing(why.to_string())));
                    list.sort_by_key(|(j, _)| *j);
                    added = true;
                }
            }
        }
        added
    }
}

/// The random values of a part's cut tensors come from a generator seeded with the check's seed
/// and the part's number: drawn sample after sample, in the part's input order.
fn cut_seed(seed: u64, part: usize) -> u64 {
    seed ^ 0x6375_745f_7061_7274 ^ (part as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What a model declares about a tensor (graph output, value_info or graph input).
fn declaration<'m>(m: &'m Model, name: &str) -> Option<&'m ValueInfoProto> {
    let g = m.graph();
    g.value_info.iter().chain(&g.output).chain(&g.input).find(|v| v.name() == name)
}

/// An ONNX element type as tract's (the types a check can draw).
fn datum(elem: i32) -> Option<DatumType> {
    use crate::proto::tensor_proto::DataType as D;
    Some(match D::try_from(elem).ok()? {
        D::Float => DatumType::F32,
        D::Double => DatumType::F64,
        D::Float16 => DatumType::F16,
        D::Int8 => DatumType::I8,
        D::Int16 => DatumType::I16,
        D::Int32 => DatumType::I32,
        D::Int64 => DatumType::I64,
        D::Uint8 => DatumType::U8,
        D::Uint16 => DatumType::U16,
        D::Uint32 => DatumType::U32,
        D::Uint64 => DatumType::U64,
        D::Bool => DatumType::Bool,
        _ => return None,
    })
}

/// A cut tensor's type and dims as declared (by the reference, else the candidate), a symbolic
/// dim resolved when it is named like a symbolic dim of a graph input (the value chosen for
/// that); the symbols left unresolved.
fn declared_fact(
    name: &str,
    r: &Model,
    c: &Model,
    symbols: &HashMap<String, usize>,
) -> (PartialFact, Vec<(usize, String)>) {
    let mut unresolved = vec![];
    let decl = declaration(r, name).or_else(|| declaration(c, name));
    let tensor = decl.and_then(|v| match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t),
        _ => None,
    });
    let dt = tensor.and_then(|t| t.elem_type).and_then(datum);
    let dims = tensor.and_then(|t| t.shape.as_ref()).map(|s| {
        s.dim
            .iter()
            .enumerate()
            .map(|(k, d)| match &d.value {
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => Some(*v as usize),
                Some(tensor_shape_proto::dimension::Value::DimParam(p)) => {
                    let v = symbols.get(p).copied();
                    if v.is_none() {
                        unresolved.push((k, p.clone()));
                    }
                    v
                }
                _ => None,
            })
            .collect()
    });
    (PartialFact { name: name.to_string(), dt, dims }, unresolved)
}

/// A graph input's declaration for a part: the tensor as known, unknown dims without a value
/// (a type is needed to read the file: float32 where it is not known; the check pins the real
/// one).
fn value_info(f: &PartialFact) -> ValueInfoProto {
    use crate::proto::tensor_proto::DataType as D;
    let elem = match f.dt {
        Some(DatumType::F64) => D::Double,
        Some(DatumType::F16) => D::Float16,
        Some(DatumType::I8) => D::Int8,
        Some(DatumType::I16) => D::Int16,
        Some(DatumType::I32) => D::Int32,
        Some(DatumType::I64) => D::Int64,
        Some(DatumType::U8) => D::Uint8,
        Some(DatumType::U16) => D::Uint16,
        Some(DatumType::U32) => D::Uint32,
        Some(DatumType::U64) => D::Uint64,
        Some(DatumType::Bool) => D::Bool,
        _ => D::Float,
    };
    let shape = f.dims.as_ref().map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: d.map(|v| tensor_shape_proto::dimension::Value::DimValue(v as i64)),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(f.name.clone()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem as i32), shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a part's cut tensor comes from, as the report says it.
fn origin(p: &Plan, r: &Model, from: From) -> String {
    match from {
        From::Cut(k) => {
            let n = &r.graph().node[p.cuts[k].r];
            format!("written by {} '{}'", n.op_type(), n.name())
        }
        From::Part(j) => format!("computed by part {j}"),
    }
}

/// The check of `r` against `c` cut at the nodes in `cut` (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn verify_cut(
    r: &Prepared,
    c: &Prepared,
    cut: &Unrunnable,
    reference: &Path,
    candidate: &Path,
    upcast: bool,
    opts: &VerifyOptions,
    mut notes: Vec<String>,
    progress: &Progress,
) -> Result<VerifyReport, Error> {
    let p = plan(&r.model, &c.model, &cut.r, &cut.c);
    let cut_names = || {
        p.cuts.iter().map(|k| format!("{} '{}'", r.model.graph().node[k.r].op_type(), r.model.graph().node[k.r].name()))
    };
    for (flag, given) in
        [("--load-outputs", opts.load_outputs.is_some()), ("--save-outputs", opts.save_outputs.is_some())]
    {
        if given {
            return Err(Error::Usage(format!(
                "{flag} compares whole models, and {} holds nodes tract cannot run ({}): it is checked in parts",
                reference.display(),
                cut_names().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    notes.extend(p.notes.iter().cloned());
    // the graph inputs, as the whole check resolves and draws them
    let rsig = declared_signature(&r.model, &r.shown)?;
    let csig = declared_signature(&c.model, &c.shown)?;
    check_signature(&rsig, &csig)?;
    let Drawn { inputs, data, .. } = draw_inputs(r, &rsig, &csig, opts, &mut notes)?;
    // the value chosen for every symbolic dim of a graph input
    let mut symbols: HashMap<String, usize> = HashMap::new();
    for i in &inputs {
        for sig in [&rsig, &csig] {
            if let (_, Some(dims)) = sig.input_decl(&i.name) {
                for (d, v) in dims.iter().zip(&i.shape) {
                    if let DeclDim::Symbol(s) = d {
                        symbols.entry(s.clone()).or_insert(*v);
                    }
                }
            }
        }
    }
    progress.say(true, || format!("cut into {} part(s) at {} node(s) tract cannot run", p.parts.len(), p.cuts.len()));
    let r_cut: HashSet<usize> = p.cuts.iter().map(|k| k.r).collect();
    let mut c_cut: HashSet<usize> = p.cuts.iter().filter_map(|k| k.c).collect();
    c_cut.extend(&p.candidate_only);
    // the type and shape of every tensor a part computed (the reference's, first sample)
    let mut computed: HashMap<String, (DatumType, Vec<usize>)> = HashMap::new();
    let mut outputs: Vec<OutputReport> = vec![];
    let mut reports: Vec<PartReport> = vec![];
    for (k, spec) in p.parts.iter().enumerate() {
        let mut report = PartReport {
            index: k,
            inputs: vec![],
            outputs: spec.outputs.clone(),
            nodes: 0,
            candidate_nodes: 0,
            checked: false,
            identical: None,
            passed: None,
            worst_output: None,
            ratio: None,
            max_abs_diff: None,
            divergence: None,
            problem: None,
        };
        let rs = slice(&r.model, &spec.inputs, &spec.outputs, &r_cut)
            .map_err(|e| Error::Internal(format!("{}: part {k} of the reference: {e}", reference.display())))?;
        report.nodes = rs.nodes.len();
        let cs = match slice(&c.model, &spec.inputs, &spec.outputs, &c_cut) {
            Ok(s) => s,
            Err(why) => {
                report.passed = Some(false);
                report.problem = Some(format!("the candidate does not compute this part's outputs so: {why}"));
                reports.push(report);
                continue;
            }
        };
        report.candidate_nodes = cs.nodes.len();
        // graph inputs either model's part reads, then the cut tensors
        let mut graph_inputs: Vec<String> = spec.inputs.iter().filter(|n| rsig.inputs.contains(n)).cloned().collect();
        for n in rs.graph_inputs.iter().chain(&cs.graph_inputs) {
            if !graph_inputs.contains(n) {
                graph_inputs.push(n.clone());
            }
        }
        graph_inputs.sort_by_key(|n| rsig.inputs.iter().position(|i| i == n));
        let mut facts: Vec<PartialFact> = vec![];
        let mut unresolved: HashMap<String, Vec<(usize, String)>> = HashMap::new();
        for (name, from) in &spec.cut {
            let known = match from {
                From::Part(_) => computed.get(name).map(|(dt, shape)| PartialFact {
                    name: name.clone(),
                    dt: Some(*dt),
                    dims: Some(shape.iter().map(|&d| Some(d)).collect()),
                }),
                From::Cut(_) => None,
            };
            let f = known.unwrap_or_else(|| {
                let (f, u) = declared_fact(name, &r.model, &c.model, &symbols);
                unresolved.insert(name.clone(), u);
                f
            });
            facts.push(f);
        }
        let declare = |m: &Model| -> Vec<ValueInfoProto> {
            let own = |n: &String| m.graph().input.iter().find(|v| v.name() == n).cloned();
            let mut v: Vec<ValueInfoProto> = graph_inputs.iter().filter_map(own).collect();
            v.extend(facts.iter().map(value_info));
            v
        };
        let mut pr = Prepared::part(build(&r.model, &rs, &declare(&r.model), &spec.outputs), r)?;
        let mut pc = Prepared::part(build(&c.model, &cs, &declare(&c.model), &spec.outputs), c)?;
        // what the graph fixes of the cut tensors not wholly known: tract's analysis of the part
        if facts.iter().any(|f| f.concrete().is_none()) {
            let mut known: Vec<PartialFact> = inputs
                .iter()
                .filter(|i| graph_inputs.contains(&i.name))
                .map(|i| PartialFact {
                    name: i.name.clone(),
                    dt: Some(i.dt),
                    dims: Some(i.shape.iter().map(|&d| Some(d)).collect()),
                })
                .collect();
            known.extend(facts.iter().cloned());
            let inferred = infer_inputs(pr.tract()?, &known);
            for f in &mut facts {
                if let Some(g) = inferred.iter().find(|g| g.name == f.name) {
                    *f = g.clone();
                }
            }
        }
        let cut_inputs: Vec<(&PartialFact, &From)> = facts.iter().zip(spec.cut.iter().map(|(_, f)| f)).collect();
        let missing: Vec<String> = cut_inputs
            .iter()
            .filter(|(f, _)| f.concrete().is_none())
            .map(|(f, from)| {
                unknown_why(
                    f,
                    unresolved.get(&f.name).map(|v| v.as_slice()).unwrap_or(&[]),
                    &origin(&p, &r.model, **from),
                )
            })
            .collect();
        let mut part_inputs: Vec<ResolvedInput> =
            inputs.iter().filter(|i| graph_inputs.contains(&i.name)).cloned().collect();
        for (f, from) in &cut_inputs {
            let source = format!(
                "{} (seed {}), cut: {}",
                match f.dt {
                    Some(dt) if is_float(dt) => "random normal",
                    Some(DatumType::Bool) => "random bool",
                    _ => "random integers 0..=3",
                },
                opts.seed,
                origin(&p, &r.model, **from)
            );
            part_inputs.push(ResolvedInput {
                name: f.name.clone(),
                dt: f.dt.unwrap_or(DatumType::F32),
                shape: f.dims.iter().flatten().map(|d| d.unwrap_or(0)).collect(),
                data: None,
                source,
                stored: r.half.get(&f.name).copied(),
            });
        }
        report.inputs = part_inputs.iter().map(|i| i.spec()).collect();
        if !missing.is_empty() {
            report.problem = Some(format!("{}: declare it in value_info", missing.join("; ")));
            report.identical = Some(same_slices(&r.model, &rs, &c.model, &cs));
            reports.push(report);
            continue;
        }
        // the part's samples: the graph inputs' values, and fresh ones for its cut tensors
        let mut cut_rng = StdRng::seed_from_u64(cut_seed(opts.seed, k));
        let cut_only: Vec<ResolvedInput> =
            part_inputs.iter().filter(|i| spec.cut.iter().any(|(n, _)| *n == i.name)).cloned().collect();
        let mut part_data = vec![];
        for d in &data {
            let mut s: HashMap<String, Tensor> = graph_inputs.iter().map(|n| (n.clone(), d[n].clone())).collect();
            s.extend(sample(&cut_only, &mut cut_rng)?);
            part_data.push(s);
        }
        let part_facts: Vec<InputFact> = part_inputs.iter().map(|i| i.fact()).collect();
        let stack = {
            let (a, b) = (pr.signature()?, pc.signature()?);
            batch_axis(&a) && batch_axis(&b)
        };
        progress.say(true, || format!("part {k}: {} node(s)", report.nodes));
        let Checked { outputs: outs, divergence, first } =
            check(&mut pr, &mut pc, &part_facts, &part_data, stack, false, opts, &mut notes, progress)?;
        for (name, t) in first {
            computed.insert(name, (t.datum_type(), t.shape().to_vec()));
        }
        report.checked = true;
        report.passed = Some(outs.iter().all(|o| o.passed));
        let worst = outs.iter().max_by(|a, b| {
            let key = |o: &OutputReport| o.ratio.unwrap_or(o.max_abs_diff);
            key(a).total_cmp(&key(b))
        });
        report.worst_output = worst.map(|o| o.name.clone());
        report.ratio = worst.and_then(|o| o.ratio);
        report.max_abs_diff = outs.iter().map(|o| o.max_abs_diff).reduce(f64::max);
        report.divergence = divergence;
        outputs.extend(outs.into_iter().map(|o| OutputReport { part: Some(k), ..o }));
        reports.push(report);
    }
    let cuts: Vec<CutNode> = p
        .cuts
        .iter()
        .map(|k| {
            let n = &r.model.graph().node[k.r];
            CutNode {
                node: n.name().to_string(),
                op: n.op_type().to_string(),
                domain: n.domain().to_string(),
                why: match k.c.filter(|_| k.in_candidate) {
                    Some(j) => {
                        let b = &c.model.graph().node[j];
                        format!("in the candidate, {} '{}': {}", b.op_type(), b.name(), k.why)
                    }
                    None => k.why.to_string(),
                },
                inputs: n.input.clone(),
                outputs: n.output.clone(),
                problem: k.problem.clone(),
            }
        })
        .collect();
    let mut report = VerifyReport {
        passed: false,
        criterion: opts.criterion.to_string(),
        noise_factor: opts.noise_factor,
        stat: opts.stat.to_string(),
        atol: opts.atol,
        rtol: opts.rtol,
        evaluation: if upcast { "float32 upcast".into() } else { "native".into() },
        golden: None,
        divergence: reports.iter().find_map(|p| p.divergence.clone()),
        samples: data.len(),
        seed: opts.seed,
        inputs: inputs.iter().map(|i| i.spec()).collect(),
        outputs,
        notes: vec![],
        reference: reference.display().to_string(),
        candidate: candidate.display().to_string(),
        checked: true,
        cuts: Some(cuts),
        parts: Some(reports),
    };
    let unchecked = report.unchecked();
    report.checked = unchecked.is_empty();
    report.passed = !report.failed() && (report.checked || opts.allow_unchecked);
    if !report.checked && opts.allow_unchecked {
        notes.push(format!("accepted without a check (--allow-unchecked): {}", unchecked.join("; ")));
    }
    let mut seen = HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    report.notes = notes;
    Ok(report)
}

/// Why a cut tensor's type or shape is not known, said so.
fn unknown_why(f: &PartialFact, unresolved: &[(usize, String)], origin: &str) -> String {
    let name = format!("cut tensor `{}` ({origin})", f.name);
    match (&f.dt, &f.dims) {
        (None, _) => format!("the type of {name} is neither declared nor fixed by the graph"),
        (_, None) => format!("the shape of {name} is neither declared nor fixed by the graph"),
        (Some(_), Some(dims)) => {
            let open: Vec<usize> = dims.iter().enumerate().filter(|(_, d)| d.is_none()).map(|(k, _)| k).collect();
            let named: Vec<String> = open
                .iter()
                .filter_map(|k| unresolved.iter().find(|(i, _)| i == k))
                .map(|(k, s)| format!("dim {k} is `{s}`, named like no dim of a graph input"))
                .collect();
            let list = open.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
            let (dims, are) = if open.len() == 1 { ("dim", "is") } else { ("dims", "are") };
            let named = if named.is_empty() { String::new() } else { format!(" ({})", named.join("; ")) };
            format!("{dims} {list} of {name} {are} neither declared nor fixed by the graph{named}")
        }
    }
}
