//! (Part of the `refreshd` binary, not the library.) The CLI reference,
//! docs/src/reference/cli.md, rendered from the clap definitions: every command's `--help`,
//! so the page cannot drift from the program. A test keeps the committed file current.

use clap::Command;

/// The page: an intro, then each command's long help in a text block, depth first.
pub fn render(mut root: Command) -> String {
    // Fixed width and no colour: the page must not depend on the terminal that made it.
    root = root.term_width(100).color(clap::ColorChoice::Never);
    root.build();
    let mut page = String::from(
        "# CLI reference\n\n\
         <!-- Generated from the program's clap definitions: do not edit. Regenerate with\n     \
         REFRESHD_BLESS=1 cargo test --bin refreshd cli_reference -->\n\n\
         Every command's `--help`, as `refreshd` prints it. Shell completions come from\n\
         `refreshd completions <SHELL>`, the manual page from `refreshd man`.\n\n\
         Exit codes: 0 success; 1 an error (the message names what and what to do); 2 a usage\n\
         error; 3 `run --once` flagged an account that needs re-authorization; 78 a config\n\
         error (EX_CONFIG).\n",
    );
    section(&mut page, &mut root, "refreshd");
    page
}

fn section(page: &mut String, cmd: &mut Command, path: &str) {
    let help = cmd.render_long_help().to_string();
    page.push_str(&format!(
        "\n## `{path}`\n\n```text\n{}\n```\n",
        help.trim_end()
    ));
    for sub in cmd.get_subcommands_mut() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("{path} {}", sub.get_name());
        section(page, sub, &name);
    }
}
