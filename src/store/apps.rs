//! The facade's part for app tokens (`refreshd apps`, a provider's `apps` in the config):
//! adding one, dispatched to the backend's `add_app`. Listing and removing them are the
//! accounts' own (`Store::list` with a grant, `Store::remove`).

use super::types::{AppAdded, NewApp};
use super::{Backend, Store, StoreError, postgres, sqlite};

impl Store {
    /// Adds the app token `app` (due now, fetched by the next claim), or keeps the one
    /// there, rescoped when its scope changed. Refused when (provider, `app:NAME`) is a
    /// user's account.
    pub async fn add_app(&self, app: NewApp, now: i64) -> Result<AppAdded, StoreError> {
        let ctx = "add app token";
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx(ctx, move |tx| sqlite::writes::add_app(tx, &app, now))
                    .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    postgres::writes::add_app(tx, &app, now).await
                })
                .await
            }
        }
    }
}
