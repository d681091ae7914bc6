//! Building the block's graph.

use super::*;

#[derive(Default)]
pub(crate) struct Params {
    pub(crate) w: Option<ArrayD<f64>>,
    pub(crate) b: Option<ArrayD<f64>>,
    pub(crate) bn: Option<Bn>,
    pub(crate) scale: Option<ArrayD<f64>>,
}

pub(crate) struct Built {
    pub(crate) builder: Builder,
    /// parameters of the node(s) computing x
    pub(crate) pre: Params,
    pub(crate) params: Vec<Params>,
    pub(crate) const_bias: Option<ArrayD<f64>>,
    pub(crate) bn_after: Option<Bn>,
}

pub(crate) fn form_shape(f: Form, o: usize, r: usize) -> Vec<usize> {
    match f {
        Form::Scalar => vec![],
        Form::One => vec![1],
        Form::Chan => [vec![o], vec![1; r]].concat(),
        Form::BatchChan => [vec![1, o], vec![1; r]].concat(),
    }
}

/// A BatchNormalization of `c` channels with random parameters (var in [0.1, 2]).
pub(crate) fn bn(b: &mut Builder, name: &str, x: &str, c: usize, st: BnStyle, outputs: &[&str]) -> (String, Bn) {
    let p = Bn {
        scale: b.rand(&[c]).into_dimensionality::<Ix1>().unwrap(),
        bias: b.rand(&[c]).into_dimensionality::<Ix1>().unwrap(),
        mean: b.rand(&[c]).into_dimensionality::<Ix1>().unwrap(),
        var: b.rand_in(&[c], 0.1, 2.0).into_dimensionality::<Ix1>().unwrap(),
        epsilon: st.epsilon,
    };
    let y = b.bn_with(name, x, &p, st.training_attr.then_some(0), outputs);
    (y, p)
}

/// A constant operand holding `a`, written as `src` says; returns the tensor name.
pub(crate) fn const_operand(b: &mut Builder, name: &str, a: &ArrayD<f64>, src: Src, opset: i64) -> String {
    match src {
        Src::Initializer => b.initializer(name, a),
        Src::ConstantNode => {
            let t = from_f64(&format!("{name}.value"), a, b.dtype);
            let attr = AttributeProto {
                name: Some("value".into()),
                t: Some(t),
                r#type: Some(AttributeType::Tensor as i32),
                ..Default::default()
            };
            b.node("Constant", name, &[], &[name], vec![attr])
        }
        Src::Reshape | Src::Unsqueeze => {
            let flat = ArrayD::from_shape_vec(IxDyn(&[a.len()]), a.iter().copied().collect()).unwrap();
            let f = b.initializer(&format!("{name}.flat"), &flat);
            let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
            if src == Src::Reshape {
                let sh = b.initializer_i64(&format!("{name}.shape"), &shape);
                b.node("Reshape", name, &[&f, &sh], &[name], vec![])
            } else {
                // every axis of size 1 but the channel's
                let c = shape.iter().position(|&d| d == a.len() as i64).unwrap();
                let axes: Vec<i64> = (0..shape.len() as i64).filter(|&i| i != c as i64).collect();
                if opset >= 13 {
                    let ax = b.initializer_i64(&format!("{name}.axes"), &axes);
                    b.node("Unsqueeze", name, &[&f, &ax], &[name], vec![])
                } else {
                    b.node("Unsqueeze", name, &[&f], &[name], vec![attr_ints("axes", &axes)])
                }
            }
        }
    }
}

pub(crate) fn build(bl: &Block) -> Built {
    let r = bl.rank();
    let mut b = Builder::new(bl.cin, 1, 1);
    let dt = if bl.f64 { DataType::Double } else { DataType::Float };
    if bl.f64 {
        b.dtype = FloatType::F64;
    }
    let dims: Vec<i64> = [1, bl.cin].iter().chain(&bl.input).map(|&d| d as i64).collect();
    b.rng = StdRng::seed_from_u64(bl.seed);
    b.opset = bl.opset;
    let ex = bl.explicit_defaults;
    let mut pre = Params::default();
    if bl.pre == Pre::None {
        b.graph.input = vec![tensor_info("x", dt, &dims)];
    } else {
        b.graph.input = vec![tensor_info("input", dt, &dims)];
        let c = bl.cin;
        let st = BnStyle { epsilon: 1e-5, training_attr: false };
        match bl.pre {
            Pre::Relu => {
                b.node("Relu", "pre.relu", &["input"], &["x"], vec![]);
            }
            Pre::Mul => {
                let a = b.rand_in(&form_shape(Form::Chan, c, r), 0.5, 1.5);
                let k = b.initializer("pre.s", &a);
                b.node("Mul", "pre.mul", &["input", &k], &["x"], vec![]);
                pre.scale = Some(a);
            }
            Pre::Conv | Pre::ConvBn => {
                let w = b.rand(&[vec![c, c], vec![1; r]].concat());
                let bias = b.rand(&[c]);
                let wn = b.initializer("pre.conv.w", &w);
                let bn_ = b.initializer("pre.conv.b", &bias);
                let out = if bl.pre == Pre::Conv { "x" } else { "pre.conv.y" };
                let mut attrs = vec![attr_ints("kernel_shape", &vec![1; r])];
                if bl.omit_kernel_shape {
                    attrs.clear();
                }
                b.node("Conv", "pre.conv", &["input", &wn, &bn_], &[out], attrs);
                pre.w = Some(w);
                pre.b = Some(bias);
                if bl.pre == Pre::ConvBn {
                    pre.bn = Some(bn(&mut b, "pre.bn", out, c, st, &["x"]).1);
                }
            }
            _ => {
                pre.bn = Some(bn(&mut b, "pre.bn", "input", c, st, &["x"]).1);
            }
        }
    }
    let mut params: Vec<Params> = Vec::new();
    let mut leaves = Vec::new();
    for br in &bl.branches {
        let n = &br.name;
        let (mut y, mut p, channels) = match &br.kind {
            Kind::Conv(g) => {
                let mut src = "x".to_string();
                if let Some((pb, pe)) = &g.pad {
                    let mut pads = vec![0i64; 2 * (r + 2)];
                    for a in 0..r {
                        pads[2 + a] = pb[a];
                        pads[r + 4 + a] = pe[a];
                    }
                    let name = format!("{n}.pad");
                    src = if bl.opset < 11 {
                        let mut attrs = vec![attr_ints("pads", &pads)];
                        if ex {
                            attrs.push(attr_string("mode", "constant"));
                            attrs.push(attr_float("value", 0.0));
                        }
                        b.node("Pad", &name, &[&src], &[], attrs)
                    } else {
                        let y = b.pad(&name, &src, &pads, ex.then_some("constant"));
                        if ex {
                            // an explicit zero constant_value
                            let z = b.initializer(&format!("{name}.value"), &ArrayD::zeros(IxDyn(&[])));
                            b.graph.node.last_mut().unwrap().input.push(z);
                        }
                        y
                    };
                }
                if let Some((cb, ce)) = &g.crop {
                    let mut axes: Vec<usize> = (0..r).filter(|&a| cb[a] > 0 || ce[a] > 0).collect();
                    if axes.is_empty() || ex {
                        axes = (0..r).collect();
                    }
                    let starts: Vec<i64> = axes.iter().map(|&a| cb[a]).collect();
                    let ends: Vec<i64> = axes.iter().map(|&a| if ce[a] == 0 { i64::MAX } else { -ce[a] }).collect();
                    let ax: Vec<i64> = axes
                        .iter()
                        .map(|&a| if bl.slice_negative_axes { a as i64 - r as i64 } else { a as i64 + 2 })
                        .collect();
                    let name = format!("{n}.slice");
                    src = if bl.opset < 10 {
                        let attrs =
                            vec![attr_ints("starts", &starts), attr_ints("ends", &ends), attr_ints("axes", &ax)];
                        b.node("Slice", &name, &[&src], &[], attrs)
                    } else {
                        let steps = vec![1i64; axes.len()];
                        b.slice(&name, &src, &starts, &ends, &ax, bl.slice_steps.then_some(&steps[..]))
                    };
                }
                let mut shape = vec![g.out, bl.cin / g.groups];
                shape.extend(&g.kernel);
                let (wname, w) = match br.share_weight {
                    Some(j) => (format!("{}.conv.w", bl.branches[j].name), params[j].w.clone().unwrap()),
                    None => {
                        let w = b.rand(&shape);
                        (b.initializer(&format!("{n}.conv.w"), &w), w)
                    }
                };
                assert_eq!(w.shape(), &shape[..], "shared weight of another shape");
                let bias = br.bias.then(|| b.rand(&[g.out]));
                let mut inputs = vec![src.clone(), wname];
                if let Some(bb) = &bias {
                    inputs.push(b.initializer(&format!("{n}.conv.b"), bb));
                }
                let attrs = ConvAttrs {
                    pads: (g.auto_pad.is_none() && (ex || g.pads.iter().any(|&p| p != 0))).then(|| g.pads.clone()),
                    strides: (ex || g.strides.iter().any(|&s| s != 1))
                        .then(|| g.strides.iter().map(|&s| s as i64).collect()),
                    dilations: (ex || g.dilations.iter().any(|&s| s != 1))
                        .then(|| g.dilations.iter().map(|&s| s as i64).collect()),
                    group: (ex || g.groups != 1).then_some(g.groups as i64),
                };
                let y = b.conv_with(
                    &format!("{n}.conv"),
                    &inputs.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                    &g.kernel,
                    attrs,
                );
                if let Some(m) = g.auto_pad {
                    let v = match m {
                        AutoPad::SameUpper => "SAME_UPPER",
                        AutoPad::SameLower => "SAME_LOWER",
                        AutoPad::Valid => "VALID",
                    };
                    b.graph.node.last_mut().unwrap().attribute.push(attr_string("auto_pad", v));
                }
                (y, Params { w: Some(w), b: bias, ..Default::default() }, g.out)
            }
            Kind::Identity => ("x".to_string(), Params::default(), bl.cin),
            Kind::IdentityBn => {
                let (y, p) = bn(&mut b, &format!("{n}.bn"), "x", bl.cin, br.bn.unwrap(), &[]);
                (y, Params { bn: Some(p), ..Default::default() }, bl.cin)
            }
        };
        if let (Kind::Conv(_), Some(st)) = (&br.kind, br.bn) {
            let (z, q) = bn(&mut b, &format!("{n}.bn"), &y, channels, st, &[]);
            y = z;
            p.bn = Some(q);
        }
        if let Some(op) = br.scale {
            let shape = form_shape(op.form, channels, r);
            let mut s = b.rand_in(&shape, 0.5, 1.5);
            if b.rand(&[]).first().is_some_and(|&v| v < 0.0) {
                s.mapv_inplace(|v| -v);
            }
            let c = const_operand(&mut b, &format!("{n}.s"), &s, op.src, bl.opset);
            let ins = if op.first { [c.as_str(), y.as_str()] } else { [y.as_str(), c.as_str()] };
            y = b.node("Mul", &format!("{n}.mul"), &ins, &[], vec![]);
            p.scale = Some(s);
        }
        leaves.push(y);
        params.push(p);
    }
    let const_bias = bl.const_bias.map(|op| {
        let a = b.rand(&form_shape(op.form, bl.cout, r));
        let c = const_operand(&mut b, "const_bias", &a, op.src, bl.opset);
        leaves.push(c);
        a
    });
    let root = if bl.bn_after.is_some() { "s" } else { "y" };
    let mut count = 0;
    emit(&mut b, &bl.tree, &leaves, Some(root), &mut count);
    let bn_after = bl.bn_after.map(|st| bn(&mut b, "bn_after", "s", bl.cout, st, &["y"]).1);
    b.graph.output.push(tensor_info("y", dt, &[]));
    if bl.bystander {
        // the first branch is the square conv: the same weight (and bias) and attributes, on x
        let Kind::Conv(g) = &bl.branches[0].kind else { unreachable!() };
        let mut pads = vec![0i64; 2 * r];
        for a in 0..r {
            let mut l = bl.input[a] as i64;
            if let Some((pb, pe)) = &g.pad {
                pads[a] += pb[a];
                pads[r + a] += pe[a];
                l += pb[a] + pe[a];
            }
            let (eb, ee) = eff_pads(g, a, l);
            pads[a] = (pads[a] + eb).max(0);
            pads[r + a] = (pads[r + a] + ee).max(0);
            // (a changed square may have crops: keep the bystander's output non-empty)
            let span = (g.dilations[a] * (g.kernel[a] - 1) + 1) as i64;
            pads[r + a] += (span - (bl.input[a] as i64 + pads[a] + pads[r + a])).max(0);
        }
        let n = &bl.branches[0].name;
        let mut inputs = vec!["x".to_string(), format!("{n}.conv.w")];
        if bl.branches[0].bias {
            inputs.push(format!("{n}.conv.b"));
        }
        let attrs = ConvAttrs {
            pads: Some(pads),
            strides: Some(g.strides.iter().map(|&v| v as i64).collect()),
            dilations: Some(g.dilations.iter().map(|&v| v as i64).collect()),
            group: Some(g.groups as i64),
        };
        b.conv_with("bystander", &inputs.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &g.kernel, attrs);
        b.graph.node.last_mut().unwrap().output = vec!["z".into()];
        b.graph.output.push(tensor_info("z", dt, &[]));
    }
    if bl.omit_kernel_shape {
        for node in &mut b.graph.node {
            node.attribute.retain(|a| a.name() != "kernel_shape");
        }
    }
    if let Some(s) = bl.shuffle {
        shuffle_nodes(&mut b, s);
    }
    Built { builder: b, pre, params, const_bias, bn_after }
}

pub(crate) fn emit(b: &mut Builder, t: &Tree, leaves: &[String], out: Option<&str>, count: &mut usize) -> String {
    let (op, kids): (&str, Vec<&Tree>) = match t {
        Tree::Leaf(i) => return leaves[*i].clone(),
        Tree::Add(l, r) => ("Add", vec![l, r]),
        Tree::Sum(ts) => ("Sum", ts.iter().collect()),
    };
    let ins: Vec<String> = kids.into_iter().map(|k| emit(b, k, leaves, None, count)).collect();
    *count += 1;
    let name = format!("{}{}", op.to_lowercase(), count);
    let outs: Vec<&str> = out.into_iter().collect();
    b.node(op, &name, &ins.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &outs, vec![])
}

/// Reorder the nodes in a random topological order.
pub(crate) fn shuffle_nodes(b: &mut Builder, seed: u64) {
    let nodes = std::mem::take(&mut b.graph.node);
    let producer: HashMap<&str, usize> =
        nodes.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    let deps: Vec<Vec<usize>> =
        nodes.iter().map(|n| n.input.iter().filter_map(|i| producer.get(i.as_str()).copied()).collect()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut done = vec![false; nodes.len()];
    let mut order = Vec::new();
    while order.len() < nodes.len() {
        let mut ready: Vec<usize> =
            (0..nodes.len()).filter(|&i| !done[i] && deps[i].iter().all(|&d| done[d])).collect();
        ready.shuffle(&mut rng);
        let i = ready[0];
        done[i] = true;
        order.push(i);
    }
    let mut slots: Vec<Option<_>> = nodes.into_iter().map(Some).collect();
    b.graph.node = order.into_iter().map(|i| slots[i].take().unwrap()).collect();
}
