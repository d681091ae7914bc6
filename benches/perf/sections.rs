//! The sections.

use super::*;

pub(crate) struct Config {
    pub(crate) runs: usize,
    pub(crate) lat_runs: usize,
    pub(crate) timeout: Duration,
    pub(crate) work: PathBuf,
}

impl Config {
    pub(crate) fn timeout_for(&self, arch: Arch) -> Duration {
        if arch.big() {
            self.timeout * 4
        } else {
            self.timeout
        }
    }
}

/// Section 1: one model file, `fuse --no-verify` against copying it.
pub(crate) struct FuseRow {
    pub(crate) v: Variant,
    pub(crate) size: u64,
    pub(crate) out_size: u64,
    pub(crate) cat: Meas,
    pub(crate) durable: Meas,
    pub(crate) fuse: Meas,
    pub(crate) max_rss: u64,
    pub(crate) peak_anon: u64,
    pub(crate) phases: Result<Phases, String>,
}

/// Section 2: the default fuse against the inferences the check needs.
pub(crate) struct CheckRow {
    pub(crate) v: Variant,
    /// the two models' combined size (input + fused output)
    pub(crate) combined: u64,
    pub(crate) fuse: Meas,
    pub(crate) fuse_rss: u64,
    /// reference then fused: (load, type, run) seconds, medians
    pub(crate) plain_parts: Option<[(f64, f64, f64); 2]>,
    /// wall time of the process doing the plain inferences
    pub(crate) plain: Meas,
    pub(crate) plain_rss: u64,
    /// the criterion's extra inferences: perturb + type + runs, for all draws (load not counted)
    pub(crate) noise: Meas,
    /// (perturb, type, run) of all draws, medians
    pub(crate) noise_parts: Option<(f64, f64, f64)>,
    pub(crate) verify: Meas,
    pub(crate) verify_rss: u64,
    pub(crate) phases: Result<Phases, String>,
    /// the reference's samples run as the check runs them, and as one batch: (rounds, batched) s
    pub(crate) batch: Option<(f64, f64)>,
}

/// The fused output of `fuse --no-verify` of a variant, kept for sections 2 and 5.
pub(crate) fn fused_path(cfg: &Config, v: &Variant) -> PathBuf {
    cfg.work.join(format!("{}-fused.onnx", v.tag()))
}

pub(crate) fn section_fuse(cfg: &Config, v: &Variant) -> FuseRow {
    let out = fused_path(cfg, v);
    let timeout = cfg.timeout_for(v.arch);
    let (mut cats, mut durables, mut fuses) = (vec![], vec![], vec![]);
    let (mut max_rss, mut peak_anon) = (0, 0);
    for _ in 0..cfg.runs {
        // each timed run starts with no dirty pages of an earlier one being written back
        settle();
        let (c, d) = copy_model(&v.path, &cfg.work, timeout);
        cats.push(c);
        durables.push(d);
        remove_model(&out);
        settle();
        let s = run_bin(
            &["fuse".as_ref(), "--no-verify".as_ref(), v.path.as_os_str(), "-o".as_ref(), out.as_os_str()],
            timeout,
        );
        fuses.push(s.time());
        max_rss = max_rss.max(s.max_rss);
        peak_anon = peak_anon.max(s.peak_anon);
        if s.outcome != Outcome::Ok {
            break;
        }
    }
    let out_size = size_of(&out);
    let fuse = median_meas(&fuses);
    // the library's phases, in a child: it writes the same output
    let phases = if fuse.is_ok() { phases(false, &v.path, &out, timeout) } else { Err("not run".into()) };
    let row = FuseRow {
        v: v.clone(),
        size: size_of(&v.path),
        out_size,
        cat: median_meas(&cats),
        durable: median_meas(&durables),
        fuse,
        max_rss,
        peak_anon,
        phases,
    };
    eprintln!(
        "[{}] {} MiB: fuse --no-verify {}, durable copy {}, cat {}, peak RSS {} MiB",
        v.tag(),
        mib(row.size),
        secs(&row.fuse),
        secs(&row.durable),
        secs(&row.cat),
        mib(row.max_rss)
    );
    row
}

/// The fused output for sections 2 and 5 when section 1 did not make it.
pub(crate) fn ensure_fused(cfg: &Config, v: &Variant) -> bool {
    let out = fused_path(cfg, v);
    if out.is_file() {
        return true;
    }
    let s = run_bin(
        &["fuse".as_ref(), "--no-verify".as_ref(), v.path.as_os_str(), "-o".as_ref(), out.as_os_str()],
        cfg.timeout_for(v.arch),
    );
    if let Err(e) = s.time() {
        eprintln!("[{}] fuse --no-verify {e}", v.tag());
        return false;
    }
    true
}

pub(crate) fn parse_plain(out: &str) -> Option<[(f64, f64, f64); 2]> {
    let rows: Vec<Vec<f64>> =
        out.lines().map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect()).collect();
    if rows.len() != 2 || rows.iter().any(|r| r.len() != 3) {
        return None;
    }
    Some([(rows[0][0], rows[0][1], rows[0][2]), (rows[1][0], rows[1][1], rows[1][2])])
}

/// The noise child's draws: (perturb, type, run) seconds, summed over the draws.
pub(crate) fn parse_noise(out: &str) -> Option<(f64, f64, f64)> {
    let draws: Vec<Vec<f64>> = out
        .lines()
        .filter_map(|l| l.strip_prefix("draw "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse::<f64>().ok()).collect())
        .collect();
    if draws.len() != NOISE_DRAWS || draws.iter().any(|d| d.len() != 3) {
        return None;
    }
    Some(draws.iter().fold((0.0, 0.0, 0.0), |a, d| (a.0 + d[0], a.1 + d[1], a.2 + d[2])))
}

pub(crate) fn section_check(cfg: &Config, v: &Variant) -> CheckRow {
    let timeout = cfg.timeout_for(v.arch);
    let fused = fused_path(cfg, v);
    let checked = cfg.work.join(format!("{}-checked.onnx", v.tag()));
    let shape = format!("1,3,{0},{0}", v.arch.side());
    let samples = CHECK_SAMPLES.to_string();
    let draws = NOISE_DRAWS.to_string();
    let mut row = CheckRow {
        v: v.clone(),
        combined: size_of(&v.path) + size_of(&fused),
        fuse: Err("not run".into()),
        fuse_rss: 0,
        plain_parts: None,
        plain: Err("not run".into()),
        plain_rss: 0,
        noise: Err("not run".into()),
        noise_parts: None,
        verify: Err("not run".into()),
        verify_rss: 0,
        phases: Err("not run".into()),
        batch: None,
    };
    if !fused.is_file() {
        row.fuse = Err("no fused model".into());
        return row;
    }
    let (mut fuses, mut plains, mut noises) = (vec![], vec![], vec![]);
    let mut parts: Vec<[(f64, f64, f64); 2]> = vec![];
    let mut noise_parts: Vec<(f64, f64, f64)> = vec![];
    for _ in 0..cfg.runs {
        // the three in turns, so that a change in the machine's load hits them alike
        remove_model(&checked);
        settle();
        let s = run_bin(&["fuse".as_ref(), v.path.as_os_str(), "-o".as_ref(), checked.as_os_str()], timeout);
        fuses.push(s.time());
        row.fuse_rss = row.fuse_rss.max(s.max_rss);
        remove_model(&checked);
        settle();
        let (s, out) = run_self(
            &["--plain-tract".as_ref(), shape.as_ref(), samples.as_ref(), v.path.as_os_str(), fused.as_os_str()],
            timeout,
        );
        row.plain_rss = row.plain_rss.max(s.max_rss);
        match (s.time(), parse_plain(&out)) {
            (Ok(t), Some(p)) => {
                plains.push(Ok(t));
                parts.push(p);
            }
            (Ok(_), None) => plains.push(Err(format!("unreadable output {out:?}"))),
            (Err(e), _) => plains.push(Err(e)),
        }
        settle();
        let (s, out) = run_self(
            &["--noise-tract".as_ref(), shape.as_ref(), samples.as_ref(), draws.as_ref(), v.path.as_os_str()],
            timeout,
        );
        match (s.time(), parse_noise(&out)) {
            (Ok(_), Some(p)) => {
                noises.push(Ok(p.0 + p.1 + p.2));
                noise_parts.push(p);
            }
            (Ok(_), None) => noises.push(Err(format!("unreadable output {out:?}"))),
            (Err(e), _) => noises.push(Err(e)),
        }
        if fuses.iter().chain(&plains).chain(&noises).any(|m| m.is_err()) {
            break;
        }
    }
    row.fuse = median_meas(&fuses);
    row.plain = median_meas(&plains);
    row.noise = median_meas(&noises);
    if !parts.is_empty() {
        let comp =
            |m: usize, f: fn(&(f64, f64, f64)) -> f64| median(&mut parts.iter().map(|p| f(&p[m])).collect::<Vec<_>>());
        row.plain_parts = Some([0, 1].map(|m| (comp(m, |p| p.0), comp(m, |p| p.1), comp(m, |p| p.2))));
    }
    if !noise_parts.is_empty() {
        let comp = |f: fn(&(f64, f64, f64)) -> f64| median(&mut noise_parts.iter().map(f).collect::<Vec<_>>());
        row.noise_parts = Some((comp(|p| p.0), comp(|p| p.1), comp(|p| p.2)));
    }
    // the check alone (once): its time and peak memory
    settle();
    let s = run_bin(&["verify".as_ref(), v.path.as_os_str(), fused.as_os_str()], timeout);
    row.verify = s.time();
    row.verify_rss = s.max_rss;
    // batching the samples (once): what it would save
    settle();
    let (s, out) = run_self(&["--batch-tract".as_ref(), shape.as_ref(), samples.as_ref(), v.path.as_os_str()], timeout);
    let t: Vec<f64> = out.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    row.batch = (s.time().is_ok() && t.len() == 2).then(|| (t[0], t[1]));
    if row.fuse.is_ok() {
        row.phases = phases(true, &v.path, &checked, timeout);
        if let Ok(p) = &row.phases {
            if p.passed == Some(false) {
                row.fuse = Err("the check failed".into());
            }
        }
    }
    remove_model(&checked);
    eprintln!(
        "[{}] fuse {} vs plain inferences {} (noise inferences {}), verify {}, peak RSS fuse {} / verify {} MiB",
        v.tag(),
        secs(&row.fuse),
        secs(&row.plain),
        secs(&row.noise),
        secs(&row.verify),
        mib(row.fuse_rss),
        mib(row.verify_rss)
    );
    row
}

pub(crate) struct ChainRow {
    pub(crate) blocks: usize,
    pub(crate) size: u64,
    pub(crate) fuse: Meas,
    pub(crate) runs: usize,
    pub(crate) max_rss: u64,
    pub(crate) phases: Result<Phases, String>,
}

pub(crate) fn section_chain(cfg: &Config, dir: &Path, sizes: &[usize]) -> Vec<ChainRow> {
    let mut rows: Vec<ChainRow> = vec![];
    for &n in sizes {
        if let Some(prev) = rows.iter().find(|r| r.fuse.as_ref().is_err_and(|e| e.starts_with("timeout"))) {
            rows.push(ChainRow {
                blocks: n,
                size: 0,
                fuse: Err(format!("skipped ({} blocks timed out)", prev.blocks)),
                runs: 0,
                max_rss: 0,
                phases: Err("not run".into()),
            });
            continue;
        }
        let t = Instant::now();
        let path = generate_chain(dir, n);
        eprintln!("[chain-{n}] model ready in {:.1} s", t.elapsed().as_secs_f64());
        let out = cfg.work.join(format!("chain-{n}-fused.onnx"));
        let (mut fuses, mut max_rss) = (vec![], 0);
        for _ in 0..cfg.runs {
            remove_model(&out);
            settle();
            let s = run_bin(
                &["fuse".as_ref(), "--no-verify".as_ref(), path.as_os_str(), "-o".as_ref(), out.as_os_str()],
                cfg.timeout,
            );
            fuses.push(s.time());
            max_rss = max_rss.max(s.max_rss);
            if s.outcome != Outcome::Ok || s.wall > CHAIN_REPEAT_LIMIT {
                break;
            }
        }
        let fuse = median_meas(&fuses);
        // the phases need one more run: not for the slow sizes
        let phases = match fuse {
            Ok(t) if t <= CHAIN_REPEAT_LIMIT => phases(false, &path, &out, cfg.timeout),
            Ok(_) => Err("(slow: not run)".into()),
            Err(_) => Err("-".into()),
        };
        remove_model(&out);
        eprintln!("[chain-{n}] fuse --no-verify {} ({} run(s))", secs(&fuse), fuses.len());
        rows.push(ChainRow { blocks: n, size: size_of(&path), fuse, runs: fuses.len(), max_rss, phases });
    }
    rows
}

pub(crate) struct LatRow {
    pub(crate) arch: Arch,
    pub(crate) what: String,
    pub(crate) prep: f64,
    pub(crate) median: f64,
    pub(crate) min: f64,
    /// median over rounds of (this model's time / the baseline's time in the same round)
    pub(crate) vs_base: f64,
}

pub(crate) fn section_latency(cfg: &Config, models: &Models, input: &Tensor) -> Vec<LatRow> {
    let Some(baseline) = &models.baseline else { return vec![] };
    let mut lat_models: Vec<(String, PathBuf)> = vec![];
    for v in models.acnet.iter().filter(|v| !v.external) {
        if !ensure_fused(cfg, v) {
            continue;
        }
        lat_models.push((format!("ACNet ({})", v.style.label()), v.path.clone()));
        lat_models.push((format!("fused ({})", v.style.label()), fused_path(cfg, v)));
    }
    lat_models.push(("baseline".into(), baseline.clone()));
    let paths: Vec<&Path> = lat_models.iter().map(|m| m.1.as_path()).collect();
    let res = tract_latency(&paths, input, cfg.lat_runs);
    let base = res.last().unwrap().1.clone(); // the baseline is the last model
    let arch = models.acnet[0].arch;
    let mut rows = vec![];
    for ((what, _), (prep, times)) in lat_models.iter().zip(res) {
        // paired: this model's time over the baseline's in the same round
        let mut ratios: Vec<f64> = times.iter().zip(&base).map(|(t, b)| t / b).collect();
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let med = median(&mut times.clone());
        eprintln!("[{}] latency {what}: median {:.1} ms (optimise {:.1} s)", arch.name(), med * 1e3, prep);
        rows.push(LatRow { arch, what: what.clone(), prep, median: med, min, vs_base: median(&mut ratios) });
    }
    rows
}
