//! The command line, thin over [`crate::pipeline`]: parse the arguments, run, print. Exit codes:
//! 0 done / equivalent, 1 not equivalent, 2 could not do it (bad input, unreadable file, a check
//! that could not run). Errors are one line on stderr, never a backtrace.

mod args;

use crate::error::{catch, install_panic_hook, one_line, Error};
use crate::pipeline::{fuse_file_with, inspect_file, verify_files, Event, VerifyFileOptions};
use crate::verify::VerifyReport;
use args::{Cli, Cmd, FuseArgs, InspectArgs, VerifyArgs};
use clap::Parser;
use std::ffi::OsString;

/// Run the command line on `args` (the program name first); returns the process exit code.
/// Output goes to stdout, errors and warnings to stderr, one line each.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    // No backtraces for users: a panic (a bug) is reported as one line and exit code 2, and
    // unwinding still removes any staged output.
    install_panic_hook();
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => return bad_arguments(e),
    };
    match catch(|| run(&cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("acnet-onnx: {}", one_line(&e.to_string()));
            e.exit_code()
        }
        Err(p) => {
            eprintln!(
                "acnet-onnx: internal error: {} (this is a bug in acnet-onnx: please report it)",
                one_line(&p.message())
            );
            2
        }
    }
}

/// `--help` and `--version` print and succeed; anything else is one line and exit code 2.
fn bad_arguments(e: clap::Error) -> i32 {
    if !e.use_stderr() {
        let _ = e.print();
        return 0;
    }
    // one line: clap's first line (`error: ...`) without the usage block that follows
    let text = e.render().to_string();
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next().unwrap_or("bad arguments");
    let mut first = first.trim().strip_prefix("error: ").unwrap_or(first.trim()).to_string();
    // `... were not provided:` is followed by the arguments, indented
    if first.ends_with(':') {
        let more: Vec<&str> = lines.take_while(|l| l.starts_with(' ') && !l.trim().is_empty()).map(str::trim).collect();
        if !more.is_empty() {
            first = format!("{} {}", first, more.join(", "));
        }
    }
    eprintln!("acnet-onnx: {} (see --help)", one_line(&first));
    2
}

fn run(cli: &Cli) -> Result<i32, Error> {
    match &cli.cmd {
        Cmd::Fuse(a) => run_fuse(a),
        Cmd::Verify(a) => run_verify(a),
        Cmd::Inspect(a) => run_inspect(a),
    }
}

fn warn(msg: &str) {
    eprintln!("acnet-onnx: warning: {}", one_line(msg));
}

fn run_fuse(a: &FuseArgs) -> Result<i32, Error> {
    let opts = a.options()?;
    let mut checked: Option<VerifyReport> = None;
    let report = fuse_file_with(&a.model, &a.output, &opts, &mut |event| match event {
        Event::Fused(r) => print!("{}", r.summary()),
        Event::Checked(r) => {
            print!("{}", r.table());
            checked = Some(r.clone());
        }
        Event::Warning(w) => warn(w),
        Event::Benched(b) => {
            // the notes the check did not print already
            for n in &b.notes {
                if !checked.as_ref().is_some_and(|r| r.notes.contains(n)) {
                    println!("note: {n}");
                }
            }
            print!("{}", b.summary());
        }
        Event::Wrote(saved) => match &saved.data {
            Some(d) => println!("wrote {} and {}", saved.model.display(), d.display()),
            None => println!("wrote {}", saved.model.display()),
        },
    })?;
    if let Some(why) = report.not_written(&a.model) {
        eprintln!("acnet-onnx: {}", one_line(&why));
    }
    Ok(report.exit_code())
}

fn run_verify(a: &VerifyArgs) -> Result<i32, Error> {
    let opts = VerifyFileOptions { check: a.check.options()?, report: a.report.clone() };
    let r = verify_files(&a.reference, &a.candidate, &opts)?;
    print!("{}", r.table());
    if r.exit_code() == 2 {
        eprintln!(
            "acnet-onnx: {}",
            one_line(&format!(
                "{}: not checked where the models differ ({}) (--allow-unchecked accepts it)",
                a.candidate.display(),
                r.unchecked().join("; ")
            ))
        );
    }
    Ok(r.exit_code())
}

fn run_inspect(a: &InspectArgs) -> Result<i32, Error> {
    let r = inspect_file(&a.model)?;
    if a.json {
        let v = serde_json::to_value(&r).expect("a report serialises");
        println!("{}", serde_json::to_string_pretty(&v).expect("a report serialises"));
    } else {
        print!("{}", r.text());
    }
    Ok(0)
}
