//! `refreshd completions` and `refreshd man`: the shell completion scripts and the manual
//! page, rendered from the clap definitions.

use super::{Cli, exit};
use anyhow::Result;
use clap::CommandFactory;

pub fn completions(shell: clap_complete::Shell) -> Result<u8> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "refreshd",
        &mut std::io::stdout(),
    );
    Ok(exit::OK)
}

pub fn man() -> Result<u8> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(exit::OK)
}
