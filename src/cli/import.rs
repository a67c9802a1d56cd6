//! `refreshd accounts import`: a JSON-lines file (or stdin) checked line by line by the
//! library's importer and streamed into one transaction; accounts that arrive flagged are
//! announced after the commit (log event and webhook).

use super::{exit, progress};
use anyhow::{Context, Result, bail};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::store::Store;
use refreshd::{import, lifecycle, notify};

/// What `accounts import` counted, for its closing line and `--json`.
#[derive(Default, serde::Serialize)]
struct ImportCounts {
    accounts: usize,
    inserted: usize,
    updated: usize,
    flagged: usize,
}

/// `accounts import`: the file is read line by line and streamed into one transaction in
/// batches, so memory stays flat in the file's size; a problem on any line rolls the whole
/// import back (nothing half-applied), and every problem names its line.
pub async fn import(config: &Config, file: &str, json: bool) -> Result<u8> {
    use std::io::BufRead;
    const BATCH: usize = 1000;
    let (name, reader, size): (String, Box<dyn BufRead + Send>, Option<u64>) = if file == "-" {
        (
            "stdin".into(),
            Box::new(std::io::BufReader::new(std::io::stdin())),
            None,
        )
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot read import file {file}"))?;
        let size = f.metadata().ok().map(|m| m.len());
        (file.to_string(), Box::new(std::io::BufReader::new(f)), size)
    };
    let bar = match size {
        Some(len) => progress(
            len,
            "{bar:40} {bytes}/{total_bytes} read, {msg}, {eta} left",
        ),
        None => {
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
        }
    };
    let now = Clock::system().now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Vec<refreshd::store::NewAccount>>>(2);
    let parse = {
        let (timing, window, bar) = (config.refresh.timing(), config.reauth.window, bar.clone());
        let providers: std::collections::HashMap<String, _> = config
            .providers
            .keys()
            .filter_map(|p| config.credential_of(p).map(|c| (p.clone(), c)))
            .collect();
        let keep_alive: std::collections::HashMap<String, _> = config
            .providers
            .keys()
            .filter_map(|p| config.keep_alive_of(p).map(|d| (p.clone(), d)))
            .collect();
        let name = name.clone();
        tokio::task::spawn_blocking(move || -> Result<Result<usize, import::ImportError>> {
            let mut importer = import::Importer::new(&name, now, timing, window, |p: &str| {
                providers.get(p).copied()
            })
            .with_keep_alive(keep_alive);
            let (mut reader, mut raw, mut n) = (reader, String::new(), 0usize);
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                raw.clear();
                let read = reader
                    .read_line(&mut raw)
                    .with_context(|| format!("cannot read import file {name} after line {n}"))?;
                if read == 0 {
                    break;
                }
                n += 1;
                bar.inc(read as u64);
                let record = importer.line(n, &raw);
                // After a problem the import is refused: nothing more goes to the store.
                if let Some(r) = record.filter(|_| !importer.failed()) {
                    batch.push(r);
                    if batch.len() == BATCH
                        && tx.blocking_send(Some(std::mem::take(&mut batch))).is_err()
                    {
                        break; // the store refused a batch: its error is the answer
                    }
                }
            }
            let checked = importer.finish();
            if checked.is_ok() {
                // The last batch, then the commit; a dropped sender rolls back.
                let _ = tx.blocking_send(Some(batch));
                let _ = tx.blocking_send(None);
            }
            Ok(checked)
        })
    };
    // The store is opened once the first batch passed the checks: a file refused early
    // does not even create the database.
    let Some(first) = rx.recv().await else {
        bar.finish_and_clear();
        parse
            .await
            .context("the import's reader stopped")??
            .map(|_| ())?;
        bail!("{name}: the import stopped before its end: nothing imported");
    };
    let store = Store::open(lifecycle::store_options(config)).await?;
    // Flagged before: a re-import of such an account is not announced again.
    let flagged_before: std::collections::HashMap<_, _> =
        store.flagged_ids().await?.into_iter().collect();
    let (fwd, batches) = tokio::sync::mpsc::channel(2);
    let _ = fwd.send(first).await;
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            if fwd.send(item).await.is_err() {
                break;
            }
        }
    });
    let counts = std::sync::Arc::new(std::sync::Mutex::new(ImportCounts::default()));
    // Accounts that arrive already flagged are announced after the commit, never before.
    let flagged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let written = {
        let (counts, flagged, bar) = (counts.clone(), flagged.clone(), bar.clone());
        store
            .upsert_stream(batches, now, move |records, ids| {
                let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                for (r, (id, new)) in records.iter().zip(ids) {
                    c.accounts += 1;
                    if *new {
                        c.inserted += 1
                    } else {
                        c.updated += 1
                    }
                    if r.reauth_reason.is_some() {
                        flagged
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((r.clone(), (*id, *new)));
                    }
                }
                bar.set_message(format!("{} accounts written", c.accounts));
            })
            .await
    };
    store.close().await;
    bar.finish_and_clear();
    let checked = parse.await.context("the import's reader stopped")??;
    // A problem in the file outranks the rollback it caused.
    checked?;
    written?;
    let flagged = std::mem::take(&mut *flagged.lock().unwrap_or_else(|e| e.into_inner()));
    let (records, ids): (Vec<_>, Vec<_>) = flagged.into_iter().unzip();
    let mut counts = std::mem::take(&mut *counts.lock().unwrap_or_else(|e| e.into_inner()));
    let announced = import::announce_flagged(config, &records, &ids, &flagged_before);
    counts.flagged = announced.len();
    notify::send_now(config, Clock::system(), announced).await;
    if json {
        let mut v = serde_json::to_value(&counts)?;
        v["source"] = serde_json::Value::from(name);
        println!("{v}");
        return Ok(exit::OK);
    }
    if counts.flagged > 0 {
        eprintln!(
            "{} imported account(s) already need re-authorization: see `refreshd accounts list --needs-reauth`",
            counts.flagged
        );
    }
    println!(
        "imported {} account(s) from {name}: {} new, {} updated",
        counts.accounts, counts.inserted, counts.updated
    );
    Ok(exit::OK)
}
