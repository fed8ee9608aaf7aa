//! Process-level glue shared by the subcommands: logging setup and the one-sentence failure exit.
use tracing_subscriber::EnvFilter;

pub fn init_tracing() {
    let filter =
        EnvFilter::try_from_env("ULTRAREFINER_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prints the error chain as one sentence and exits non-zero.
pub fn exit_with(e: anyhow::Error) -> ! {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    eprintln!("error: {msg}");
    std::process::exit(1);
}
