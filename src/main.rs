//! The `refreshd` binary's entry point: parses the command line, runs the command on a
//! tokio runtime, and maps its error to an exit code. The commands live in `cli/`; every
//! behaviour they have is a library function a test can call.

use std::process::ExitCode;

mod cli;

use cli::exit;

// A refresh allocates and frees many small buffers across the runtime's threads (HTTP,
// JSON, log line, store job); glibc's malloc spent ~10% of a burst's daemon CPU on them.
// Built with `no_thp` (Cargo.toml): its 2 MiB transparent huge pages cost ~12 MiB of RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match rt.block_on(cli::dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = if e.downcast_ref::<refreshd::config::ConfigError>().is_some() {
                exit::CONFIG
            } else {
                exit::ERROR
            };
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(code)
        }
    }
}
