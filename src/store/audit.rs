//! The audit trail's side of the facade: the admin changes it records (remove, disable,
//! enable, revoke), each written with its audit row in one transaction so nothing is half
//! applied, and reading the trail back (also of a removed account).

use super::{Actor, AuditAction, AuditEntry, Backend, Store, StoreError, postgres, sqlite};
use super::{lite, pg, pg_reports};
use crate::model::Status;

impl Store {
    /// The audit trail of account `id`, newest first; kept after the account is removed.
    pub async fn audit_entries(&self, id: i64) -> Result<Vec<AuditEntry>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::audit_entries(c, id)).await,
            Backend::Postgres(p) => {
                pg_reports::audit_entries(&**p.client("read the audit trail").await?, id).await
            }
        }
    }

    /// `accounts disable` / `enable` by `by`: the status before and, when it changed, after
    /// (the change and its audit row commit together).
    pub async fn set_disabled(
        &self,
        id: i64,
        disable: bool,
        now: i64,
        by: &Actor,
    ) -> Result<(Status, Option<Status>), StoreError> {
        let ctx = "disable or enable account";
        let action = if disable {
            AuditAction::Disabled
        } else {
            AuditAction::Enabled
        };
        match &self.backend {
            Backend::Sqlite(s) => {
                let by = by.clone();
                s.in_tx(ctx, move |tx| {
                    let changed = lite::set_disabled(tx, id, disable, now)?;
                    if changed.1.is_some() {
                        sqlite::writes::append_audit(tx, id, now, action, &by, None)?;
                    }
                    Ok(changed)
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    let changed = pg::set_disabled(tx, id, disable, now).await?;
                    if changed.1.is_some() {
                        postgres::writes::append_audit(tx, id, now, action, by, None).await?;
                    }
                    Ok(changed)
                })
                .await
            }
        }
    }

    /// Removes account `id` and its refresh log, by `by`; its audit trail stays, with a
    /// `removed` row (and before it the revocation's, with the provider's answer, when one
    /// was asked for) written in the same transaction.
    pub async fn remove(
        &self,
        id: i64,
        now: i64,
        by: &Actor,
        revocation: Option<(AuditAction, &str)>,
    ) -> Result<(), StoreError> {
        let ctx = "remove account";
        let revocation = revocation.map(|(action, answer)| (action, answer.to_string()));
        match &self.backend {
            Backend::Sqlite(s) => {
                let by = by.clone();
                s.in_tx(ctx, move |tx| {
                    if let Some((action, answer)) = &revocation {
                        sqlite::writes::append_audit(tx, id, now, *action, &by, Some(answer))?;
                    }
                    sqlite::writes::append_audit(tx, id, now, AuditAction::Removed, &by, None)?;
                    lite::remove(tx, id)
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    if let Some((action, answer)) = &revocation {
                        postgres::writes::append_audit(tx, id, now, *action, by, Some(answer))
                            .await?;
                    }
                    let action = AuditAction::Removed;
                    postgres::writes::append_audit(tx, id, now, action, by, None).await?;
                    pg::remove(tx, id).await
                })
                .await
            }
        }
    }

    /// Records `action` on account `id` in the audit trail alone (a revocation the provider
    /// refused: nothing else changed).
    pub async fn audit(
        &self,
        id: i64,
        now: i64,
        action: AuditAction,
        by: &Actor,
        detail: &str,
    ) -> Result<(), StoreError> {
        let ctx = "append to the audit trail";
        let detail = detail.to_string();
        match &self.backend {
            Backend::Sqlite(s) => {
                let by = by.clone();
                s.in_tx(ctx, move |tx| {
                    sqlite::writes::append_audit(tx, id, now, action, &by, Some(&detail))
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    postgres::writes::append_audit(tx, id, now, action, by, Some(&detail)).await
                })
                .await
            }
        }
    }
}
