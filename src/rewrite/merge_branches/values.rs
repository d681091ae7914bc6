//! The merge of a group with every branch's weight read in f64: the identity (through a
//! BatchNormalization) as a one-tap kernel, each branch's constant factors applied.

use super::branch::{base_key, load_conv, place, Branch, Kind, SourceSize};
use super::constants::channel_vector;
use super::{kernel_label, Cx, Merged, Reason};
use crate::graph::{Exact, Label};
use crate::kernel::read::read_bn;
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
            Kind::Identity { .. } => {
                sized.push(false);
                None
            }
        });
    }
    // the largest window, then the most taps (the first of equal ones)
    let key = |l: &Option<(AffineConv, FloatType)>| l.as_ref().map(|(c, _)| base_key(&c.geometry()));
    let mut base: Option<usize> = None;
    for k in 0..loaded.len() {
        if key(&loaded[k]).is_some() && base.is_none_or(|j| key(&loaded[k]) > key(&loaded[j])) {
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
            (None, Kind::Conv { .. }) => unreachable!("every Conv branch was loaded"),
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
