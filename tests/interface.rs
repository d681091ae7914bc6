//! The three faces of each command agree: the flags its `--help` lists, the keyword arguments of
//! the Python function (`python/acnet_onnx/__init__.pyi`, the flags in snake_case, and the
//! docstrings of `python/acnet_onnx/__init__.py`), and the reference in `docs/commands.md` and
//! the README's synopses.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The long flags `acnet-onnx <command> --help` lists (without `--help` and `--version`).
fn help_flags(command: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_acnet-onnx")).args([command, "--help"]).output().unwrap();
    assert!(out.status.success(), "{command} --help: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // option lines are indented by at most 6 (`  -o, --output <OUTPUT>`, `      --inline`); the
    // descriptions clap puts on lines of their own are indented further
    let flags: BTreeSet<String> = text
        .lines()
        .filter(|l| l.len() - l.trim_start().len() <= 6 && l.trim_start().starts_with('-'))
        .filter_map(|l| l.split([' ', ',']).find_map(|t| t.strip_prefix("--")))
        .map(|t| t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next().unwrap().to_string())
        .filter(|f| f != "help" && f != "version")
        .collect();
    assert!(!flags.is_empty(), "no flags found in:\n{text}");
    flags
}

/// The keyword-only arguments of `def <function>(` in the stubs.
fn stub_keywords(stubs: &str, function: &str) -> BTreeSet<String> {
    let start = stubs.find(&format!("def {function}(")).unwrap_or_else(|| panic!("no def {function} in the stubs"));
    let signature = &stubs[start..start + stubs[start..].find(") ->").unwrap()];
    match signature.split_once("*,") {
        None => BTreeSet::new(),
        Some((_, kw)) => kw
            .lines()
            .filter_map(|l| l.trim().split_once(':').map(|(name, _)| name.trim().to_string()))
            .filter(|n| !n.is_empty())
            .collect(),
    }
}

/// The docstring of `def <function>(` in the package.
fn docstring<'a>(package: &'a str, function: &str) -> &'a str {
    let start = package.find(&format!("\ndef {function}(")).unwrap_or_else(|| panic!("no def {function}"));
    let doc = &package[start..];
    let open = doc.find("\"\"\"").unwrap() + 3;
    &doc[open..open + doc[open..].find("\"\"\"").unwrap()]
}

/// A flag as the Python keyword that stands for it (`None`: no keyword, it is an argument or
/// the function always does it).
fn keyword(command: &str, flag: &str) -> Option<String> {
    match (command, flag) {
        ("fuse", "output") => None,                     // the second argument
        ("fuse", "no-verify") => Some("verify".into()), // verify=False
        (_, "input") => Some("input_files".into()),     // `input` names the model
        ("inspect", "json") => None,                    // inspect always returns the dict
        _ => Some(flag.replace('-', "_")),
    }
}

/// Keywords with no flag: the command line always shows progress.
const PYTHON_ONLY: [&str; 1] = ["progress"];

#[test]
fn every_flag_is_a_python_keyword_and_every_keyword_a_flag() {
    let stubs = read("python/acnet_onnx/__init__.pyi");
    let package = read("python/acnet_onnx/__init__.py");
    for command in ["fuse", "verify", "inspect"] {
        let flags = help_flags(command);
        let mapped: BTreeSet<String> = flags.iter().filter_map(|f| keyword(command, f)).collect();
        let stubbed: BTreeSet<String> =
            stub_keywords(&stubs, command).into_iter().filter(|k| !PYTHON_ONLY.contains(&k.as_str())).collect();
        assert_eq!(mapped, stubbed, "{command}: --help flags {flags:?} against the stubs' keywords");
        let doc = docstring(&package, command);
        for k in stub_keywords(&stubs, command) {
            assert!(doc.contains(&k), "{command}'s docstring does not mention {k}");
        }
    }
    // what the mapping assumes: the flags it renames exist
    assert!(help_flags("fuse").contains("no-verify") && help_flags("verify").contains("input"));
}

#[test]
fn every_flag_is_documented() {
    let commands = read("docs/commands.md");
    let readme = read("README.md");
    for command in ["fuse", "verify", "inspect"] {
        // the section of docs/commands.md about the command
        let start = commands.find(&format!("## `{command}`")).unwrap_or_else(|| panic!("no section {command}"));
        let end = commands[start + 3..].find("\n## ").map_or(commands.len(), |e| start + 3 + e);
        let section = &commands[start..end];
        let flags = help_flags(command);
        // fuse takes verify's check options: its section refers to verify's
        let check = if command == "fuse" { help_flags("verify") } else { BTreeSet::new() };
        for f in &flags {
            let documented = section.contains(&format!("`--{f}")) || section.contains(&format!("--{f} "));
            assert!(documented || check.contains(f), "docs/commands.md, {command}: no --{f}");
            // the synopsis names `--output` by its short form
            let in_readme = readme.contains(&format!("--{f}")) || (f == "output" && readme.contains("-o OUTPUT"));
            assert!(in_readme, "README.md: no --{f} ({command})");
        }
        // and nothing documented that the command does not take
        for l in section.lines().filter(|l| l.starts_with("| `-")) {
            for f in l.split('`').filter_map(|c| c.strip_prefix("--")) {
                let f = f.split([' ', '=']).next().unwrap();
                assert!(flags.contains(f), "docs/commands.md documents --{f} for {command}, which --help lacks");
            }
        }
    }
}
