//! The merge of a group with every branch's weight read in f64: the identity (through a
//! BatchNormalization) as a one-tap kernel, each branch's constant factors applied.

use super::branch::{base_key, load_conv, place, Branch, Kind, SourceSize};
use super::constants::channel_vector;
use super::{kernel_label, Cx, Merged, Reason};
use crate::graph::{Exact, Label};
use crate::kernel::read::{read_bn, ReadError};
use crate::kernel::AffineConv;
use crate::model::tensor::FloatType;
use ndarray::Array1;

/// [`merge`](super::merge), reading every branch's weight in f64.
pub(super) fn merge_values(cx: &Cx, group: &[&Branch]) -> Result<Merged, Reason> {
    let size = SourceSize::new(cx, &group[0].source);
    let mut loaded: Vec<Option<(AffineConv, FloatType)>> = Vec::with_capacity(group.len());
    let mut sized = Vec::with_capacity(group.len());
    for b in group {
        loaded.push(match b.kind {
            Kind::Conv { conv, through } => {
                let (k, ft, s) = load_conv(cx, conv, through, &size)
                    .map_err(|err| Reason::Conv { conv: cx.node(conv).label().to_string(), err })?;
                sized.push(s);
                Some((k, ft))
            }
            Kind::Chain { first, through, second } => {
                sized.push(false);
                Some(load_chain(cx, first, through, second)?)
            }
            Kind::Identity { .. } => {
                sized.push(false);
                None
            }
        });
    }
    // the largest window, then the most taps (the first of equal ones; never a chain: a Conv of
    // the group holds it)
    let key = |l: &Option<(AffineConv, FloatType)>| l.as_ref().map(|(c, _)| base_key(&c.geometry()));
    let chain = |k: usize| matches!(group[k].kind, Kind::Chain { .. });
    let mut base: Option<usize> = None;
    for k in 0..loaded.len() {
        if key(&loaded[k]).is_some() && !chain(k) && base.is_none_or(|j| key(&loaded[k]) > key(&loaded[j])) {
            base = Some(k);
        }
    }
    let bi = base.ok_or(Reason::NoConv)?;
    let (big, ft) = loaded[bi].as_ref().expect("the base is a loaded Conv");
    let ft = *ft;
    if big.crop_begin.iter().chain(&big.crop_end).any(|&c| c != 0) {
        return Err(Reason::CroppedBase {
            branch: group[bi].leaf.clone(),
            crop_begin: big.crop_begin.clone(),
            crop_end: big.crop_end.clone(),
        });
    }
    let kernels = loaded.iter().map(|l| l.as_ref().map(|(c, _)| kernel_label(c.kernel(), &c.dilations))).collect();
    let base_pads = (!sized[bi]).then(|| (big.pads_begin.clone(), big.pads_end.clone()));
    // the sum: the base, plus every other branch in order
    let mut acc = loaded[bi].take().expect("the base is a loaded Conv").0;
    scale(&mut acc, group[bi])?;
    for (j, (b, l)) in group.iter().zip(loaded.iter_mut()).enumerate() {
        if j == bi {
            continue;
        }
        let (mut k, kft) = match (l.take(), &b.kind) {
            (Some(v), _) => v,
            (None, Kind::Identity { bn }) => identity(cx, &acc, b, *bn, ft)?,
            (None, Kind::Conv { .. } | Kind::Chain { .. }) => unreachable!("every Conv branch was loaded"),
        };
        if kft != ft {
            return Err(Reason::BranchDtypes);
        }
        scale(&mut k, b)?;
        let at = place(&k.geometry(), &acc.geometry(), &size)
            .map_err(|misfit| Reason::Misfit { branch: b.leaf.clone(), misfit })?;
        acc.add_at(&k, &at);
    }
    let pads = (acc.pads_begin.clone(), acc.pads_end.clone());
    Ok(Merged {
        members: vec![],
        dims: acc.weight.shape().to_vec(),
        weight: Exact::Values(acc.weight),
        bias: acc.bias,
        pads,
        ft,
        base: bi,
        kernels,
        base_pads,
    })
}

/// An identity branch (through its BatchNormalization, if any) as a one-tap kernel in `acc`'s
/// channels and groups, with its dtype (`ft` when there is no BatchNormalization).
fn identity(cx: &Cx, acc: &AffineConv, b: &Branch, bn: Option<usize>, ft: FloatType) -> Result<(AffineConv, FloatType), Reason> {
    if acc.out_channels() != acc.in_channels() {
        return Err(Reason::IdentityChannels {
            branch: b.leaf.clone(),
            inputs: acc.in_channels(),
            outputs: acc.out_channels(),
        });
    }
    let mut id = AffineConv::identity(acc.out_channels(), acc.groups, acc.rank());
    let Some(bn) = bn else { return Ok((id, ft)) };
    let n = cx.node(bn);
    let (p, bft) = read_bn(&cx.consts, n).map_err(|err| Reason::IdentityBn { bn: n.label().to_string(), err })?;
    if p.scale.len() != acc.out_channels() {
        return Err(Reason::IdentityBnChannels(p.scale.len()));
    }
    id.fold_bn(&p);
    Ok((id, bft))
}

/// Apply a branch's constant per-channel factors to its kernel.
fn scale(k: &mut AffineConv, b: &Branch) -> Result<(), Reason> {
    for sc in &b.scales {
        let a = channel_vector(sc, k.out_channels(), k.rank())
            .ok_or_else(|| Reason::NotPerChannel { branch: b.leaf.clone(), shape: sc.shape().to_vec() })?;
        k.then_affine(&a, &Array1::zeros(a.len()));
    }
    Ok(())
}

/// A chain's composition (see [`super::chain`]), or why it cannot be read or composed.
pub(super) fn load_chain(
    cx: &Cx,
    first: usize,
    through: Option<usize>,
    second: usize,
) -> Result<(AffineConv, FloatType), Reason> {
    let read = |conv: usize, through| {
        load(cx, conv, through).map_err(|err| Reason::Conv { conv: cx.node(conv).label().to_string(), err })
    };
    let ((k1, f1), (k2, f2)) = (read(first, through)?, read(second, None)?);
    if f1 != f2 {
        return Err(Reason::BranchDtypes);
    }
    let (first, second) = (cx.node(first).label().to_string(), cx.node(second).label().to_string());
    let k = k1.then_conv(&k2).map_err(|misfit| Reason::Sequential { first, second, misfit })?;
    Ok((k, f2))
}

/// A Conv's geometry and weights (the crop or padding it reads through, `through`, included; an
/// `auto_pad` that pads by the input size resolved at the size of what it reads, when fixed).
pub(super) fn load(cx: &Cx, conv: usize, through: Option<usize>) -> Result<(AffineConv, FloatType), ReadError> {
    let n = cx.node(conv);
    let source = match through {
        Some(q) => cx.node(q).input.first().cloned().unwrap_or_default(),
        None => n.input.first().cloned().unwrap_or_default(),
    };
    let size = SourceSize::new(cx, &source);
    load_conv(cx, conv, through, &size).map(|(k, ft, _)| (k, ft))
}
