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
}

impl VerifyReport {
    /// Process exit code for this report: 0 when passed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.passed {
            0
        } else {
            1
        }
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
        let left = |i: usize| i <= 1 || headers[i] == "worst index";
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
        let _ = writeln!(
            out,
            "{}: {} of {} output(s) {within} over {} sample(s) ({} vs {})",
            if self.passed { "EQUIVALENT" } else { "NOT EQUIVALENT" },
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
