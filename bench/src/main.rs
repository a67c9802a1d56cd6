//! The `refreshd-bench` program; everything lives in the library (lib.rs).

fn main() -> std::process::ExitCode {
    refreshd_bench::main_with(std::env::args_os(), &mut std::io::stdout())
}
