//! Measuring child processes: wall time and peak RSS.

use super::*;

/// How a measured child ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    Ok,
    /// non-zero exit: the last line of its stderr
    Failed(String),
    /// killed after the timeout
    Timeout,
}

pub(crate) struct ProcStat {
    pub(crate) wall: f64,
    /// Peak RSS of the program, bytes: GNU time's `%M` (its wait4 rusage) when /usr/bin/time is
    /// there, else the highest VmHWM polled from /proc/<pid>/status.
    pub(crate) max_rss: u64,
    /// Highest RssAnon (heap, not file-backed pages) seen while polling, bytes (0 if unavailable).
    pub(crate) peak_anon: u64,
    pub(crate) outcome: Outcome,
}

impl ProcStat {
    /// Its wall time, or what went wrong.
    pub(crate) fn time(&self) -> Meas {
        match &self.outcome {
            Outcome::Ok => Ok(self.wall),
            Outcome::Timeout => Err(format!("timeout ({:.0} s)", self.wall)),
            Outcome::Failed(m) => Err(format!("failed: {m}")),
        }
    }
}

/// A time in seconds, or why there is none ("timeout ...", "failed: ...").
pub(crate) type Meas = Result<f64, String>;

pub(crate) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Whether `/usr/bin/time -f %M -o FILE` (GNU time) works here.
///
/// Why not wait4 on our own child: Rust spawns with vfork/posix_spawn, and Linux records the
/// max RSS of the pre-exec image (this whole benchmark process) in the child's `ru_maxrss`. GNU
/// time forks from a small process, so its `%M` is the program's own peak.
pub(crate) fn gnu_time() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        let Ok(f) = tempfile::NamedTempFile::new() else { return false };
        Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(f.path())
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && std::fs::read_to_string(f.path()).is_ok_and(|s| s.trim().parse::<u64>().is_ok())
    })
}

/// Kill the process group `pgid` (a child this bench spawned as the leader of its own group,
/// with whatever it started: GNU time and the program it runs).
pub(crate) fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
}

/// Run `program args`; wall time from spawn to exit, and its peak memory (see [`ProcStat`]).
/// Killed (with everything it started) after `timeout`.
pub(crate) fn run_measured(program: &Path, args: &[&OsStr], stdout: Stdio, timeout: Duration) -> ProcStat {
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let wrapped = gnu_time();
    let mut cmd = if wrapped {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M", "-o"]).arg(rss_file.path()).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).stdout(stdout).stderr(err_file.reopen().unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let wall = t0.elapsed().as_secs_f64();
        let _ = tx.send(());
        (status, wall)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut hwm, mut anon) = (0u64, 0u64);
            let mut target = if wrapped { None } else { Some(pid) };
            while !stop.load(Ordering::Relaxed) {
                if target.is_none() {
                    // the program is GNU time's only child
                    target = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                        .ok()
                        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
                }
                if let Some(t) = target {
                    hwm = hwm.max(status_kib(t, "VmHWM:").unwrap_or(0));
                    anon = anon.max(status_kib(t, "RssAnon:").unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (hwm * 1024, anon * 1024)
        })
    };
    let timed_out = rx.recv_timeout(timeout).is_err();
    if timed_out {
        kill_group(pid);
    }
    let (status, wall) = waiter.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let (hwm, peak_anon) = poll.join().unwrap();
    let max_rss = if wrapped {
        std::fs::read_to_string(rss_file.path())
            .ok()
            .and_then(|s| s.lines().last().and_then(|l| l.trim().parse::<u64>().ok()))
            .map(|k| k * 1024)
            .unwrap_or(hwm)
    } else {
        hwm
    };
    let stderr = std::fs::read_to_string(err_file.path()).unwrap_or_default();
    let outcome = if timed_out {
        Outcome::Timeout
    } else if status.is_ok_and(|s| s.success()) {
        Outcome::Ok
    } else {
        // GNU time adds "Command exited with non-zero status N" as the last line
        let last = stderr
            .lines()
            .rev()
            .find(|l| {
                !l.trim().is_empty() && !l.starts_with("Command exited with") && !l.starts_with("Command terminated")
            })
            .unwrap_or("(no message)");
        Outcome::Failed(last.chars().take(200).collect())
    };
    ProcStat { wall, max_rss, peak_anon, outcome }
}

/// Run this bench binary in one of its child modes; (stats, its stdout).
pub(crate) fn run_self(args: &[&OsStr], timeout: Duration) -> (ProcStat, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let s = run_measured(&std::env::current_exe().unwrap(), args, Stdio::from(out.reopen().unwrap()), timeout);
    (s, std::fs::read_to_string(out.path()).unwrap_or_default())
}

pub(crate) fn run_bin(args: &[&OsStr], timeout: Duration) -> ProcStat {
    run_measured(Path::new(BIN), args, Stdio::null(), timeout)
}

pub(crate) fn data_file(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".data");
    PathBuf::from(s)
}

/// The files of a model: itself and its `.data` if any.
pub(crate) fn files_of(p: &Path) -> Vec<PathBuf> {
    let d = data_file(p);
    let mut v = vec![p.to_path_buf()];
    if d.is_file() {
        v.push(d);
    }
    v
}

pub(crate) fn size_of(p: &Path) -> u64 {
    files_of(p).iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
}

pub(crate) fn remove_model(p: &Path) {
    let _ = std::fs::remove_file(p);
    let _ = std::fs::remove_file(data_file(p));
}

/// Flush every file system (`sync`), so that no write-back of an earlier run competes with the
/// next timed one.
pub(crate) fn settle() {
    let _ = Command::new("sync").status();
}

/// `cat f > copy` for every file of the model (each a measured child, as fuse is), then fsync of
/// the copy; returns (cat seconds, cat + fsync seconds). The copies are removed.
pub(crate) fn copy_model(src: &Path, dst_dir: &Path, timeout: Duration) -> (Meas, Meas) {
    let (mut cat, mut synced) = (0.0, 0.0);
    for f in files_of(src) {
        let dst = dst_dir.join(format!("copy-{}", f.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(&dst);
        let out = File::create(&dst).unwrap();
        let s = run_measured(Path::new("cat"), &[f.as_os_str()], Stdio::from(out), timeout);
        if let Err(e) = s.time() {
            let _ = std::fs::remove_file(&dst);
            return (Err(e.clone()), Err(e));
        }
        let t = Instant::now();
        File::open(&dst).unwrap().sync_all().unwrap();
        cat += s.wall;
        synced += s.wall + t.elapsed().as_secs_f64();
        std::fs::remove_file(&dst).unwrap();
    }
    (Ok(cat), Ok(synced))
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of the runs, or the first failure among them.
pub(crate) fn median_meas(v: &[Meas]) -> Meas {
    let mut ok = vec![];
    for m in v {
        ok.push(m.clone()?);
    }
    if ok.is_empty() {
        return Err("not run".into());
    }
    Ok(median(&mut ok))
}
