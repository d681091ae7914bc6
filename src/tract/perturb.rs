//! The noise criterion's perturbed references: a model with every weight moved by one rounding
//! of the type it is stored in, in a random direction per element, drawn from a seed.
//!
//! The directions come in chunks of [`CHUNK`] elements, each chunk with its own generator (one
//! bit per element), so a tensor is moved on every core and the result does not depend on how
//! many there are. A weight evaluated in its stored type moves by one whole unit in the last
//! place, which is exactly undone by moving it back: [`perturb_in_place`] draws after draw
//! from one copy of the weights, undoing the previous draw as it applies the next.

use super::errors::{chain_msg, panic_msg};
use super::load::Loaded;
use crate::error::{catch, Error};
use crate::model::tensor::FloatType;
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;

/// Elements per stream of directions.
const CHUNK: usize = 1 << 16;

/// The directions of one chunk: a generator seeded by the tensor's seed and the chunk's index.
struct Directions {
    rng: rand::rngs::StdRng,
}

impl Directions {
    fn new(seed: u64, chunk: usize) -> Directions {
        Directions { rng: rand::rngs::StdRng::seed_from_u64(seed ^ (chunk as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)) }
    }

    /// The directions of the next 64 elements (bit i: element i goes up).
    fn word(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// One direction (true: up) and a uniform fraction in [0, 1), for one element moved by part
    /// of a unit (the upcast case).
    fn partial(&mut self) -> (bool, f64) {
        let w = self.rng.next_u64();
        (w & 1 == 1, (w >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// A float type whose values move by one unit in the last place through their bits.
trait Ulp: Datum + Copy + Send + Sync {
    /// Finite and not zero: a value that moves (zero and non-finite values stay).
    fn moves(self) -> bool;
    fn positive(self) -> bool;
    /// The value `d` units in the last place further from zero (nearer for negative `d`).
    fn away(self, d: i64) -> Self;
    /// One unit from zero (the smallest subnormal) or from infinity (the largest finite): a step
    /// could make it stop moving, and then it could not be undone.
    fn at_edge(self) -> bool;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// `self` moved one unit up (`up`) or down; with `undo`, the move `up` names undone instead.
    /// Zero and non-finite values stay. Branch-free on the bits.
    fn step(self, up: bool, undo: bool) -> Self;
}

macro_rules! ulp {
    ($t:ty, $bits:ty, $sign:expr, $inf:expr, $max:expr, $to:expr, $from:expr, $tof64:expr, $fromf64:expr) => {
        impl Ulp for $t {
            fn moves(self) -> bool {
                let m = $to(self) & !$sign;
                m != 0 && m < $inf
            }
            fn positive(self) -> bool {
                $to(self) & $sign == 0 && self.moves()
            }
            fn away(self, d: i64) -> Self {
                $from(($to(self) as i64 + d) as $bits)
            }
            fn at_edge(self) -> bool {
                let m = $to(self) & !$sign;
                m == 1 || m == $max
            }
            fn to_f64(self) -> f64 {
                $tof64(self)
            }
            fn from_f64(v: f64) -> Self {
                $fromf64(v)
            }
            #[inline(always)]
            fn step(self, up: bool, undo: bool) -> Self {
                let b = $to(self);
                let m = b & !$sign;
                let moves = m != 0 && m < $inf;
                let negative = b & $sign != 0;
                // away from zero when the move goes up on a positive value or down on a negative
                // one; undoing goes the other way
                let away = (up != negative) != undo;
                let d: $bits = if away { 1 } else { <$bits>::MAX };
                $from(if moves { b.wrapping_add(d) } else { b })
            }
        }
    };
}

ulp!(f32, u32, 0x8000_0000, 0x7f80_0000, 0x7f7f_ffff, f32::to_bits, f32::from_bits, |v: f32| v as f64, |v: f64| v
    as f32);
ulp!(
    f64,
    u64,
    0x8000_0000_0000_0000,
    0x7ff0_0000_0000_0000,
    0x7fef_ffff_ffff_ffff,
    f64::to_bits,
    f64::from_bits,
    |v: f64| v,
    |v: f64| v
);
ulp!(f16, u16, 0x8000, 0x7c00, 0x7bff, f16::to_bits, f16::from_bits, f16::to_f64, f16::from_f64);

/// Move every element of `data` by one unit up or down as `seed` draws, after undoing the move
/// `undo` drew (when given).
fn move_all<T: Ulp>(data: &mut [T], undo: Option<u64>, seed: u64) {
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        let mut old = undo.map(|u| Directions::new(u, c));
        let mut new = Directions::new(seed, c);
        for block in part.chunks_mut(64) {
            let old_bits = old.as_mut().map(|o| o.word());
            let new_bits = new.word();
            match old_bits {
                Some(ob) => {
                    for (i, x) in block.iter_mut().enumerate() {
                        *x = x.step((ob >> i) & 1 == 1, true).step((new_bits >> i) & 1 == 1, false);
                    }
                }
                None => {
                    for (i, x) in block.iter_mut().enumerate() {
                        *x = x.step((new_bits >> i) & 1 == 1, false);
                    }
                }
            }
        }
    });
}

/// `values` stored in a narrower type `ft` (half precision evaluated as float32) moved by a
/// random fraction of half a unit of `ft` up or down, as rounding to `ft` would.
fn move_upcast<T: Ulp>(values: &[T], ft: FloatType, seed: u64) -> Vec<T> {
    // `v` moved `d` units of `ft` away from zero
    let away = |v: f64, d: i64| -> f64 {
        match ft {
            FloatType::F16 => f16::from_f64(v).away(d).to_f64(),
            FloatType::BF16 => {
                let b = half::bf16::from_f64(v);
                half::bf16::from_bits((b.to_bits() as i64 + d) as u16).to_f64()
            }
            FloatType::F32 => (v as f32).away(d) as f64,
            FloatType::F64 => v.away(d),
        }
    };
    let chunks: Vec<Vec<T>> = values
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, part)| {
            let mut d = Directions::new(seed, c);
            part.iter()
                .map(|&x| {
                    if !x.moves() {
                        return x;
                    }
                    let v = x.to_f64();
                    let (up, fraction) = d.partial();
                    let next = away(v, if up == x.positive() { 1 } else { -1 });
                    T::from_f64(v + (next - v) * 0.5 * fraction)
                })
                .collect()
        })
        .collect();
    chunks.concat()
}

/// Whether a tensor of type `dt` stored as `ft` moves by whole units of its own type.
fn whole_units(dt: DatumType, ft: FloatType) -> bool {
    matches!(
        (dt, ft),
        (DatumType::F32, FloatType::F32) | (DatumType::F64, FloatType::F64) | (DatumType::F16, FloatType::F16)
    )
}

/// `t` (stored as `ft`) with every element moved, as `seed` draws; other types unchanged.
fn perturbed(t: &Tensor, ft: FloatType, seed: u64) -> TractResult<Tensor> {
    let dt = t.datum_type();
    if whole_units(dt, ft) {
        let mut t = t.clone();
        move_tensor(&mut t, None, seed)?;
        return Ok(t);
    }
    let view = t.try_as_plain_ram()?;
    match dt {
        DatumType::F32 => Tensor::from_shape(t.shape(), &move_upcast(view.as_slice::<f32>()?, ft, seed)),
        DatumType::F64 => Tensor::from_shape(t.shape(), &move_upcast(view.as_slice::<f64>()?, ft, seed)),
        _ => Ok(t.clone()),
    }
}

/// [`move_all`] on a float tensor of F32, F64 or F16.
fn move_tensor(t: &mut Tensor, undo: Option<u64>, seed: u64) -> TractResult<()> {
    let dt = t.datum_type();
    let mut view = t.try_as_plain_ram_mut()?;
    match dt {
        DatumType::F32 => move_all(view.as_slice_mut::<f32>()?, undo, seed),
        DatumType::F64 => move_all(view.as_slice_mut::<f64>()?, undo, seed),
        DatumType::F16 => move_all(view.as_slice_mut::<f16>()?, undo, seed),
        _ => {}
    }
    Ok(())
}

/// Whether every element of `t` can be moved and moved back exactly.
fn undoable(t: &Tensor) -> bool {
    let Ok(view) = t.try_as_plain_ram() else { return false };
    match t.datum_type() {
        DatumType::F32 => view.as_slice::<f32>().is_ok_and(none_at_edge),
        DatumType::F64 => view.as_slice::<f64>().is_ok_and(none_at_edge),
        DatumType::F16 => view.as_slice::<f16>().is_ok_and(none_at_edge),
        _ => false,
    }
}

/// No element of `s` is [at the edge](Ulp::at_edge): a chunk at a time on every core, each
/// chunk looked at whole (no branch per element).
fn none_at_edge<T: Ulp>(s: &[T]) -> bool {
    !s.par_chunks(CHUNK).any(|c| c.iter().fold(false, |a, v| a | v.at_edge()))
}

/// The Const nodes of `model` named in `which`, in name order (each draws its directions from
/// its own seed, [`const_seed`]).
fn weight_consts(model: &InferenceModel, which: &HashMap<String, FloatType>) -> Vec<(String, usize)> {
    let mut ids: Vec<(String, usize)> = model
        .nodes()
        .iter()
        .filter(|n| n.op_as::<Const>().is_some() && which.contains_key(&n.name))
        .map(|n| (n.name.clone(), n.id))
        .collect();
    ids.sort();
    ids
}

/// The seed of the `k`-th constant's directions in the draw of `seed`.
fn const_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_add((k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Make node `id` (a Const) hold `t`.
fn set_const(model: &mut InferenceModel, id: usize, t: Tensor) -> TractResult<()> {
    let t = t.into_arc_tensor();
    let node = model.node_mut(id);
    node.outputs[0].fact = InferenceFact::from(TypedFact::try_from(t.clone())?);
    node.op = Box::new(Const::new(t)?);
    Ok(())
}

/// The tensor of Const node `id`, taken out of the model (a placeholder left in its place): no
/// copy when nothing else holds it.
fn take_const(model: &mut InferenceModel, id: usize) -> TractResult<Tensor> {
    let node = model.node_mut(id);
    let t = node.op_as::<Const>().expect("a Const").val().clone();
    node.op = Box::new(Const::new(rctensor0(0f32))?);
    node.outputs[0].fact = InferenceFact::default();
    Ok(Arc::try_unwrap(t).unwrap_or_else(|t| (*t).clone()))
}

/// Perturb the listed constants of `model` (see [`PlanSpec::perturb`](super::PlanSpec)).
pub(crate) fn perturb(model: &mut InferenceModel, which: &HashMap<String, FloatType>, seed: u64) -> TractResult<()> {
    for (k, (name, id)) in weight_consts(model, which).into_iter().enumerate() {
        let t = model.node(id).op_as::<Const>().expect("a Const").val().clone();
        let p = perturbed(&t, which[&name], const_seed(seed, k))?;
        set_const(model, id, p)?;
    }
    Ok(())
}

/// What [`perturb_in_place`] keeps between draws.
#[derive(Default)]
pub(crate) struct Draws {
    /// the seed of the draw the model holds now
    current: Option<u64>,
    /// the originals of the constants that cannot be moved back exactly (half precision
    /// evaluated upcast, or a value one unit from zero or infinity): perturbed copies of these
    kept: HashMap<String, Arc<Tensor>>,
}

/// Move the listed constants of `m` as [`PlanSpec::perturb`](super::PlanSpec) would with
/// `seed` (the same tensors, bit for bit), in place: the previous draw, if any, is undone as the
/// new one is applied, so one copy of the weights serves every draw (only those that cannot be
/// moved back exactly are kept aside). No plan of `m` may be alive while this runs (its tensors
/// would be copied instead of moved).
pub(crate) fn perturb_in_place(
    m: &mut Loaded,
    which: &HashMap<String, FloatType>,
    seed: u64,
    draws: &mut Draws,
) -> Result<(), Error> {
    let path = m.path.clone();
    let res = catch(|| -> TractResult<()> {
        let first = draws.current.is_none();
        for (k, (name, id)) in weight_consts(&m.model, which).into_iter().enumerate() {
            let ft = which[&name];
            if first {
                let t = m.model.node(id).op_as::<Const>().expect("a Const").val().clone();
                if !(whole_units(t.datum_type(), ft) && undoable(&t)) {
                    draws.kept.insert(name.clone(), t);
                }
            }
            let new = const_seed(seed, k);
            if let Some(kept) = draws.kept.get(&name) {
                let p = perturbed(kept, ft, new)?;
                set_const(&mut m.model, id, p)?;
            } else {
                let mut t = take_const(&mut m.model, id)?;
                move_tensor(&mut t, draws.current.map(|c| const_seed(c, k)), new)?;
                set_const(&mut m.model, id, t)?;
            }
        }
        draws.current = Some(seed);
        Ok(())
    });
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Run { path, msg: format!("cannot perturb the weights: {}", chain_msg(&e)) }),
        Err(p) => Err(Error::Run { path, msg: panic_msg(p) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draw_is_undone_exactly_and_the_next_equals_a_fresh_one() {
        let v: Vec<f32> = (0..200_000).map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 7 - 3)).collect();
        let fresh = |seed| {
            let mut a = v.clone();
            move_all(&mut a, None, seed);
            a
        };
        let mut a = v.clone();
        move_all(&mut a, None, 1);
        assert_eq!(a, fresh(1));
        assert!(a.iter().zip(&v).filter(|(x, y)| x != y).count() > v.len() * 9 / 10);
        move_all(&mut a, Some(1), 2);
        assert_eq!(a, fresh(2));
        assert_ne!(fresh(1), fresh(2));
    }

    #[test]
    fn values_next_to_zero_or_infinity_are_not_moved_in_place() {
        let t = tensor1(&[1.0f32, f32::from_bits(1), -2.0]);
        assert!(!undoable(&t));
        assert!(undoable(&tensor1(&[1.0f32, 0.0, f32::INFINITY, -3.5])));
        assert!(!undoable(&tensor1(&[f32::MAX])));
    }

    #[test]
    fn a_value_next_to_zero_or_infinity_is_found_in_any_chunk_of_a_large_tensor() {
        let n = 2 * CHUNK + 5;
        for at in [0, CHUNK - 1, CHUNK, n - 1] {
            for edge in [f32::from_bits(1), -f32::from_bits(1), f32::MAX, f32::MIN] {
                let mut v = vec![1.5f32; n];
                v[at] = edge;
                assert!(!undoable(&tensor1(&v)), "{edge:e} at {at}");
            }
        }
        assert!(undoable(&tensor1(&vec![1.5f32; n])));
        let mut h = vec![f16::from_f32(1.5); n];
        h[n - 1] = f16::from_bits(0x7bff);
        assert!(!undoable(&tensor1(&h)));
    }

    #[test]
    fn a_move_is_one_unit_in_the_last_place_each_way() {
        let mut a = vec![1.0f32; 1000];
        move_all(&mut a, None, 7);
        assert!(a.iter().all(|&x| x == 1.0f32.away(1) || x == 1.0f32.away(-1)));
        let ups = a.iter().filter(|&&x| x > 1.0).count();
        assert!((400..600).contains(&ups), "{ups}");
    }

    #[test]
    fn draws_in_place_are_the_perturbed_copies_of_the_stored_weights() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/resnet20/ts_fold.onnx");
        let mut m = super::super::load(&path).unwrap();
        let consts = |m: &InferenceModel| -> HashMap<String, Arc<Tensor>> {
            m.nodes().iter().filter_map(|n| n.op_as::<Const>().map(|c| (n.name.clone(), c.val().clone()))).collect()
        };
        let stored = consts(&m.model);
        let which: HashMap<String, FloatType> = stored
            .iter()
            .filter(|(_, t)| t.datum_type() == DatumType::F32 && t.len() > 1)
            .map(|(n, _)| (n.clone(), FloatType::F32))
            .collect();
        assert!(which.len() > 10);
        // one weight that cannot be moved back exactly: kept aside, perturbed from its original
        let (edge, _) = which.iter().next().map(|(n, t)| (n.clone(), *t)).unwrap();
        let id = m.model.nodes().iter().find(|n| n.name == edge).unwrap().id;
        let mut t = stored[&edge].as_ref().clone();
        t.try_as_plain_ram_mut().unwrap().as_slice_mut::<f32>().unwrap()[0] = f32::from_bits(1);
        set_const(&mut m.model, id, t).unwrap();
        let original = m.model.clone();
        let mut draws = Draws::default();
        for seed in [11, 12, 13] {
            perturb_in_place(&mut m, &which, seed, &mut draws).unwrap();
            let mut fresh = original.clone();
            perturb(&mut fresh, &which, seed).unwrap();
            let (a, b) = (consts(&m.model), consts(&fresh));
            for name in which.keys() {
                assert_eq!(a[name], b[name], "draw {seed}: {name}");
                assert_ne!(a[name], consts(&original)[name], "draw {seed}: {name} not moved");
            }
        }
        assert_eq!(draws.kept.len(), 1);
    }
}
