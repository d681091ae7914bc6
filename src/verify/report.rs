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
    /// Number of elements failing `|a - b| <= atol + rtol * |a|` (all samples).
    pub failing_elements: usize,
    /// Why the output cannot pass independently of tolerances (NaN, shape mismatch), if so.
    pub problem: Option<String>,
    pub passed: bool,
}

/// Result of [`verify`](super::verify).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub passed: bool,
    pub atol: f64,
    pub rtol: f64,
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
        let headers = [
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
        ];
        let mut rows: Vec<Vec<String>> = vec![];
        for o in &self.outputs {
            rows.push(vec![
                o.name.clone(),
                fmt_dims(&o.shape),
                fmt_num(o.max_abs_diff),
                fmt_num(o.max_rel_diff),
                fmt_num(o.mean_abs_diff),
                fmt_dims(&o.worst_index),
                fmt_num(o.max_abs_reference),
                fmt_num(o.min_atol),
                fmt_num(o.min_rtol),
                if o.passed { "PASS".into() } else { "FAIL".into() },
            ]);
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
                // names and shapes left-aligned, numbers right-aligned
                if i <= 1 || i == 5 {
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
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let failed = self.outputs.iter().filter(|o| !o.passed).count();
        let _ = writeln!(
            out,
            "{}: {} of {} output(s) within atol={} rtol={} over {} sample(s) ({} vs {})",
            if self.passed { "EQUIVALENT" } else { "NOT EQUIVALENT" },
            self.outputs.len() - failed,
            self.outputs.len(),
            self.atol,
            self.rtol,
            self.samples,
            self.reference,
            self.candidate,
        );
        out
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
