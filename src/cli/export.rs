//! `refreshd accounts export`: the stored accounts in the import format. Tokens only with
//! `--include-tokens`, and then only into a new file of mode 0600 (never stdout).

use super::{exit, open_read_only};
use anyhow::{Context, Result, bail};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::model::Grant;
use refreshd::store::ListFilter;
use std::io::Write;
use std::path::Path;

/// Writes every account (of `provider`, when given) as one import line.
pub async fn export(
    config: &Config,
    provider: Option<&str>,
    include_tokens: bool,
    out: Option<&Path>,
) -> Result<u8> {
    if include_tokens && out.is_none() {
        bail!(
            "--include-tokens writes tokens only to a new file: add -o FILE (created with mode 0600; tokens never go to stdout)"
        );
    }
    let file = out.map(create_private).transpose()?;
    let mut sink: Box<dyn Write> = match &file {
        Some(f) => Box::new(std::io::BufWriter::new(f)),
        None => Box::new(std::io::stdout().lock()),
    };
    let store = open_read_only(config).await?;
    let now = Clock::system().now();
    // App tokens are not in the import format: they come from the config or `apps add`.
    let filter = ListFilter {
        provider: provider.map(str::to_string),
        grant: Some(Grant::RefreshToken),
        ..ListFilter::default()
    };
    let (mut after, mut n) = (0, 0usize);
    let written: Result<()> = async {
        loop {
            let page = store.list(filter.clone(), after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for s in &page {
                // Removed since the page was read: nothing to export.
                let Some(a) = store.get(s.id).await? else {
                    continue;
                };
                let line = refreshd::import::export_line(&a, now, include_tokens);
                writeln!(sink, "{line}")?;
                n += 1;
            }
        }
        sink.flush()?;
        Ok(())
    }
    .await;
    store.close().await;
    drop(sink);
    let target = out.map(|p| p.display().to_string());
    written.with_context(|| {
        format!(
            "export to {} stopped",
            target.as_deref().unwrap_or("stdout")
        )
    })?;
    if let (Some(f), Some(path)) = (&file, &target) {
        f.sync_all()
            .with_context(|| format!("cannot write {path} to disk"))?;
    }
    let whither = target.unwrap_or_else(|| "stdout".into());
    if include_tokens {
        eprintln!(
            "exported {n} account(s) with their tokens to {whither} (mode 0600): keep it like the store, it can take over these accounts"
        );
    } else {
        eprintln!(
            "exported {n} account(s) to {whither} without tokens (an inventory: `accounts import` refuses such lines; use --include-tokens -o FILE to move accounts)"
        );
    }
    Ok(exit::OK)
}

/// A new file only the owner can read; never an existing one (it may be someone's data).
fn create_private(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (an export never overwrites a file: choose a new name)",
                path.display()
            )
        })
}
