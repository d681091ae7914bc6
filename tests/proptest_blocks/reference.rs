//! The independent reference: the branches computed here from the builder's arrays.

use super::*;

/// Pad (positive) or crop (negative) the spatial axes of `[N, C, spatial...]`.
pub(crate) fn pad_signed(x: &ArrayD<f64>, b: &[i64], e: &[i64]) -> ArrayD<f64> {
    let cropped = x.slice_each_axis(|ax| {
        let i = ax.axis.index();
        if i < 2 {
            Slice::from(..)
        } else {
            let lo = (-b[i - 2]).max(0) as isize;
            let hi = x.shape()[i] as isize - ((-e[i - 2]).max(0) as isize);
            assert!(hi >= lo, "crop past the input");
            Slice::from(lo..hi)
        }
    });
    let mut shape = cropped.shape().to_vec();
    for a in 0..b.len() {
        shape[2 + a] += (b[a].max(0) + e[a].max(0)) as usize;
    }
    let mut out = ArrayD::zeros(IxDyn(&shape));
    out.slice_each_axis_mut(|ax| {
        let i = ax.axis.index();
        if i < 2 {
            Slice::from(..)
        } else {
            let lo = b[i - 2].max(0) as isize;
            Slice::from(lo..lo + cropped.shape()[i] as isize)
        }
    })
    .assign(&cropped);
    out
}

/// Direct convolution of `[1, C, spatial...]` (1 to 3 spatial axes), written independently of
/// the crate: explicit zero padding, then valid strided/dilated windows over flat buffers.
pub(crate) fn naive_conv(x: &ArrayD<f64>, w: &ArrayD<f64>, bias: Option<&ArrayD<f64>>, g: &Geo) -> ArrayD<f64> {
    let r = g.kernel.len();
    let (pb, pe): (Vec<i64>, Vec<i64>) = (0..r).map(|a| eff_pads(g, a, x.shape()[2 + a] as i64)).unzip();
    let xp = pad_signed(x, &pb, &pe);
    let c = xp.shape()[1];
    let (o, cg) = (w.shape()[0], w.shape()[1]);
    assert_eq!(cg * g.groups, c);
    let og = o / g.groups;
    let (mut l, mut k, mut s, mut d) = ([1usize; 3], [1usize; 3], [1usize; 3], [1usize; 3]);
    for a in 0..r {
        (l[a], k[a], s[a], d[a]) = (xp.shape()[2 + a], w.shape()[2 + a], g.strides[a], g.dilations[a]);
    }
    let out: Vec<usize> = (0..3)
        .map(|a| {
            let span = d[a] * (k[a] - 1) + 1;
            assert!(l[a] >= span, "empty convolution");
            (l[a] - span) / s[a] + 1
        })
        .collect();
    let xv: Vec<f64> = xp.iter().copied().collect();
    let wv: Vec<f64> = w.iter().copied().collect();
    let mut y = Vec::with_capacity(o * out.iter().product::<usize>());
    for oc in 0..o {
        let b0 = bias.map_or(0.0, |b| b[[oc]]);
        for y0 in 0..out[0] {
            for y1 in 0..out[1] {
                for y2 in 0..out[2] {
                    let mut acc = b0;
                    for cc in 0..cg {
                        let ci = (oc / og) * cg + cc;
                        for t0 in 0..k[0] {
                            let i0 = y0 * s[0] + t0 * d[0];
                            for t1 in 0..k[1] {
                                let i1 = y1 * s[1] + t1 * d[1];
                                for t2 in 0..k[2] {
                                    let i2 = y2 * s[2] + t2 * d[2];
                                    let xi = ((ci * l[0] + i0) * l[1] + i1) * l[2] + i2;
                                    let wi = (((oc * cg + cc) * k[0] + t0) * k[1] + t1) * k[2] + t2;
                                    acc += wv[wi] * xv[xi];
                                }
                            }
                        }
                    }
                    y.push(acc);
                }
            }
        }
    }
    let shape: Vec<usize> = [1, o].iter().chain(&out[..r]).copied().collect();
    ArrayD::from_shape_vec(IxDyn(&shape), y).unwrap()
}

/// x from the graph input.
pub(crate) fn pre_apply(bl: &Block, built: &Built, input: &ArrayD<f64>) -> ArrayD<f64> {
    let p = &built.pre;
    let r = bl.rank();
    match bl.pre {
        Pre::None => input.clone(),
        Pre::Relu => input.mapv(|v| v.max(0.0)),
        Pre::Mul => input * p.scale.as_ref().unwrap(),
        Pre::Conv | Pre::ConvBn => {
            let g = Geo {
                kernel: vec![1; r],
                strides: vec![1; r],
                dilations: vec![1; r],
                pads: vec![0; 2 * r],
                auto_pad: None,
                crop: None,
                pad: None,
                groups: 1,
                out: bl.cin,
            };
            let y = naive_conv(input, p.w.as_ref().unwrap(), p.b.as_ref(), &g);
            match &p.bn {
                Some(bn) => bn.apply(&y),
                None => y,
            }
        }
        Pre::Bn => p.bn.as_ref().unwrap().apply(input),
    }
}

/// The block's output on `x`, branch by branch (numpy broadcasting between branches).
pub(crate) fn reference(bl: &Block, built: &Built, x: &ArrayD<f64>) -> ArrayD<f64> {
    let mut acc: Option<ArrayD<f64>> = None;
    for (br, p) in bl.branches.iter().zip(&built.params) {
        let mut v = match &br.kind {
            Kind::Conv(g) => {
                let r = g.kernel.len();
                let mut xi = x.clone();
                if let Some((pb, pe)) = &g.pad {
                    xi = pad_signed(&xi, pb, pe);
                }
                if let Some((cb, ce)) = &g.crop {
                    let neg = |v: &Vec<i64>| v.iter().map(|&c| -c).collect::<Vec<_>>();
                    xi = pad_signed(&xi, &neg(cb), &neg(ce));
                }
                let _ = r;
                naive_conv(&xi, p.w.as_ref().unwrap(), p.b.as_ref(), g)
            }
            Kind::Identity => x.clone(),
            Kind::IdentityBn => p.bn.as_ref().unwrap().apply(x),
        };
        if matches!(br.kind, Kind::Conv(_)) {
            if let Some(bn) = &p.bn {
                v = bn.apply(&v);
            }
        }
        if let Some(s) = &p.scale {
            v = &v * s;
        }
        acc = Some(match acc {
            None => v,
            Some(a) => &a + &v,
        });
    }
    let mut acc = acc.unwrap();
    if let Some(c) = &built.const_bias {
        acc = &acc + c;
    }
    if let Some(bn) = &built.bn_after {
        acc = bn.apply(&acc);
    }
    acc
}

/// Output shape of every leaf as ONNX computes it, or why the graph is invalid.
pub(crate) fn leaf_shapes(bl: &Block) -> Result<Vec<Vec<usize>>, String> {
    let r = bl.rank();
    let mut out = Vec::new();
    for br in &bl.branches {
        let (c, sp) = match &br.kind {
            Kind::Conv(g) => {
                let mut sp = Vec::new();
                for a in 0..r {
                    let mut l = bl.input[a] as i64;
                    if let Some((pb, pe)) = &g.pad {
                        l += pb[a] + pe[a];
                        if l < 1 {
                            return Err(format!("{}: Pad leaves {l} on axis {a}", br.name));
                        }
                        // a negative pad may not crop past the padding added on the other side
                        if -pb[a] >= bl.input[a] as i64 || -pe[a] >= bl.input[a] as i64 {
                            return Err(format!("{}: Pad crops the whole axis {a}", br.name));
                        }
                    }
                    if let Some((cb, ce)) = &g.crop {
                        l -= cb[a] + ce[a];
                        if l < 1 {
                            return Err(format!("{}: Slice leaves {l} on axis {a}", br.name));
                        }
                    }
                    let (ep, ee) = eff_pads(g, a, l);
                    let span = l + ep + ee - g.dilations[a] as i64 * (g.kernel[a] as i64 - 1);
                    if span < 1 {
                        return Err(format!("{}: empty conv on axis {a}", br.name));
                    }
                    sp.push(((span - 1) / g.strides[a] as i64 + 1) as usize);
                }
                (g.out, sp)
            }
            _ => (bl.cin, bl.input.clone()),
        };
        let mut s = vec![1, c];
        s.extend(sp);
        out.push(s);
    }
    Ok(out)
}

/// numpy broadcast of the leaves (and the constant bias), or None.
pub(crate) fn broadcast(shapes: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = shapes.iter().map(|s| s.len()).max()?;
    let mut out = vec![1usize; n];
    for s in shapes {
        for (i, &d) in s.iter().enumerate() {
            let j = n - s.len() + i;
            if d != 1 {
                if out[j] != 1 && out[j] != d {
                    return None;
                }
                out[j] = d;
            }
        }
    }
    Some(out)
}
