//! The check's report: per output, how far the candidate is from the reference; as a text table
//! and as JSON.

use serde::Serialize;
use std::fmt::Write as _;

/// One resolved model input: what was fed, and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputSpec {
    /// Graph input name.
    pub name: String,
    /// Concrete shape fed to both models.
    pub shape: Vec<usize>,
    /// Element type, numpy spelling (`float32`, `int64`, ...).
    pub dtype: String,
    /// `random normal (seed S)`, `random integers 0..=3 (seed S)`, `file <path>`,
    /// `npz <path>[<array>]`.
    pub source: String,
}

/// Comparison of one output, aggregated over all samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputReport {
    /// Graph output name.
    pub name: String,
    /// Shape of the reference output (of the last sample).
    pub shape: Vec<usize>,
    /// Reference output dtype (numpy spelling).
    pub dtype: String,
    /// max |a - b| over all elements and samples (NaN elements excluded).
    pub max_abs_diff: f64,
    /// max |a - b| / max(|a|, [`REL_TINY`](super::compare::REL_TINY)).
    pub max_rel_diff: f64,
    /// Mean over samples of the mean |a - b|.
    pub mean_abs_diff: f64,
    /// Multi-index of the element with the largest |a - b|.
    pub worst_index: Vec<usize>,
    /// Sample (0-based) holding that element.
    pub worst_sample: usize,
    /// Reference and candidate values at the worst element.
    pub worst_reference: f64,
    pub worst_candidate: f64,
    /// max |a| (magnitude of the reference output).
    pub max_abs_reference: f64,
    /// Smallest atol that passes with rtol = 0 (= `max_abs_diff`).
    pub min_atol: f64,
    /// Smallest rtol that passes with the run's atol (0 if atol alone passes; infinite if
    /// some failing element has a zero reference).
    pub min_rtol: f64,
    /// Number of NaN elements in the reference / candidate outputs (all samples).
    pub nan_reference: usize,
    pub nan_candidate: usize,
    /// Number of elements failing `|a - b| <= atol + rtol * |a|` (all samples), non-finite
    /// disagreements included.
    pub failing_elements: usize,
    /// The error statistic (`stat` of |a - b|, the largest over samples).
    pub error: f64,
    /// Noise criterion: how far the reference moves when every weight moves by one rounding
    /// (the statistic, largest over samples and perturbations); null with tolerances.
    pub noise: Option<f64>,
    /// Noise criterion: one rounding of the output's precision at its scale (`unit · max|ref|`),
    /// the least noise assumed.
    pub noise_floor: Option<f64>,
    /// With golden outputs: how far the reference model is from them.
    pub reference_error: Option<f64>,
    /// Noise criterion: `error / max(noise, noise_floor, reference_error)`; passes up to the
    /// report's `noise_factor`.
    pub ratio: Option<f64>,
    /// The tolerances of this output.
    pub atol: f64,
    pub rtol: f64,
    /// Why the output cannot pass whatever the tolerance (non-finite values that disagree, a
    /// shape mismatch), if so.
    pub problem: Option<String>,
    pub passed: bool,
    /// The part it was compared in, when the models were cut (see [`VerifyReport::parts`]).
    pub part: Option<usize>,
}

/// The first tensor, in the candidate's order, that both models compute under the same name and
/// that diverges: where the candidate goes wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Divergence {
    /// The tensor's name.
    pub tensor: String,
    /// The candidate's node that writes it, and its operator.
    pub node: String,
    pub op: String,
    /// Sample it was found on.
    pub sample: usize,
    /// As for the outputs: the error statistic, the reference's noise there, their ratio.
    pub error: f64,
    pub noise: f64,
    pub ratio: f64,
    /// How many tensors both models compute (and were compared, in order, up to this one).
    pub compared: usize,
}

/// A node tract cannot run, at which the check cuts both models: it is not checked itself; its
/// inputs are compared, its outputs are inputs of the parts after it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CutNode {
    /// The node (in the reference): its name, operator and domain (`""` for ONNX's own).
    pub node: String,
    pub op: String,
    pub domain: String,
    /// Why tract cannot run it.
    pub why: String,
    /// Its input and output tensors.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// How the candidate's node differs from the reference's (operator, domain, attributes,
    /// tensors, constant inputs), if it does: a failure, for a node the check cannot run.
    pub problem: Option<String>,
}

/// One part of the models between the cuts, checked as a model of its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartReport {
    /// Its place, in the order the parts run (each reads only graph inputs, constants and what
    /// the cuts and the parts before it write).
    pub index: usize,
    /// What it reads, as it was fed: graph inputs and cut tensors (random, drawn as graph
    /// inputs are, the same for both models; `source` says which cut).
    pub inputs: Vec<InputSpec>,
    /// The tensors compared: graph outputs it writes, and what the cuts and later parts read.
    pub outputs: Vec<String>,
    /// Its nodes in the reference and in the candidate.
    pub nodes: usize,
    pub candidate_nodes: usize,
    /// Whether it ran; when not, `problem` says why.
    pub checked: bool,
    /// When it did not run: whether the two models' parts are the same nodes with the same
    /// weights (then nothing is lost by not running it).
    pub identical: Option<bool>,
    /// When it ran: whether every output passed, the worst output, its ratio (noise criterion)
    /// and largest difference, and where the candidate goes wrong when one failed.
    pub passed: Option<bool>,
    pub worst_output: Option<String>,
    pub ratio: Option<f64>,
    pub max_abs_diff: Option<f64>,
    pub divergence: Option<Divergence>,
    /// Why it did not run, or what stops its outputs from being compared.
    pub problem: Option<String>,
}

/// Result of [`verify`](super::verify).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub passed: bool,
    /// `noise` (the default) or `tolerance`.
    pub criterion: String,
    /// Noise criterion: the most an output may be further from the reference than the
    /// reference's own rounding noise.
    pub noise_factor: f64,
    /// The error statistic compared: `elementwise`, `max`, `mean`, `median` or `quantile:Q`.
    pub stat: String,
    /// Default tolerances (per-output values are in `outputs`).
    pub atol: f64,
    pub rtol: f64,
    /// How the models ran: `native`, or `float32 upcast` (half precision evaluated as the exact
    /// float32 upcast of its weights).
    pub evaluation: String,
    /// The golden outputs the candidate was compared with, if any.
    pub golden: Option<String>,
    /// When the check failed: the first diverging tensor, if one was found.
    pub divergence: Option<Divergence>,
    /// Number of input sets actually run.
    pub samples: usize,
    pub seed: u64,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputReport>,
    pub notes: Vec<String>,
    /// Path of the reference model.
    pub reference: String,
    /// Path of the candidate model.
    pub candidate: String,
    /// Whether everything in which the models differ was checked: false when a part that
    /// differs could not run (then `passed` is false, exit code 2, unless
    /// [`allow_unchecked`](super::VerifyOptions::allow_unchecked)).
    pub checked: bool,
    /// The nodes tract cannot run, at which both models were cut; null when tract ran them
    /// whole.
    pub cuts: Option<Vec<CutNode>>,
    /// The parts between the cuts, each checked as a model of its own; null when tract ran the
    /// models whole.
    pub parts: Option<Vec<PartReport>>,
}

impl VerifyReport {
    /// Process exit code for this report: 0 when passed, 1 when something compared fails (an
    /// output, a cut node that differs), 2 when the check could not run a part in which the
    /// models differ (and that was not accepted).
    pub fn exit_code(&self) -> i32 {
        if self.passed {
            0
        } else if self.failed() {
            1
        } else {
            2
        }
    }

    /// Whether something compared fails: an output, a cut node the candidate changed, a part
    /// whose outputs the candidate does not compute.
    pub fn failed(&self) -> bool {
        self.outputs.iter().any(|o| !o.passed)
            || self.cuts.iter().flatten().any(|c| c.problem.is_some())
            || self.parts.iter().flatten().any(|p| p.passed == Some(false))
    }

    /// The parts that could not run and in which the models differ, one line each.
    pub fn unchecked(&self) -> Vec<String> {
        self.parts
            .iter()
            .flatten()
            .filter(|p| !p.checked && p.identical != Some(true))
            .map(|p| format!("part {}: {}", p.index, p.problem.as_deref().unwrap_or("not run")))
            .collect()
    }

    /// A fixed-width table, one row per output, then the verdict line.
    pub fn table(&self) -> String {
        let noise = self.criterion == "noise";
        let headers: &[&str] = if noise {
            &["output", "shape", "max abs", "error", "noise", "ratio", "worst index", "max|ref|", "result"]
        } else {
            &[
                "output",
                "shape",
                "max abs",
                "max rel",
                "mean abs",
                "worst index",
                "max|ref|",
                "min atol",
                "min rtol",
                "result",
            ]
        };
        // with cuts, the part each output was compared in comes first
        let cut = self.parts.is_some();
        let headers: Vec<&str> = if cut { [&["part"][..], headers].concat() } else { headers.to_vec() };
        let first = cut as usize;
        let left = |i: usize| i <= first + 1 || headers[i] == "worst index";
        let mut rows: Vec<Vec<String>> = vec![];
        for o in &self.outputs {
            let result = if o.passed { "PASS".to_string() } else { "FAIL".to_string() };
            rows.push(if noise {
                let scale =
                    o.noise.unwrap_or(0.0).max(o.noise_floor.unwrap_or(0.0)).max(o.reference_error.unwrap_or(0.0));
                vec![
                    o.name.clone(),
                    fmt_dims(&o.shape),
                    fmt_num(o.max_abs_diff),
                    fmt_num(o.error),
                    fmt_num(scale),
                    fmt_ratio(o.ratio.unwrap_or(f64::NAN)),
                    fmt_dims(&o.worst_index),
                    fmt_num(o.max_abs_reference),
                    result,
                ]
            } else {
                vec![
                    o.name.clone(),
                    fmt_dims(&o.shape),
                    fmt_num(o.max_abs_diff),
                    fmt_num(o.max_rel_diff),
                    fmt_num(o.mean_abs_diff),
                    fmt_dims(&o.worst_index),
                    fmt_num(o.max_abs_reference),
                    fmt_num(o.min_atol),
                    fmt_num(o.min_rtol),
                    result,
                ]
            });
            if cut {
                rows.last_mut().expect("pushed above").insert(0, o.part.map_or("-".into(), |p| p.to_string()));
            }
        }
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    l.push_str("  ");
                }
                // names, shapes and indices left-aligned, numbers right-aligned
                if left(i) {
                    let _ = write!(l, "{c:<w$}");
                } else {
                    let _ = write!(l, "{c:>w$}");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&headers.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &mut out);
        line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(), &mut out);
        for r in &rows {
            line(r, &mut out);
        }
        for o in &self.outputs {
            if let Some(p) = &o.problem {
                let _ = writeln!(out, "{}: {}", o.name, p);
            }
        }
        for c in self.cuts.iter().flatten() {
            let domain = if c.domain.is_empty() { String::new() } else { format!(" (domain {})", c.domain) };
            let same = match &c.problem {
                None => "the same in both models".to_string(),
                Some(p) => format!("FAIL: {p}"),
            };
            let _ = writeln!(out, "cut at {} '{}'{domain}: {}; not checked itself, {same}", c.op, c.node, c.why);
        }
        for p in self.parts.iter().flatten() {
            let reads: Vec<&str> = p.inputs.iter().map(|i| i.name.as_str()).collect();
            let what = format!(
                "part {}: {} node(s) ({} in the candidate) reading {}",
                p.index,
                p.nodes,
                p.candidate_nodes,
                if reads.is_empty() { "constants only".into() } else { reads.join(", ") }
            );
            let verdict = match (p.checked, p.passed, p.identical) {
                (true, Some(true), _) => match (p.ratio, &p.worst_output) {
                    (Some(r), Some(o)) => format!("PASS (worst ratio {} at '{o}')", fmt_ratio(r)),
                    (None, Some(o)) => {
                        format!("PASS (largest difference {} at '{o}')", fmt_num(p.max_abs_diff.unwrap_or(0.0)))
                    }
                    _ => "PASS".into(),
                },
                (true, _, _) => match (p.ratio, &p.worst_output) {
                    (Some(r), Some(o)) => format!("FAIL (ratio {} at '{o}')", fmt_ratio(r)),
                    _ => format!("FAIL{}", p.problem.as_ref().map(|m| format!(": {m}")).unwrap_or_default()),
                },
                (false, Some(false), _) => format!("FAIL: {}", p.problem.as_deref().unwrap_or("")),
                (false, _, Some(true)) => {
                    format!(
                        "not run ({}); the same nodes and weights in both models",
                        p.problem.as_deref().unwrap_or("")
                    )
                }
                (false, _, _) => format!("NOT CHECKED: {}", p.problem.as_deref().unwrap_or("")),
            };
            let _ = writeln!(out, "{what}: {verdict}");
        }
        if let Some(d) = &self.divergence {
            let _ = writeln!(
                out,
                "first divergence: '{}' written by {} '{}' (error {} = {}x the reference's noise there; sample {})",
                d.tensor,
                d.op,
                d.node,
                fmt_num(d.error),
                fmt_ratio(d.ratio),
                d.sample
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let failed = self.outputs.iter().filter(|o| !o.passed).count();
        let within = match (noise, &self.golden) {
            (true, None) => format!("within {}x the reference's own rounding noise", self.noise_factor),
            (true, Some(g)) => format!(
                "as close to the golden outputs ({g}) as {}x the reference's distance to them (or its rounding noise)",
                self.noise_factor
            ),
            (false, _) => format!("within atol={} rtol={} ({})", self.atol, self.rtol, self.stat),
        };
        let verdict = match self.exit_code() {
            0 if self.checked => "EQUIVALENT",
            0 => "EQUIVALENT WHERE CHECKED",
            1 => "NOT EQUIVALENT",
            _ => "NOT CHECKED",
        };
        let around = match (&self.parts, &self.cuts) {
            (Some(p), Some(c)) => format!(
                " in {} part(s) around {} node(s) tract cannot run{}",
                p.len(),
                c.len(),
                match self.unchecked().len() {
                    0 => String::new(),
                    n if self.passed => format!("; {n} part(s) not checked where the models differ (accepted)"),
                    n => format!("; {n} part(s) not checked where the models differ (--allow-unchecked accepts it)"),
                }
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{verdict}: {} of {} output(s) {within} over {} sample(s){around} ({} vs {})",
            self.outputs.len() - failed,
            self.outputs.len(),
            self.samples,
            self.reference,
            self.candidate,
        );
        out
    }
}

fn fmt_ratio(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.is_infinite() {
        "inf".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_dims(d: &[usize]) -> String {
    format!("[{}]", d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
}

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        "inf".into()
    } else if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.3e}")
    }
}
