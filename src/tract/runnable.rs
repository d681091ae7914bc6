//! Which nodes of a model tract cannot run, found before it is asked to: an operator of a
//! domain tract does not implement (whatever its name), an operator tract has no implementation
//! of, or one whose builder refuses the node (an attribute or form it does not support). What
//! tract refuses only once it sees the inputs' types and shapes is told later, by
//! [`Error::Refused`](crate::Error::Refused) from [`super::prepare`].

use super::errors::chain_msg;
use crate::error::catch;
use crate::model::Model;
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;
use tract_onnx::tract_hir::prelude::Framework;

/// The operator domains tract implements: ONNX's own, ONNX-ML's, and Microsoft's contrib
/// operators (those of them in tract's register). tract looks operators up by name alone, so a
/// node of any other domain is not run even when its name is one tract knows: it would run
/// ONNX's operator of that name, which is not the node's.
pub(crate) const DOMAINS: [&str; 4] = ["", "ai.onnx", "ai.onnx.ml", "com.microsoft"];

/// Why tract cannot run a node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Why {
    /// Its domain is not one tract implements.
    Domain(String),
    /// tract has no implementation of its operator.
    Unimplemented,
    /// tract's builder of its operator refused it (the message).
    Refused(String),
    /// tract refused to type it with the inputs it gets (the message).
    Typing(String),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Domain(d) => write!(f, "tract does not implement the domain `{d}`"),
            Why::Unimplemented => f.write_str("tract has no implementation of this operator"),
            Why::Refused(m) => write!(f, "tract refuses the node: {m}"),
            Why::Typing(m) => write!(f, "tract refuses it for these inputs: {m}"),
        }
    }
}

/// The nodes of `model`'s graph (by index) that tract cannot run, and why, in graph order: of
/// a domain tract does not implement, or of an operator it has no implementation of. Looked up,
/// not parsed: nothing is built.
pub(crate) fn unknown_nodes(model: &Model) -> Vec<(usize, Why)> {
    let register = &tract_onnx::onnx().op_register.0;
    let g = model.graph();
    g.node
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            if !DOMAINS.contains(&n.domain()) {
                Some((i, Why::Domain(n.domain().to_string())))
            } else if !register.contains_key(n.op_type()) {
                Some((i, Why::Unimplemented))
            } else {
                None
            }
        })
        .collect()
}

/// [`unknown_nodes`], and the nodes whose builder refuses them: read from a copy without the
/// weights (see [`Model::without_weights`]), which tract parses (its parser builds every node's
/// operator from its attributes alone). A model tract cannot parse for another reason gives
/// what was found up to there (loading it tells the error).
pub(crate) fn unrunnable_nodes(model: &Model) -> Vec<(usize, Why)> {
    use prost::Message;
    let mut found: Vec<(usize, Why)> = vec![];
    let mut proto = model.without_weights(super::load::REFERENCE_BYTES);
    let g = proto.graph.as_mut().expect("a Model has a graph");
    // every node named by its index, so that tract's messages and node names say which it is
    for (i, n) in g.node.iter_mut().enumerate() {
        n.name = Some(format!("#{i}"));
    }
    let index = |n: &crate::proto::NodeProto| n.name().strip_prefix('#').and_then(|i| i.parse::<usize>().ok());
    g.node.retain(|n| {
        let domain = n.domain();
        if DOMAINS.contains(&domain) {
            return true;
        }
        found.push((index(n).expect("named above"), Why::Domain(domain.to_string())));
        false
    });
    let onnx = tract_onnx::onnx();
    loop {
        let bytes = proto.encode_to_vec();
        let parsed = catch(|| onnx.proto_model_for_read(&mut bytes.as_slice()).and_then(|pb| onnx.parse(&pb, None)));
        let model = match parsed {
            Ok(Ok(p)) => p.model,
            Ok(Err(e)) => {
                // "Building node #12 (Op)": that node's builder refused it; the others are
                // looked at without it
                let refused = e.chain().find_map(|c| {
                    let s = c.to_string();
                    let rest = s.strip_prefix("Building node #")?;
                    rest.split(' ').next()?.parse::<usize>().ok()
                });
                let Some(i) = refused else { break };
                let g = proto.graph.as_mut().expect("a Model has a graph");
                let before = g.node.len();
                g.node.retain(|n| index(n) != Some(i));
                if g.node.len() == before {
                    break;
                }
                let msg = chain_msg(&e);
                let msg = msg.split_once("): ").map_or(msg.as_str(), |(_, m)| m).to_string();
                found.push((i, Why::Refused(msg)));
                continue;
            }
            Err(_) => break,
        };
        for node in model.nodes() {
            if node.op_is::<UnimplementedOp>() {
                if let Some(i) = node.name.strip_prefix('#').and_then(|i| i.parse::<usize>().ok()) {
                    found.push((i, Why::Unimplemented));
                }
            }
        }
        break;
    }
    found.sort_by_key(|(i, _)| *i);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::{attr_int, Builder};

    /// A custom domain's node (even one named like an ONNX operator), an operator tract has no
    /// implementation of, and one whose builder refuses an attribute are each found, with why;
    /// the runnable nodes are not.
    #[test]
    fn the_nodes_tract_cannot_run_are_found_with_why() {
        let mut b = Builder::new(2, 4, 4);
        let a = b.node("Relu", "fine", &["x"], &[], vec![]);
        let c = b.node("Relu", "custom_relu", &[&a], &[], vec![]);
        let d = b.node("Bernoulli", "unimplemented", &[&c], &[], vec![]);
        // (ONNX dropped `spatial` in opset 9; tract's builder refuses `spatial=0`)
        let e = b.node("BatchNormalization", "refused", &[&d, &d, &d, &d, &d], &[], vec![attr_int("spatial", 0)]);
        let f = b.node("Sigmoid", "fine_too", &[&e], &[], vec![]);
        b.output(&f);
        let mut model = b.build();
        model.graph_mut().node[1].domain = Some("com.example.vendor".into());
        let found = unrunnable_nodes(&model);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], (1, Why::Domain("com.example.vendor".into())));
        assert_eq!(found[1], (2, Why::Unimplemented));
        assert!(matches!(&found[2], (3, Why::Refused(m)) if m.contains("'spatial' is not supported")), "{found:?}");
        // looked up without parsing: the first two
        assert_eq!(unknown_nodes(&model), found[..2].to_vec());
        assert_eq!(found[0].1.to_string(), "tract does not implement the domain `com.example.vendor`");
    }
}
