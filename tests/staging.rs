//! Nothing left behind by a killed run: a `fuse` killed outright (SIGKILL, as a CI timeout does)
//! leaves its staging folder beside the output; the next `fuse` writing there removes it, says
//! so, and leaves alone the folders of live processes, of other hosts, and those whose name does
//! not say whose they are.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(model: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model).join(file)
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_acnet-onnx"))
}

/// The names in `dir` that start with `.acnet-onnx-`, sorted.
fn staging(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".acnet-onnx-"))
        .collect();
    v.sort();
    v
}

/// Process `pid`'s state (`Z`: a zombie) and start time in clock ticks since boot (fields 3
/// and 22 of /proc/<pid>/stat).
fn proc_stat(pid: u32) -> (char, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (fields[0].chars().next().unwrap(), fields[19].parse().unwrap())
}

fn start_ticks(pid: u32) -> u64 {
    proc_stat(pid).1
}

/// A folder with a file in it, as a run would have left it.
fn leave(dir: &Path, name: &str) {
    std::fs::create_dir(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("deploy.onnx"), b"partial").unwrap();
}

#[test]
fn a_killed_runs_staging_folder_is_removed_by_the_next_run_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let output = out_dir.join("deploy.onnx");
    let model = fixture("resnet20", "ts_fold.onnx");

    // A run that stops after staging: its check reads its input from a pipe nobody writes to,
    // so it waits there (for ever) with its output staged.
    let fifo = d.path().join("input.npy");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut child = bin()
        .arg("fuse")
        .arg(&model)
        .arg("-o")
        .arg(&output)
        .arg("--input")
        .arg(format!("input={}", fifo.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = start_ticks(pid);
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        if let Some(s) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the run ended before it staged ({s}): {}", String::from_utf8_lossy(&out.stderr));
        }
        match staging(&out_dir).as_slice() {
            [one] => break one.clone(),
            [] => assert!(Instant::now() < deadline, "no staging folder after 120 s"),
            more => panic!("several staging folders: {more:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap(); // SIGKILL
                           // not waited for until the end: a zombie (ended, its pid still in /proc) is gone too
    while proc_stat(pid).0 != 'Z' {
        assert!(Instant::now() < deadline, "the killed run is not a zombie after 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    // named after its host, process and start: `.acnet-onnx-<host>-<pid>-<start>-<n>`
    let mut parts = killed.strip_prefix(".acnet-onnx-").unwrap().rsplitn(4, '-');
    parts.next().unwrap().parse::<u64>().unwrap();
    assert_eq!(parts.next().unwrap(), start.to_string(), "{killed}");
    assert_eq!(parts.next().unwrap(), pid.to_string(), "{killed}");
    let host = parts.next().unwrap().to_string();
    assert!(!host.is_empty(), "{killed}");
    // a killed run cannot clean up: its folder is left, and nothing is written
    assert_eq!(staging(&out_dir), vec![killed.clone()]);
    assert!(!output.exists());

    // Beside it: a folder of a process that has ended and been waited for (its pid is not in
    // /proc), of a live process (this test's), one whose pid is alive but belongs to a process
    // started at another time (the pid was reused: the maker is gone), one made on another
    // host, and one whose name does not say all of this (an older version's).
    let mut ended = Command::new("sleep").arg("600").spawn().unwrap();
    let ended_name = format!(".acnet-onnx-{host}-{}-{}-5", ended.id(), start_ticks(ended.id()));
    ended.kill().unwrap();
    ended.wait().unwrap();
    let me = std::process::id();
    let live = format!(".acnet-onnx-{host}-{me}-{}-1", start_ticks(me));
    let reused = format!(".acnet-onnx-{host}-{me}-{}-2", start_ticks(me) + 1);
    let other_host = format!(".acnet-onnx-{host}.elsewhere-{pid}-{start}-3");
    let older = format!(".acnet-onnx-{pid}-4");
    for name in [&ended_name, &live, &reused, &other_host, &older] {
        leave(&out_dir, name);
    }

    // The next run removes the folders of the killed run, the ended process and the reused
    // pid, and says so (in its summary and in the report's notes).
    let report = d.path().join("report.json");
    let out = bin().arg("fuse").arg(&model).arg("-o").arg(&output).arg("--report").arg(&report).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut gone = [killed.clone(), ended_name.clone(), reused.clone()];
    gone.sort();
    let note = format!("removed 3 staging folder(s) left by killed runs: {}", gone.join(", "));
    assert!(stdout.contains(&format!("note: {note}\n")), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(v["fuse"]["notes"].as_array().unwrap().iter().any(|n| n == note.as_str()), "{}", v["fuse"]["notes"]);
    let mut kept = [live.clone(), other_host.clone(), older.clone()];
    kept.sort();
    assert_eq!(staging(&out_dir), kept);
    assert!(output.exists());

    // Nothing left to remove: no note.
    let out = bin().arg("fuse").arg(&model).arg("-o").arg(&output).arg("--no-verify").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains("staging folder"), "{stdout}");
    assert_eq!(staging(&out_dir), kept);
    child.wait().unwrap();
}
