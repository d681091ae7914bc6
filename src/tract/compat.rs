//! Edits that let tract run a model it would refuse as written, without changing what the model
//! computes: tract's Einsum does not broadcast an axis of size 1 against the same letter's size
//! in another operand (onnxruntime does, and TorchScript exports of yolov7's RepConv_OREPA use
//! it: `oihw,hw->oihw` of a `[16, 3, 1, 1]` weight and a `[3, 3]` one). Such an operand, when its
//! shape is known (a constant, or computed from constants), is expanded to the full size by an Expand node first, so tract
//! still computes every value itself.

use crate::graph::{attr_string, is_op, Consts, GraphIndex};
use crate::model::Model;
use crate::proto::NodeProto;
use std::collections::{BTreeMap, HashSet};

/// Expand the size-1 axes of Einsum operands that tract would not broadcast; the names of the
/// Einsum nodes edited.
pub(crate) fn expand_einsum_broadcasts(model: &mut Model) -> Vec<String> {
    let mut edited = vec![];
    let mut taken: HashSet<String> = crate::graph::graph_names(model.graph());
    let mut fresh = |base: &str| {
        let mut k = 0;
        loop {
            let n = format!("{base}_expanded{}", if k == 0 { String::new() } else { k.to_string() });
            if taken.insert(n.clone()) {
                return n;
            }
            k += 1;
        }
    };
    // per Einsum node: its operands to expand, each with the shape to expand it to
    type Plan = (usize, Vec<(usize, Vec<i64>)>);
    let plans: Vec<Plan> = {
        let g = model.graph();
        let ix = GraphIndex::new(g);
        let exact = std::collections::HashMap::new();
        let consts = Consts { model, ix: &ix, exact: &exact };
        // an operand's shape, when it is a constant (or computed from constants only)
        let dims_of = |t: &str| -> Option<Vec<i64>> {
            match ix.constant(g, t) {
                Some(c) => Some(c.dims.clone()),
                None => consts.value(t).ok().map(|v| v.shape().iter().map(|&d| d as i64).collect()),
            }
        };
        g.node
            .iter()
            .enumerate()
            .filter(|(_, n)| is_op(n, "Einsum"))
            .filter_map(|(i, n)| {
                let eq: String = attr_string(n, "equation")?.chars().filter(|c| !c.is_whitespace()).collect();
                let lhs = eq.split("->").next()?;
                let terms: Vec<Vec<char>> = lhs.split(',').map(|t| t.chars().collect()).collect();
                if terms.len() != n.input.len() || lhs.contains('.') {
                    return None;
                }
                let dims: Vec<Vec<i64>> = n.input.iter().map(|t| dims_of(t)).collect::<Option<_>>()?;
                let mut size: BTreeMap<char, i64> = BTreeMap::new();
                for (t, d) in terms.iter().zip(&dims) {
                    if t.len() != d.len() {
                        return None;
                    }
                    for (c, &v) in t.iter().zip(d) {
                        let e = size.entry(*c).or_insert(v);
                        *e = (*e).max(v);
                    }
                }
                let ops: Vec<(usize, Vec<i64>)> = terms
                    .iter()
                    .zip(&dims)
                    .enumerate()
                    .filter(|(_, (t, d))| t.iter().zip(d.iter()).any(|(c, &v)| v != size[c]))
                    .map(|(k, (t, _))| (k, t.iter().map(|c| size[c]).collect()))
                    .collect();
                (!ops.is_empty()).then_some((i, ops))
            })
            .collect()
    };
    for (i, ops) in plans.into_iter().rev() {
        let mut new_nodes = vec![];
        for (k, shape) in ops {
            let g = model.graph_mut();
            let input = g.node[i].input[k].clone();
            let (sname, out) = (fresh(&format!("{input}_shape")), fresh(&input));
            g.initializer.push(crate::model::tensor::from_i64(&sname, &[shape.len() as i64], &shape));
            new_nodes.push(NodeProto {
                op_type: Some("Expand".into()),
                name: Some(fresh(&format!("{}_expand{k}", g.node[i].name()))),
                input: vec![input, sname],
                output: vec![out.clone()],
                ..Default::default()
            });
            g.node[i].input[k] = out;
        }
        edited.push(model.graph().node[i].name().to_string());
        let g = model.graph_mut();
        for n in new_nodes.into_iter().rev() {
            g.node.insert(i, n);
        }
    }
    edited.reverse();
    edited
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::{attr_string, Builder};

    #[test]
    fn an_einsum_of_a_size_one_axis_runs_in_tract_once_expanded() {
        // 'oihw,hw->oihw' of [4,2,1,1] and [3,3] (yolov7's RepConv_OREPA), then a Conv
        let mut b = Builder::new(2, 6, 6);
        let w = b.rand(&[4, 2, 1, 1]);
        let w = b.initializer("w", &w);
        let avg = b.rand(&[3, 3]);
        let avg = b.initializer("avg", &avg);
        let k = b.node("Einsum", "ein", &[&w, &avg], &["k"], vec![attr_string("equation", "oihw,hw->oihw")]);
        let y = b.node("Conv", "conv", &["x", &k], &["y"], vec![]);
        b.output(&y);
        let mut m = b.build();
        assert_eq!(expand_einsum_broadcasts(&mut m), ["ein"]);
        let g = m.graph();
        assert_eq!(g.node.iter().map(|n| n.op_type()).collect::<Vec<_>>(), ["Expand", "Einsum", "Conv"]);
        crate::rewrite::validate(&m).unwrap();
        // tract computes it, as numpy would: k[o,i,h,w] = w[o,i,0,0]·avg[h,w]
        let x = crate::support::rand_input(3, &[1, 2, 6, 6]);
        let got = crate::support::run_f32(&m, std::slice::from_ref(&x));
        let wv = crate::support::init_f64(&m.proto, "w");
        let av = crate::support::init_f64(&m.proto, "avg");
        let kernel = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 2, 3, 3]), |i| {
            wv[[i[0], i[1], 0, 0]] * av[[i[2], i[3]]]
        });
        let want =
            crate::kernel::AffineConv::new(kernel, None, 1, vec![1, 1], vec![1, 1], vec![0, 0], vec![0, 0]).apply(&x);
        crate::support::assert_close(&got, &want, 1e-5, "expanded Einsum in tract");
        // nothing to do the second time
        assert!(expand_einsum_broadcasts(&mut m).is_empty());
    }
}
