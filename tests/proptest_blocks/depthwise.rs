//! Depthwise blocks with a channel multiplier (groups = C_in, C_out = m·C_in).

use super::*;

/// A depthwise block: a KxK (K 3, 5 or 7) conv and optionally a smaller square, Kx1 / 1xK, a 1x1
/// "scale" conv, each with a BN or a bias, all with groups = cin and cin·mult outputs; the identity
/// (plain or through a BN) when mult = 1 and stride 1; a TorchScript accumulator `Add(0, ·)`; a BN
/// after the sum.
#[derive(Clone, Debug)]
pub(crate) struct DwBlock {
    pub(crate) seed: u64,
    pub(crate) input: Vec<usize>,
    pub(crate) cin: usize,
    pub(crate) mult: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    /// kernels of the conv branches (the first is KxK), each with a BN (else a bias)
    pub(crate) convs: Vec<(Vec<usize>, bool)>,
    pub(crate) identity: bool,
    pub(crate) identity_bn: bool,
    pub(crate) accumulator: bool,
    pub(crate) bn_after: bool,
}

pub(crate) fn gen_dw(v: &[u16]) -> DwBlock {
    let ch = &mut Ch { v, i: 0 };
    let seed = ch.pick(1 << 16) as u64;
    let r = ch.of(&[2, 2, 2, 1]);
    let k = ch.of(&[3, 5, 7]);
    let input: Vec<usize> = (0..r).map(|_| k + ch.pick(6)).collect();
    let (cin, mult) = (1 + ch.pick(4), 1 + ch.pick(3));
    let stride = if ch.chance(30) { 2 } else { 1 };
    let mut convs = vec![(vec![k; r], ch.chance(80))];
    if k > 3 && ch.chance(50) {
        convs.push((vec![3; r], ch.chance(80)));
    }
    if r == 2 {
        for kv in [vec![k, 1], vec![1, k]] {
            if ch.chance(35) {
                convs.push((kv, ch.chance(80)));
            }
        }
    }
    if ch.chance(50) {
        convs.push((vec![1; r], ch.chance(80)));
    }
    let can_id = mult == 1 && stride == 1;
    DwBlock {
        seed,
        input,
        cin,
        mult,
        k,
        stride,
        convs,
        identity: can_id && ch.chance(30),
        identity_bn: can_id && ch.chance(40),
        accumulator: ch.chance(20),
        bn_after: ch.chance(20),
    }
}

pub(crate) fn check_dw(bl: &DwBlock) -> Result<(), TestCaseError> {
    let r = bl.input.len();
    let (c, o) = (bl.cin, bl.cin * bl.mult);
    let mut b = Builder::new(c, 1, 1);
    let dims: Vec<i64> = [1, c].iter().chain(&bl.input).map(|&d| d as i64).collect();
    b.graph.input[0] = tensor_info("x", DataType::Float, &dims);
    b.rng = StdRng::seed_from_u64(bl.seed);
    let shape: Vec<usize> = [1, c].iter().chain(&bl.input).copied().collect();
    let x = rand_input(bl.seed ^ 0xd3, &shape);
    let st = BnStyle { epsilon: 1e-5, training_attr: false };
    let (mut terms, mut want): (Vec<String>, Option<ArrayD<f64>>) = (vec![], None);
    let add = |y: ArrayD<f64>, want: &mut Option<ArrayD<f64>>| *want = Some(want.take().map_or(y.clone(), |w| w + &y));
    if bl.accumulator {
        // identity_out = 0; identity_out = identity_out + branch (TorchScript keeps the Add)
        terms.push(b.initializer("zero", &ndarray::arr0(0.0).into_dyn()));
    }
    for (i, (kv, with_bn)) in bl.convs.iter().enumerate() {
        // "same" padding for the kernel, stride on every branch
        let pads: Vec<i64> = (0..2 * r).map(|j| (kv[j % r] / 2) as i64).collect();
        let attrs = ConvAttrs::pads(&pads).strides(&vec![bl.stride as i64; r]).group(c as i64);
        let (y, w, bias) = b.conv_rand(&format!("b{i}"), "x", o, 1, kv, !with_bn, attrs);
        let g = Geo {
            kernel: kv.clone(),
            strides: vec![bl.stride; r],
            dilations: vec![1; r],
            pads: pads.clone(),
            auto_pad: None,
            crop: None,
            pad: None,
            groups: c,
            out: o,
        };
        let mut yv = naive_conv(&x, &w, bias.as_ref(), &g);
        let mut yn = y;
        if *with_bn {
            let (z, p) = bn(&mut b, &format!("b{i}.bn"), &yn, o, st, &[]);
            yv = p.apply(&yv);
            yn = z;
        }
        terms.push(yn);
        add(yv, &mut want);
    }
    if bl.identity {
        terms.push("x".into());
        add(x.clone(), &mut want);
    }
    if bl.identity_bn {
        let (z, p) = bn(&mut b, "id.bn", "x", c, st, &[]);
        terms.push(z);
        add(p.apply(&x), &mut want);
    }
    let mut acc = terms[0].clone();
    for (j, t) in terms.iter().enumerate().skip(1) {
        acc = b.add(&format!("add{j}"), &acc, t);
    }
    let mut want = want.unwrap();
    if bl.bn_after {
        let (z, p) = bn(&mut b, "after.bn", &acc, o, st, &[]);
        acc = z;
        want = p.apply(&want);
    }
    let out = b.node("Identity", "out", &[&acc], &["y"], vec![]);
    b.output(&out);
    let original = b.build();
    let mut m = b.build();
    let rep = fuse(&mut m).map_err(|e| TestCaseError::fail(format!("fuse failed: {e}")))?;
    if !rep.refused.is_empty() {
        return Err(fail("refused a depthwise block", format!("{:?}", rep.refused), &rep));
    }
    let convs: Vec<&NodeProto> = graph(&m.proto).node.iter().filter(|n| n.op_type() == "Conv").collect();
    if convs.len() != 1 {
        return Err(fail("not one Conv", format!("{:?}", rep.after.ops), &rep));
    }
    let k = conv_of(&m.proto, convs[0]);
    if (k.groups, k.kernel()) != (c, vec![bl.k; r].as_slice()) {
        return Err(fail("merged geometry", format!("groups {} kernel {:?}", k.groups, k.kernel()), &rep));
    }
    close(&k.apply(&x), &want, 1e-6).map_err(|e| fail("fused conv vs the branches computed here", e, &rep))?;
    tract_verify(&original, &m).map_err(|e| fail("tract", e, &rep))?;
    Ok(())
}
