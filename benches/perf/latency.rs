//! tract latency (in this process).

use super::*;

pub(crate) fn input_tensor() -> Tensor {
    let mut rng = StdRng::seed_from_u64(1);
    let v: Vec<f32> = (0..3 * 224 * 224).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    tract_ndarray::Array4::from_shape_vec((1, 3, 224, 224), v).unwrap().into_tensor()
}

/// Optimised tract latency of several models: every plan is built first (optimise seconds), then
/// the models are run in turns (round-robin, one warm-up round), so that a change in the
/// machine's load hits them all alike. Returns (optimise seconds, run seconds of each round) per
/// model.
pub(crate) fn tract_latency(paths: &[&Path], input: &Tensor, runs: usize) -> Vec<(f64, Vec<f64>)> {
    let mut plans = vec![];
    let mut preps = vec![];
    for path in paths {
        let t0 = Instant::now();
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, f32::fact([1usize, 3, 224, 224]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        preps.push(t0.elapsed().as_secs_f64());
        plans.push(plan);
    }
    let mut times: Vec<Vec<f64>> = vec![vec![]; plans.len()];
    for round in 0..=runs {
        for (plan, t) in plans.iter().zip(&mut times) {
            let t0 = Instant::now();
            plan.run(tvec![input.clone().into_tvalue()]).unwrap();
            if round > 0 {
                t.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    preps.into_iter().zip(times).collect()
}
