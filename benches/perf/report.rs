//! Report: the tables, the targets and the machine.

use super::*;

pub(crate) fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

pub(crate) fn secs(m: &Meas) -> String {
    match m {
        Ok(s) if *s < 10.0 => format!("{s:.3}"),
        Ok(s) => format!("{s:.1}"),
        Err(e) => e.clone(),
    }
}

/// `a / b` as `x.xx`, or `-` when either is missing.
pub(crate) fn ratio(a: &Meas, b: &Meas) -> Option<f64> {
    match (a, b) {
        (Ok(a), Ok(b)) if *b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

/// One target: the worst ratio measured against its limit.
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) limit: f64,
    pub(crate) worst: Option<(f64, String)>,
    pub(crate) failures: Vec<String>,
    /// when the worst is only a lower bound (from a run that timed out)
    pub(crate) at_least: bool,
    /// a run timed out: missed whatever the ratios measured
    pub(crate) timed_out: bool,
}

impl Target {
    pub(crate) fn new(what: impl Into<String>, limit: f64) -> Target {
        Target { what: what.into(), limit, worst: None, failures: vec![], at_least: false, timed_out: false }
    }
    pub(crate) fn add(&mut self, r: Option<f64>, label: String) {
        match r {
            Some(r) if self.worst.as_ref().is_none_or(|w| r > w.0) => self.worst = Some((r, label)),
            Some(_) => {}
            None => self.failures.push(label),
        }
    }
    pub(crate) fn line(&self) -> String {
        let failed = if self.failures.is_empty() {
            String::new()
        } else {
            format!("; not measured: {}", self.failures.join(", "))
        };
        match &self.worst {
            None if self.failures.is_empty() => {
                format!("- {} (<= {}x): not measured in this run", self.what, self.limit)
            }
            None => format!("- {} (<= {}x): **MISSED**{failed}", self.what, self.limit),
            Some((w, label)) => {
                let met = *w <= self.limit && self.failures.is_empty() && !self.timed_out;
                format!(
                    "- {} (<= {}x): {} (worst {}{w:.2}x, {label}){failed}",
                    self.what,
                    self.limit,
                    if met { "met" } else { "**MISSED**" },
                    if self.at_least { ">= " } else { "" }
                )
            }
        }
    }
}

pub(crate) fn fmt_phases(p: &Result<Phases, String>, verify: bool) -> String {
    match p {
        Ok(p) if verify => format!("{:.3} / {:.3} / {:.3}", p.rewrite, p.check.unwrap_or(f64::NAN), p.write),
        Ok(p) => format!("{:.3} / {:.3}", p.rewrite, p.write),
        Err(e) => e.clone(),
    }
}

pub(crate) fn print_fuse_table(rows: &[&FuseRow], t_time: &mut Target, t_mem: &mut Target) {
    println!("| model | style | weights | size MiB | fused MiB | cat s | durable copy s | fuse s | **fuse / durable copy** | fuse / cat | peak RSS MiB | (anon) | **peak / size** | load+rewrite / write s | merged / BN folded / refused |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for r in rows {
        let label = format!("{} {} {}", r.v.arch.label(), r.v.style.label(), r.v.weights());
        let tr = ratio(&r.fuse, &r.durable);
        let mr = r.fuse.is_ok().then(|| r.max_rss as f64 / r.size as f64);
        t_time.add(tr, label.clone());
        t_mem.add(mr, label);
        let counts = match &r.phases {
            Ok(p) => format!("{} / {} / {}", p.merged, p.folded, p.refused),
            Err(_) => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | **{}** | {} | {} |",
            r.v.arch.label(),
            r.v.style.label(),
            r.v.weights(),
            mib(r.size),
            mib(r.out_size),
            secs(&r.cat),
            secs(&r.durable),
            secs(&r.fuse),
            fmt_ratio(tr),
            fmt_ratio(ratio(&r.fuse, &r.cat)),
            mib(r.max_rss),
            mib(r.peak_anon),
            fmt_ratio(mr),
            fmt_phases(&r.phases, false),
            counts
        );
    }
}

pub(crate) fn print_check_table(rows: &[&CheckRow], nv: &[FuseRow], t_time: &mut Target, t_mem: &mut Target) {
    println!("| model | style | weights | fuse s | fuse --no-verify s | plain inferences s | **fuse / plain** | noise inferences s | noise / plain | fuse / (plain + noise) | load+rewrite / stage+check / write s | verify s | models MiB | fuse peak MiB | **fuse peak / models** | verify peak MiB | verify peak / models | plain inferences peak MiB |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let label = format!("{} {} {}", r.v.arch.label(), r.v.style.label(), r.v.weights());
        let no_verify = nv.iter().find(|f| f.v.path == r.v.path).map_or(Err("-".into()), |f| f.fuse.clone());
        let tr = ratio(&r.fuse, &r.plain);
        let mr = r.fuse.is_ok().then(|| r.fuse_rss as f64 / r.combined as f64);
        t_time.add(tr, label.clone());
        t_mem.add(mr, label);
        let both = match (&r.plain, &r.noise) {
            (Ok(p), Ok(n)) => Ok(p + n),
            _ => Err("-".to_string()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} |",
            r.v.arch.label(),
            r.v.style.label(),
            r.v.weights(),
            secs(&r.fuse),
            secs(&no_verify),
            secs(&r.plain),
            fmt_ratio(tr),
            secs(&r.noise),
            fmt_ratio(ratio(&r.noise, &r.plain)),
            fmt_ratio(ratio(&r.fuse, &both)),
            fmt_phases(&r.phases, true),
            secs(&r.verify),
            mib(r.combined),
            mib(r.fuse_rss),
            fmt_ratio(mr),
            mib(r.verify_rss),
            fmt_ratio(r.verify.is_ok().then(|| r.verify_rss as f64 / r.combined as f64)),
            mib(r.plain_rss),
        );
    }
    println!();
    println!("Where the inferences' time goes (medians; s; measured inside the child processes):");
    println!();
    println!("| model | style | weights | plain, reference: load / type / {CHECK_SAMPLES} runs | plain, fused: load / type / {CHECK_SAMPLES} runs | noise, {NOISE_DRAWS} draws: perturb / type / {CHECK_SAMPLES} runs |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let f = |p: &(f64, f64, f64)| format!("{:.3} / {:.3} / {:.3}", p.0, p.1, p.2);
        let (a, b) = r.plain_parts.as_ref().map_or(("-".into(), "-".into()), |p| (f(&p[0]), f(&p[1])));
        let n = r.noise_parts.as_ref().map_or("-".into(), f);
        println!("| {} | {} | {} | {a} | {b} | {n} |", r.v.arch.label(), r.v.style.label(), r.v.weights());
    }
    println!();
    println!("Batching the samples (measured, not what the check does): the reference's {CHECK_SAMPLES} runs as the check makes them (rounds of one per core) against one run of the {CHECK_SAMPLES} samples stacked on axis 0 (its matrix products on every core); plans typed un-optimised, each figure once:");
    println!();
    println!("| model | style | weights | rounds s | one batched run s | batched / rounds |");
    println!("|---|---|---|---:|---:|---:|");
    for r in rows {
        let (a, b, q) = r.batch.map_or(("-".into(), "-".into(), "-".into()), |(a, b)| {
            (format!("{a:.3}"), format!("{b:.3}"), format!("{:.2}", b / a))
        });
        println!("| {} | {} | {} | {a} | {b} | {q} |", r.v.arch.label(), r.v.style.label(), r.v.weights());
    }
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn gib_kib(k: Option<u64>) -> String {
    k.map_or("?".into(), |k| format!("{:.1} GiB", k as f64 / (1 << 20) as f64))
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The file system of `dir`: device, type, size, free (from `df -PT`).
pub(crate) fn filesystem(dir: &Path) -> String {
    let Some(out) = command_line("df", &["-PT", &dir.to_string_lossy()]) else { return "?".into() };
    let Some(line) = out.lines().nth(1) else { return "?".into() };
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 7 {
        return line.into();
    }
    let gib = |k: &str| k.parse::<f64>().map_or("?".into(), |k| format!("{:.0} GiB", k / (1 << 20) as f64));
    let rotational = Path::new(f[0])
        .file_name()
        .and_then(|d| {
            std::fs::read_to_string(format!("/sys/class/block/{}/queue/rotational", d.to_string_lossy())).ok()
        })
        .map(|r| if r.trim() == "1" { ", rotational per the kernel" } else { ", non-rotational" })
        .unwrap_or("");
    format!("{} {} mounted on {} ({} size, {} free{rotational})", f[0], f[1], f[6], gib(f[2]), gib(f[4]))
}

/// The version of a package in Cargo.lock.
pub(crate) fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == format!("name = \"{name}\"") {
            if let Some(v) = lines.next().and_then(|v| v.trim().strip_prefix("version = ")) {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "?".into()
}

pub(crate) fn machine(dir: &Path) -> Vec<String> {
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    vec![
        format!("- cores: {} ({})", cores(), cpu_model()),
        format!(
            "- RAM: {} total, {} available at the start",
            gib_kib(meminfo_kib("MemTotal:")),
            gib_kib(meminfo_kib("MemAvailable:"))
        ),
        format!("- OS: {} {kernel} {}", std::env::consts::OS, std::env::consts::ARCH),
        format!("- models folder: {} on {}", dir.display(), filesystem(dir)),
        format!(
            "- {}, tract-onnx {}, coreutils cat ({}), peak RSS from {}",
            command_line("rustc", &["-V"]).unwrap_or_else(|| "rustc ?".into()),
            locked_version("tract-onnx"),
            command_line("cat", &["--version"])
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "?".into()),
            if gnu_time() { "GNU time %M" } else { "polled VmHWM" }
        ),
    ]
}
