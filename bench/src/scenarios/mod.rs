//! The scenarios, one file per group; each is a method on [`crate::harness::Bench`] that
//! measures, adds its rows and details to the report and its points to the plots.
//!
//! - `store`: seed (`refreshd accounts import` of a generated file), startup across store
//!   sizes, the reauth sweep.
//! - `throughput`: limit, burst, their interleaved rounds, the concurrency sweep.
//! - `schedule`: steady (300 due per second) and realistic (2-hour tokens at 1M).
//! - `postgres`: import and burst on PostgreSQL, beside SQLite.

mod postgres;
mod schedule;

pub(crate) use schedule::STEADY_RATE;
mod store;
mod throughput;
