//! tract's errors and panics as one line, naming the ONNX node (and operator) they are about.

use crate::error::Panic;
use std::collections::HashMap;
use std::path::Path;
use tract_onnx::prelude::*;

/// Longest summary kept (in characters).
const MAX_MSG: usize = 600;

/// A message as one line of bounded length: control characters become spaces, runs of spaces
/// collapse, and anything past [`MAX_MSG`] characters is cut with `...`.
pub(crate) fn summarize(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_MSG + 3));
    let mut last_space = false;
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        out.push(c);
    }
    let out = out.trim().to_string();
    if out.chars().count() > MAX_MSG {
        let mut t: String = out.chars().take(MAX_MSG).collect();
        t.push_str("...");
        t
    } else {
        out
    }
}

/// The whole anyhow chain of a tract error, `outer: inner: root`, on one line.
pub(crate) fn chain_msg(e: &TractError) -> String {
    let parts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    summarize(&parts.join(": "))
}

/// A panic caught around a tract call, as a message.
pub(crate) fn panic_msg(p: Panic) -> String {
    match p.text {
        Some(s) => format!("tract panicked: {s}"),
        None => "tract panicked".into(),
    }
}

/// ONNX op type of a tract node name (tract names nodes after the ONNX node name, or its
/// first output; expansions append `.suffix`).
fn onnx_op_of(path: &Path, node_name: &str) -> Option<(String, String)> {
    let proto = tract_onnx::onnx().proto_model_for_path(path).ok()?;
    let graph = proto.graph.as_ref()?;
    let mut by_name: HashMap<&str, &str> = HashMap::new();
    for n in &graph.node {
        if !n.name.is_empty() {
            by_name.insert(&n.name, &n.op_type);
        }
        if let Some(o) = n.output.first() {
            by_name.entry(o.as_str()).or_insert(&n.op_type);
        }
    }
    let mut name = node_name;
    loop {
        if let Some(op) = by_name.get(name) {
            return Some((name.to_string(), op.to_string()));
        }
        match name.rfind('.') {
            Some(i) => name = &name[..i],
            None => return None,
        }
    }
}

/// What a tract error is about: the operator tract has no implementation of (if that is the
/// error), the ONNX node it names (its name, or its first output when it has none, as tract
/// names nodes) and the message, one line naming that node and its operator.
pub(crate) struct Failure {
    pub unimplemented: Option<String>,
    pub node: Option<String>,
    pub msg: String,
}

/// Names the ONNX node an error is about, from tract's `#12 "name" Op` node display.
pub(crate) fn describe_failure(path: &Path, e: &TractError) -> (Option<String>, String) {
    let f = failure(path, e);
    (f.unimplemented, f.msg)
}

/// [`describe_failure`], with the ONNX node.
pub(crate) fn failure(path: &Path, e: &TractError) -> Failure {
    let mut op = None;
    let mut node = None;
    for c in e.chain() {
        let s = c.to_string();
        if let Some(i) = s.find("Unimplemented(") {
            let rest = &s[i + "Unimplemented(".len()..];
            if let Some(j) = rest.find(')') {
                op = Some(rest[..j].to_string());
            }
        }
        if node.is_none() {
            if let Some(i) = s.find(" \"") {
                if s[..i].rsplit(' ').next().is_some_and(|t| t.starts_with('#')) {
                    let rest = &s[i + 2..];
                    if let Some(j) = rest.find('"') {
                        node = Some(rest[..j].to_string());
                    }
                }
            }
        }
    }
    let mut msg = chain_msg(e);
    let mut onnx = None;
    if let Some(n) = &node {
        if let Some((onnx_node, op_type)) = onnx_op_of(path, n) {
            msg = summarize(&format!("at ONNX node `{onnx_node}` ({op_type}): {msg}"));
            onnx = Some(onnx_node);
        }
    }
    Failure { unimplemented: op, node: onnx, msg }
}
