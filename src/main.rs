use clap::Parser;

fn main() {
    // No backtraces for users: a bug is reported as one line and exit code 2; unwinding still
    // removes any staged output.
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned()).unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("acnet-onnx: internal error{at}: {}", msg.replace('\n', " "));
    }));
    let cli = match acnet_onnx::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = std::panic::catch_unwind(|| acnet_onnx::cli::main_with(cli)).unwrap_or(2);
    std::process::exit(code);
}
