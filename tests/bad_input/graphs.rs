//! Graphs that are not well formed.

use super::*;

#[test]
fn case_node_input_nothing_produces() {
    let d = tempdir();
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).node[3].input[0] = "nowhere".into();
    let p = d.path().join("dangling.onnx");
    write(&m, &p);
    refused(&p, &["nowhere", "nothing produces"]);
    // a graph output nothing produces
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).output[0].name = Some("ghost".into());
    let p = d.path().join("ghost_output.onnx");
    write(&m, &p);
    refused(&p, &["ghost", "not produced"]);
}

#[test]
fn case_cycles() {
    let d = tempdir();
    // node k reads the output of node k+1, which (transitively) reads node k
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let g = graph(&mut m);
    let (k, next) = (0..g.node.len() - 1)
        .find_map(|k| {
            let out = g.node[k].output[0].clone();
            g.node.iter().position(|n| n.input.contains(&out)).map(|j| (k, j))
        })
        .unwrap();
    let back = g.node[next].output[0].clone();
    g.node[k].input[0] = back;
    let p = d.path().join("cycle.onnx");
    write(&m, &p);
    refused(&p, &["cycle"]);
    // a node reading its own output
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    let g = graph(&mut m);
    let own = g.node[2].output[0].clone();
    g.node[2].input[0] = own;
    let p = d.path().join("self_loop.onnx");
    write(&m, &p);
    refused(&p, &["cycle"]);
    // no cycle, but nodes out of order (ONNX requires topological order)
    let mut m = read(&fixture("conv2", "ts_fold.onnx"));
    graph(&mut m).node.reverse();
    let p = d.path().join("reversed.onnx");
    write(&m, &p);
    refused(&p, &["topological order"]);
}

#[test]
fn case_duplicate_tensor_names() {
    let d = tempdir();
    let base = read(&fixture("conv2", "ts_fold.onnx"));
    let mut cases: Vec<(&str, ModelProto)> = vec![];
    // two initializers of one name
    let mut m = base.clone();
    let t = graph(&mut m).initializer[0].clone();
    graph(&mut m).initializer.push(t);
    cases.push(("dup_init.onnx", m.clone()));
    // ... also both listed as graph inputs
    let name = graph(&mut m).initializer[0].name().to_string();
    graph(&mut m).input.push(float_input(&name, &[1]));
    cases.push(("dup_init_as_input.onnx", m));
    // two nodes writing one tensor
    let mut m = base.clone();
    let g = graph(&mut m);
    let o = g.node[1].output[0].clone();
    g.node[4].output[0] = o;
    cases.push(("dup_output.onnx", m));
    // a node writing a graph input / an initializer
    let mut m = base.clone();
    let g = graph(&mut m);
    g.node[1].output[0] = g.input[0].name().to_string();
    cases.push(("output_is_input.onnx", m));
    let mut m = base.clone();
    let g = graph(&mut m);
    g.node[1].output[0] = g.initializer[0].name().to_string();
    cases.push(("output_is_init.onnx", m));
    // the same graph input twice
    let mut m = base.clone();
    let i = graph(&mut m).input[0].clone();
    graph(&mut m).input.push(i);
    cases.push(("dup_input.onnx", m));
    for (name, m) in cases {
        let p = d.path().join(name);
        write(&m, &p);
        refused(&p, &["duplicate"]);
    }
}

/// Nodes of the operators the rules read, without the inputs their schema requires (or without
/// an output): refused on load, before any rule indexes into them.
#[test]
fn case_nodes_missing_required_inputs() {
    let d = tempdir();
    let base = read(&fixture("conv2", "ts_nofold_op11.onnx"));
    let first =
        |m: &mut ModelProto, op: &str| -> usize { graph(m).node.iter().position(|n| n.op_type() == op).unwrap() };
    let mut cases: Vec<(&str, ModelProto, &str)> = vec![];
    let mut m = base.clone();
    let i = first(&mut m, "Conv");
    graph(&mut m).node[i].input.truncate(1);
    cases.push(("conv_no_weight.onnx", m, "has 1 input(s)"));
    let mut m = base.clone();
    let i = first(&mut m, "Conv");
    graph(&mut m).node[i].input[0] = String::new();
    cases.push(("conv_empty_x.onnx", m, "has no input 0"));
    let mut m = base.clone();
    let i = first(&mut m, "BatchNormalization");
    graph(&mut m).node[i].input.truncate(4);
    cases.push(("bn_four_inputs.onnx", m, "has 4 input(s)"));
    let mut m = base.clone();
    let i = first(&mut m, "Add");
    graph(&mut m).node[i].input.push("x".into());
    cases.push(("add_three_inputs.onnx", m, "has 3 input(s)"));
    let mut m = base.clone();
    let i = first(&mut m, "BatchNormalization");
    graph(&mut m).node[i].output.clear();
    cases.push(("bn_no_output.onnx", m, "no output"));
    // Pad takes its amounts as an input from opset 11
    let mut m = base.clone();
    let x = graph(&mut m).input[0].name().to_string();
    let conv = first(&mut m, "Conv");
    let g = graph(&mut m);
    g.node[conv].input[0] = "padded".into();
    g.node.insert(
        conv,
        NodeProto {
            input: vec![x],
            output: vec!["padded".into()],
            op_type: Some("Pad".into()),
            name: Some("pad".into()),
            ..Default::default()
        },
    );
    cases.push(("pad_one_input.onnx", m, "at opset 11 it takes 2 to 4"));
    for (name, m, word) in cases {
        let p = d.path().join(name);
        write(&m, &p);
        refused(&p, &[word]);
    }
}
