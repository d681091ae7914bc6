//! Child modes: tract alone, and the library's phases.

use super::*;

pub(crate) fn parse_shape(s: &str) -> Vec<usize> {
    s.split(',').map(|d| d.trim().parse().expect("a shape like 1,3,224,224")).collect()
}

/// `n` standard normal inputs of `shape` (seeded), as the check draws them.
pub(crate) fn normal_inputs(shape: &[usize], n: usize, seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let len: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..len)
                .map(|_| {
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect();
            Tensor::from_shape(shape, &v).unwrap()
        })
        .collect()
}

/// Type (un-optimised, as the check) and run on every input: (type seconds, run seconds).
pub(crate) fn type_and_run(mut m: InferenceModel, shape: &[usize], inputs: &[Tensor]) -> (f64, f64) {
    let t0 = Instant::now();
    m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape.iter().copied())).unwrap();
    let plan = m.into_typed().unwrap().into_runnable().unwrap();
    let t1 = Instant::now();
    for x in inputs {
        let out = plan.run(tvec![x.clone().into_tvalue()]).unwrap();
        assert!(!out.is_empty());
    }
    ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64())
}

/// `--plain-tract SHAPE SAMPLES MODEL...`: for each model in turn, tract load + typed
/// (un-optimised) plan + SAMPLES runs; prints `load type run` seconds per model.
pub(crate) fn child_plain(args: &[String]) {
    let shape = parse_shape(&args[0]);
    let samples: usize = args[1].parse().unwrap();
    let inputs = normal_inputs(&shape, samples, 0);
    for p in &args[2..] {
        let t0 = Instant::now();
        let m = tract_onnx::onnx().model_for_path(p).unwrap();
        let load = t0.elapsed().as_secs_f64();
        let (ty, run) = type_and_run(m, &shape, &inputs);
        println!("{load} {ty} {run}");
    }
}

/// Every float32 constant of `m` moved one unit in the last place, up or down at random: the
/// noise criterion's perturbed reference (src/tract/perturb.rs moves the weights the same way).
pub(crate) fn perturb_consts(m: &mut InferenceModel, seed: u64) {
    use tract_onnx::tract_core::ops::konst::Const;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids: Vec<(String, usize)> = m
        .nodes()
        .iter()
        .filter(|n| n.op_as::<Const>().is_some_and(|c| c.val().datum_type() == f32::datum_type()))
        .map(|n| (n.name.clone(), n.id))
        .collect();
    ids.sort();
    for (_, id) in ids {
        let node = m.node_mut(id);
        let t = node.op_as::<Const>().unwrap().val().clone();
        let v: Vec<f32> = t
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|&x| {
                let up: bool = rng.random();
                if x == 0.0 || !x.is_finite() {
                    x
                } else {
                    f32::from_bits((x.to_bits() as i64 + if up { 1 } else { -1 }) as u32)
                }
            })
            .collect();
        let p = Tensor::from_shape(t.shape(), &v).unwrap().into_arc_tensor();
        node.outputs[0].fact = InferenceFact::from(TypedFact::try_from(p.clone()).unwrap());
        node.op = Box::new(Const::new(p).unwrap());
    }
}

/// `--noise-tract SHAPE SAMPLES DRAWS MODEL`: load the reference once (`load S`), then DRAWS
/// times: a perturbed copy, typed and run on SAMPLES inputs (`draw perturb type run`).
pub(crate) fn child_noise(args: &[String]) {
    let shape = parse_shape(&args[0]);
    let samples: usize = args[1].parse().unwrap();
    let draws: usize = args[2].parse().unwrap();
    let inputs = normal_inputs(&shape, samples, 0);
    let t0 = Instant::now();
    let m = tract_onnx::onnx().model_for_path(&args[3]).unwrap();
    println!("load {}", t0.elapsed().as_secs_f64());
    for k in 0..draws {
        let t0 = Instant::now();
        let mut p = m.clone();
        perturb_consts(&mut p, 0x9e37_79b9 + k as u64);
        let perturb = t0.elapsed().as_secs_f64();
        let (ty, run) = type_and_run(p, &shape, &inputs);
        println!("draw {perturb} {ty} {run}");
    }
}

/// `--batch-tract SHAPE SAMPLES MODEL`: the model's SAMPLES runs as the check makes them (rounds of
/// one per core; a last round of fewer spreads each run's matrix products over the cores left
/// over) and as one run of the samples stacked on axis 0 (its matrix products on every core);
/// each with its plan typed (un-optimised) first; prints `rounds batched` seconds.
pub(crate) fn child_batch(args: &[String]) {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let shape = parse_shape(&args[0]);
    let samples: usize = args[1].parse().unwrap();
    let m = tract_onnx::onnx().with_ignore_value_info(true).model_for_path(&args[2]).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan_of = |n: usize| {
        let mut m = m.clone();
        let mut s = shape.clone();
        s[0] *= n;
        m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), s)).unwrap();
        m.into_typed().unwrap().into_runnable().unwrap()
    };
    let on = |threads: usize, f: &(dyn Fn() + Sync)| {
        if threads > 1 {
            multithread_tract_scope(Executor::multithread(threads), f)
        } else {
            f()
        }
    };
    let inputs = normal_inputs(&shape, samples, 0);
    let t = Instant::now();
    let plan = plan_of(1);
    for round in inputs.chunks(cores) {
        let per_run = cores / round.len();
        std::thread::scope(|scope| {
            for x in round {
                let plan = &plan;
                let on = &on;
                scope.spawn(move || {
                    on(per_run, &|| assert!(!plan.run(tvec![x.clone().into_tvalue()]).unwrap().is_empty()))
                });
            }
        });
    }
    let rounds = t.elapsed().as_secs_f64();
    drop(plan);
    let t = Instant::now();
    let plan = plan_of(samples);
    let x = Tensor::stack_tensors(0, &inputs).unwrap();
    on(cores, &|| assert!(!plan.run(tvec![x.clone().into_tvalue()]).unwrap().is_empty()));
    println!("{rounds} {}", t.elapsed().as_secs_f64());
}

/// `--phases verify|no-verify IN OUT`: `acnet_onnx::fuse_file_with` (what the CLI runs), timed at
/// its events; prints `key value` lines (see [`Phases`]).
pub(crate) fn child_phases(args: &[String]) {
    let opts = FuseOptions { no_verify: args[0] == "no-verify", ..Default::default() };
    let t0 = Instant::now();
    let mut marks: Vec<(&'static str, f64)> = vec![];
    let res = fuse_file_with(Path::new(&args[1]), Path::new(&args[2]), &opts, &mut |e| {
        let at = t0.elapsed().as_secs_f64();
        match e {
            Event::Fused(_) => marks.push(("fused", at)),
            Event::Checked(_) => marks.push(("checked", at)),
            Event::Wrote(_) => marks.push(("wrote", at)),
            _ => {}
        }
    });
    let total = t0.elapsed().as_secs_f64();
    let r = match res {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", acnet_onnx::one_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    let at = |k: &str| marks.iter().find(|m| m.0 == k).map(|m| m.1);
    let fused = at("fused").unwrap_or(f64::NAN);
    println!("rewrite {fused}");
    if let Some(c) = at("checked") {
        println!("check {}", c - fused);
    }
    println!("write {}", at("wrote").unwrap_or(total) - at("checked").unwrap_or(fused));
    println!("total {total}");
    println!("merged {}", r.fuse.blocks_merged);
    println!("folded {}", r.fuse.bns_folded);
    println!("refused {}", r.fuse.refused.len());
    if let Some(c) = &r.check {
        println!("passed {}", c.passed);
    }
}

/// One run of `fuse_file_with` in a child process, timed at its events.
#[derive(Clone, Debug, Default)]
pub(crate) struct Phases {
    /// load + validate + rewrite (start to the `Fused` event)
    pub(crate) rewrite: f64,
    /// stage + check (`Fused` to `Checked`), with the check
    pub(crate) check: Option<f64>,
    /// stage + commit (without the check) or commit (with it)
    pub(crate) write: f64,
    pub(crate) total: f64,
    pub(crate) merged: usize,
    pub(crate) folded: usize,
    pub(crate) refused: usize,
    pub(crate) passed: Option<bool>,
}

pub(crate) fn phases(verify: bool, input: &Path, output: &Path, timeout: Duration) -> Result<Phases, String> {
    remove_model(output);
    settle();
    let (s, out) = run_self(
        &[
            "--phases".as_ref(),
            if verify { "verify" } else { "no-verify" }.as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ],
        timeout,
    );
    s.time()?;
    let mut p = Phases::default();
    for l in out.lines() {
        let Some((k, v)) = l.split_once(' ') else { continue };
        let f = || v.parse::<f64>().unwrap_or(f64::NAN);
        let u = || v.parse::<usize>().unwrap_or(0);
        match k {
            "rewrite" => p.rewrite = f(),
            "check" => p.check = Some(f()),
            "write" => p.write = f(),
            "total" => p.total = f(),
            "merged" => p.merged = u(),
            "folded" => p.folded = u(),
            "refused" => p.refused = u(),
            "passed" => p.passed = Some(v == "true"),
            _ => {}
        }
    }
    Ok(p)
}
