//! Performance benchmark of acnet-onnx: what issue 15 asks, each figure a ratio of two times (or
//! sizes) measured in the same run.
//!
//! ```sh
//! cargo bench --bench perf                            # ResNet-50 + ResNet-152, the block chain, latency
//! cargo bench --bench perf -- resnet50                # ResNet-50 only (and the chain, latency)
//! ACNET_BENCH_SECTIONS=chain cargo bench --bench perf # the block chain only
//! ACNET_BENCH_MODELS=big cargo bench --bench perf     # ResNet-152 at 3x width (~2.8 GB, ~10 GB of disk)
//! ```
//!
//! Sections (the Markdown tables it prints, in this order; `ACNET_BENCH_SECTIONS` or words on the
//! command line pick some: `fuse`, `check`, `chain`, `latency`):
//!
//! 1. **fuse** — per model and export style (ResNet-50 / ResNet-152 ACNet, BN folded and BN nodes,
//!    inline and external data): `acnet-onnx fuse --no-verify` wall time against a *durable copy*
//!    of the same bytes (`cat` of the `.onnx` and its `.data`, then fsync of each copy) and
//!    against the plain `cat` (coreutils copies with copy_file_range); peak RSS against the
//!    model's size. Targets: fuse <= 2x durable copy, peak <= 1.5x size.
//! 2. **check** — the default `acnet-onnx fuse` (with the check: 3 samples, the noise criterion)
//!    against the *plain inferences* the check needs, run one after the other in a fresh process
//!    (this binary, `--plain-tract`): tract load + `into_typed().into_runnable()` (un-optimised,
//!    as the check) + 3 runs, for the reference and then for the fused model. Reported
//!    separately: the *noise inferences* the criterion adds (`--noise-tract`: a perturbed copy of
//!    the already loaded reference, every float constant moved one ulp, typed and run on the 3
//!    samples, twice). Peak RSS of the default fuse and of `acnet-onnx verify` against the two
//!    models' combined size. Targets: fuse <= 1.5x plain inferences, peak <= 1.25x combined.
//!    Also, once per model (`--batch-tract`): the reference's samples in rounds of one per core
//!    against one run of the samples stacked on axis 0 (the check stacks them when the weights
//!    are at least 4x what a run computes: the at-scale model, not the ResNets at 224x224).
//! 3. **chain** — a chain of tiny ACNet blocks (4 channels, 8x8 input; per block a 3x3, a 3x1 and
//!    a 1x3 conv with bias, `Add(Add(sq, ver), hor)`, `Relu`) at `ACNET_BENCH_CHAIN` blocks
//!    (default 1000,4000,16000): `fuse --no-verify` wall time per block. Target: time per block
//!    within 2x across the sizes (largest / smallest per-block time). Runs longer than
//!    `ACNET_BENCH_TIMEOUT` seconds are killed and reported as `timeout` (larger sizes are then
//!    skipped).
//! 4. **at scale** (opt-in: `ACNET_BENCH_MODELS=big` or `resnet152x3`) — a ResNet-152 ACNet at 3x
//!    width, BN nodes, external data (~2.8 GB), input Bx3x64x64: sections 1 and 2 on it.
//!    Generated streaming (weights written to the data file as they are drawn). Needs ~10 GB in
//!    the models folder and ~8 GB of RAM for the check.
//! 5. **latency** — tract latency (`into_optimized`, batch 1, 224x224) of the ACNet, fused and
//!    baseline models, run in turns. Target: fused within 5% of the baseline.
//!
//! Then a `targets` list: met / MISSED and the worst ratio of each target, and the machine (cores,
//! CPU, RAM, kernel, file system of the models folder, load average at the start and the end).
//!
//! How it measures: the release binary runs as a child process (spawn to exit), wrapped in GNU
//! time for its `%M` peak RSS when `/usr/bin/time` works (else the highest VmHWM polled from
//! /proc); the `cat` copies are wrapped the same way, so both pay the same process start. Every
//! timed run starts after a `sync`, so no write-back of an earlier run competes with it. Each
//! figure is the median of `ACNET_BENCH_RUNS` runs (chain runs longer than 20 s are not
//! repeated). The rows' phases (`load+rewrite`, `stage+check`, `write`) come from one extra run
//! of `acnet_onnx::fuse_file_with` in a child process (this binary, `--phases`), timed at its
//! events.
//!
//! Environment:
//! * `ACNET_BENCH_MODELS` — `resnet50`, `resnet152`, `big` (= `resnet152x3`), comma-separated, or
//!   `none` (default `resnet50,resnet152`); model names on the command line add to it.
//! * `ACNET_BENCH_SECTIONS` — `fuse,check,chain,latency` (default all).
//! * `ACNET_BENCH_CHAIN` — block counts of the chain (default `1000,4000,16000`; `none` skips).
//! * `ACNET_BENCH_RUNS` — repetitions of each timed child (default 3, median taken).
//! * `ACNET_BENCH_LATENCY_RUNS` — timed rounds of tract runs (default 9, after a warm-up round).
//! * `ACNET_BENCH_TIMEOUT` — seconds before a child is killed (default 300; 4x for the big model).
//! * `ACNET_BENCH_DIR` — where models are generated (default `<target>/bench-models`).
//! * `ACNET_BENCH_REGEN=1` — regenerate the models even if a previous run left them.
//!
//! Not part of `cargo test`: the target has `test = false`, and the binary does nothing unless
//! cargo bench's `--bench` flag is on its command line.
//!
//! Code: `generate` (the models), `measure` (child processes: time and peak RSS), `child` (the
//! child modes: tract alone, the library's phases), `latency` (tract in this process), `sections`
//! (each section's rows), `report` (tables, targets, the machine); `main` picks what to run.

#[path = "../../tests/support/mod.rs"]
mod support;

mod child;
mod generate;
mod latency;
mod measure;
mod report;
mod sections;

use acnet_onnx::proto::{
    tensor_proto::{DataLocation, DataType},
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    ValueInfoProto,
};
use acnet_onnx::{fuse_file_with, save, DataMode, Event, FuseOptions, Model};

use bytes::Bytes;
use child::*;
use generate::*;
use latency::*;
use measure::*;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use report::*;
use sections::*;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::{attr_float, attr_int, attr_ints, tensor_info};
use tract_onnx::prelude::*;

/// Bump when the generated ResNets change, so that cached models are regenerated.
const GEN_VERSION: u32 = 2;

/// The same for the block chain and the 3x-width ResNet-152.
const CHAIN_VERSION: u32 = 1;

const BIG_VERSION: u32 = 2;

const SEED: u64 = 0xAC_4E7;

const BIN: &str = env!("CARGO_BIN_EXE_acnet-onnx");

/// What the check runs by default (see src/verify/mod.rs): 3 samples, 2 perturbed references.
const CHECK_SAMPLES: usize = 3;

const NOISE_DRAWS: usize = 2;

/// Chain runs longer than this are not repeated (nor run again for their phases).
const CHAIN_REPEAT_LIMIT: f64 = 20.0;

const SECTIONS: [&str; 4] = ["fuse", "check", "chain", "latency"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(|s| s.as_str()) {
        Some("--plain-tract") => return child_plain(&args[1..]),
        Some("--noise-tract") => return child_noise(&args[1..]),
        Some("--phases") => return child_phases(&args[1..]),
        Some("--batch-tract") => return child_batch(&args[1..]),
        _ => {}
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without --bench: nothing to do
        println!("perf: run with `cargo bench --bench perf` (skipped)");
        return;
    }
    // what to run: models and sections, from the environment and the command line
    let mut archs: Vec<Arch> = vec![];
    let mut no_models = false;
    let mut sections: Vec<&str> = vec![];
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let (models_env, sections_env) = (env("ACNET_BENCH_MODELS"), env("ACNET_BENCH_SECTIONS"));
    let words = models_env.split(',').chain(sections_env.split(',')).chain(args.iter().map(|s| s.as_str()));
    for w in words {
        let w = w.trim().to_lowercase().replace(['-', '_'], "");
        let arch = match w.as_str() {
            "resnet50" | "50" | "quick" => Some(Arch::ResNet50),
            "resnet152" | "152" => Some(Arch::ResNet152),
            "resnet152x3" | "big" | "scale" => Some(Arch::ResNet152x3),
            "none" => {
                no_models = true;
                None
            }
            "" | "bench" => None,
            s => {
                if let Some(s) = SECTIONS.iter().find(|x| **x == s) {
                    if !sections.contains(s) {
                        sections.push(s);
                    }
                } else {
                    eprintln!("perf: ignoring {s:?} (models: resnet50, resnet152, big, none; sections: {SECTIONS:?})");
                }
                None
            }
        };
        if let Some(a) = arch.filter(|a| !archs.contains(a)) {
            archs.push(a);
        }
    }
    if archs.is_empty() && !no_models {
        archs = vec![Arch::ResNet50, Arch::ResNet152];
    }
    // the big model last: it is the slowest
    archs.sort_by_key(|a| a.big());
    if sections.is_empty() {
        sections = SECTIONS.to_vec();
    }
    let on = |s: &str| sections.contains(&s);
    let chain_sizes: Vec<usize> = {
        let s = std::env::var("ACNET_BENCH_CHAIN").unwrap_or_else(|_| "1000,4000,16000".into());
        s.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > 0).collect()
    };
    let dir = std::env::var_os("ACNET_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("bench-models"));
    std::fs::create_dir_all(&dir).unwrap();
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = Config {
        runs: env_usize("ACNET_BENCH_RUNS", 3),
        lat_runs: env_usize("ACNET_BENCH_LATENCY_RUNS", 9),
        timeout: Duration::from_secs(env_usize("ACNET_BENCH_TIMEOUT", 300) as u64),
        work,
    };
    let machine_lines = machine(&dir);
    for l in &machine_lines {
        eprintln!("perf: {}", &l[2..]);
    }
    eprintln!(
        "perf: models {:?}, sections {:?}, chain {:?}; {} run(s) each, {} latency round(s), timeout {} s; binary {BIN}",
        archs.iter().map(|a| a.name()).collect::<Vec<_>>(),
        sections,
        chain_sizes,
        cfg.runs,
        cfg.lat_runs,
        cfg.timeout.as_secs()
    );
    let load_start = loadavg();
    let busy = load_start.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l > 0.5);
    if busy {
        eprintln!("perf: warning: load average {load_start} at the start; other processes will skew the timings");
    }

    let t_all = Instant::now();
    let input = input_tensor();
    let (mut fuse_rows, mut check_rows, mut lat_rows) = (vec![], vec![], vec![]);
    let model_sections = on("fuse") || on("check") || on("latency");
    for &arch in archs.iter().filter(|_| model_sections) {
        let models = generate(&dir, arch);
        for v in &models.acnet {
            if on("fuse") {
                fuse_rows.push(section_fuse(&cfg, v));
            }
        }
        for v in &models.acnet {
            if on("check") && ensure_fused(&cfg, v) {
                check_rows.push(section_check(&cfg, v));
            }
        }
        if on("latency") {
            lat_rows.extend(section_latency(&cfg, &models, &input));
        }
        for v in &models.acnet {
            remove_model(&fused_path(&cfg, v));
        }
    }
    let chain_rows =
        if on("chain") && !chain_sizes.is_empty() { section_chain(&cfg, &dir, &chain_sizes) } else { vec![] };

    // ------------------------------------------------------------------ report
    let mut t_fuse = Target::new("`fuse --no-verify` / durable copy (ResNet-50/152, every style)", 2.0);
    let mut t_fuse_mem = Target::new("`fuse --no-verify` peak RSS / model size", 1.5);
    let mut t_check = Target::new("default `fuse` / its plain inferences", 1.5);
    let mut t_check_mem = Target::new("default `fuse` peak RSS / the two models' size", 1.25);
    let mut t_chain = Target::new(
        format!(
            "chain: time per block, slowest / fastest ({} blocks)",
            chain_sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" / ")
        ),
        2.0,
    );
    let mut t_big = Target::new("at scale: `fuse --no-verify` / durable copy (ResNet-152 3x width, 2.8 GB)", 2.0);
    let mut t_big_mem = Target::new("at scale: `fuse --no-verify` peak RSS / model size", 1.5);
    let mut t_big_check = Target::new("at scale: default `fuse` / its plain inferences (64x64)", 1.5);
    let mut t_big_check_mem = Target::new("at scale: default `fuse` peak RSS / the two models' size", 1.25);
    let mut t_lat = Target::new("fused latency / baseline latency (tract optimised)", 1.05);

    println!();
    println!("# acnet-onnx perf");
    println!();
    for l in &machine_lines {
        println!("{l}");
    }
    println!("- load average (1/5/15 min): {load_start} at the start, {} at the end", loadavg());
    println!(
        "- each figure: median of {} run(s) (each after `sync`); latency: median of {} round(s); timeout {} s",
        cfg.runs,
        cfg.lat_runs,
        cfg.timeout.as_secs()
    );
    if busy || cores() <= 2 {
        println!(
            "- **noisy**: {} core(s){}; ratios of runs made side by side are steadier than the times",
            cores(),
            if busy { format!(", load average {load_start} at the start") } else { String::new() }
        );
    }

    let small_fuse: Vec<&FuseRow> = fuse_rows.iter().filter(|r| !r.v.arch.big()).collect();
    if !small_fuse.is_empty() {
        println!();
        println!("## 1. `fuse --no-verify` vs copying the same bytes");
        println!();
        println!("Durable copy: `cat` of the .onnx and its .data, then fsync of each copy. Targets: fuse <= 2x durable copy, peak RSS <= 1.5x the model's size.");
        println!();
        print_fuse_table(&small_fuse, &mut t_fuse, &mut t_fuse_mem);
    }
    let small_check: Vec<&CheckRow> = check_rows.iter().filter(|r| !r.v.arch.big()).collect();
    if !small_check.is_empty() {
        println!();
        println!(
            "## 2. default `fuse` (the check: {CHECK_SAMPLES} samples, noise criterion) vs the inferences it needs"
        );
        println!();
        println!("Plain inferences: one fresh process, tract load + `into_typed().into_runnable()` + {CHECK_SAMPLES} runs of the reference, then of the fused model. Noise inferences (what the criterion adds, not in the plain inferences): a perturbed copy of the loaded reference (every float constant one ulp off), typed and run {CHECK_SAMPLES} times, x{NOISE_DRAWS}. `verify`: the check alone, once. Targets: fuse <= 1.5x plain inferences, fuse peak RSS <= 1.25x the two models' combined size.");
        println!();
        print_check_table(&small_check, &fuse_rows, &mut t_check, &mut t_check_mem);
    }
    if !chain_rows.is_empty() {
        println!();
        println!("## 3. chain of tiny ACNet blocks: `fuse --no-verify` time per block");
        println!();
        println!("4 channels, 8x8; per block a 3x3, 3x1 and 1x3 conv with bias, `Add(Add(sq, ver), hor)`, Relu. Target: time per block within 2x across the sizes.");
        println!();
        println!("| blocks | model KiB | runs | fuse s | us / block | per block vs the fastest | growth exponent (vs previous size) | load+rewrite / write s | peak RSS MiB |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---|---:|");
        let per_block: Vec<Option<f64>> =
            chain_rows.iter().map(|r| r.fuse.as_ref().ok().map(|t| t / r.blocks as f64)).collect();
        let fastest = per_block.iter().flatten().cloned().fold(f64::INFINITY, f64::min);
        let slowest = per_block.iter().flatten().cloned().fold(0.0, f64::max);
        let mut prev: Option<(usize, f64)> = None;
        for (r, pb) in chain_rows.iter().zip(&per_block) {
            let timeout = r.fuse.as_ref().is_err_and(|e| e.starts_with("timeout"));
            // a timed-out run: the time per block is at least the timeout's
            let bound = timeout.then(|| cfg.timeout.as_secs_f64() / r.blocks as f64);
            let shown = pb.or(bound);
            let exponent = match (prev, r.fuse.as_ref().ok().or(timeout.then_some(&cfg.timeout.as_secs_f64()))) {
                (Some((n0, t0)), Some(t)) => {
                    let e = (t / t0).ln() / (r.blocks as f64 / n0 as f64).ln();
                    format!("{}{e:.2}", if timeout { ">= " } else { "" })
                }
                _ => "-".into(),
            };
            if let Ok(t) = r.fuse {
                prev = Some((r.blocks, t));
            }
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.blocks,
                if r.size > 0 { format!("{:.0}", r.size as f64 / 1024.0) } else { "-".into() },
                r.runs,
                secs(&r.fuse),
                shown.map_or("-".into(), |p| format!("{}{:.1}", if timeout { ">= " } else { "" }, p * 1e6)),
                shown.filter(|_| fastest.is_finite()).map_or("-".into(), |p| format!(
                    "{}{:.2}",
                    if timeout { ">= " } else { "" },
                    p / fastest
                )),
                exponent,
                fmt_phases(&r.phases, false),
                if r.max_rss > 0 { mib(r.max_rss) } else { "-".into() }
            );
            if timeout {
                t_chain.timed_out = true;
                let b = bound.unwrap() / fastest;
                if t_chain.worst.as_ref().is_none_or(|w| b > w.0) {
                    t_chain.worst = Some((b, format!("{} blocks timed out", r.blocks)));
                    t_chain.at_least = true;
                }
            } else if r.fuse.is_err() && !r.fuse.as_ref().is_err_and(|e| e.starts_with("skipped")) {
                t_chain.failures.push(format!("{} blocks", r.blocks));
            }
        }
        if per_block.iter().flatten().count() < 2 && !t_chain.timed_out {
            t_chain.failures.push("fewer than two sizes measured".into());
        }
        if fastest.is_finite() {
            let n = chain_rows.iter().zip(&per_block).find(|(_, p)| **p == Some(slowest)).map_or(0, |(r, _)| r.blocks);
            let x = slowest / fastest;
            if t_chain.worst.as_ref().is_none_or(|w| x >= w.0) {
                t_chain.worst = Some((x, format!("{n} blocks")));
                t_chain.at_least = false;
            }
        }
    }
    let big_fuse: Vec<&FuseRow> = fuse_rows.iter().filter(|r| r.v.arch.big()).collect();
    let big_check: Vec<&CheckRow> = check_rows.iter().filter(|r| r.v.arch.big()).collect();
    if !big_fuse.is_empty() || !big_check.is_empty() {
        println!();
        println!("## 4. at scale: ResNet-152 ACNet, 3x width, BN nodes, external data, input 1x3x64x64");
        println!();
        if !big_fuse.is_empty() {
            print_fuse_table(&big_fuse, &mut t_big, &mut t_big_mem);
            println!();
        }
        if !big_check.is_empty() {
            print_check_table(&big_check, &fuse_rows, &mut t_big_check, &mut t_big_check_mem);
        }
    }
    if !lat_rows.is_empty() {
        println!();
        println!("## 5. tract latency, optimised plan (`into_optimized`), batch 1, 224x224");
        println!();
        println!("| model | network | median ms | min ms | vs baseline (paired median) | optimise s |");
        println!("|---|---|---:|---:|---:|---:|");
        for r in &lat_rows {
            if r.what.starts_with("fused") {
                t_lat.add(Some(r.vs_base), format!("{} {}", r.arch.label(), r.what));
            }
            println!(
                "| {} | {} | {:.1} | {:.1} | {:+.1}% | {:.2} |",
                r.arch.label(),
                r.what,
                r.median * 1e3,
                r.min * 1e3,
                (r.vs_base - 1.0) * 100.0,
                r.prep
            );
        }
    }
    println!();
    println!("## targets");
    println!();
    for t in [
        &t_fuse,
        &t_fuse_mem,
        &t_check,
        &t_check_mem,
        &t_chain,
        &t_big,
        &t_big_mem,
        &t_big_check,
        &t_big_check_mem,
        &t_lat,
    ] {
        println!("{}", t.line());
    }
    let worst_cat = fuse_rows
        .iter()
        .filter_map(|r| ratio(&r.fuse, &r.cat).map(|x| (x, r)))
        .max_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    if let Some((x, r)) = worst_cat {
        println!(
            "- (no target) `fuse --no-verify` / plain `cat`: worst {x:.2}x ({} {} {})",
            r.v.arch.label(),
            r.v.style.label(),
            r.v.weights()
        );
    }
    println!();
    println!("total bench time {:.0} s; load average at the end {}", t_all.elapsed().as_secs_f64(), loadavg());
}
