//! refreshd keeps OAuth 2.0 connections alive: it stores one row per connected account,
//! refreshes each access token ahead of its expiry, writes rotated tokens back durably
//! before anything else happens, and tells admins which accounts need a human.
//!
//! # Map
//! - [`config`]: defaults < TOML file < `REFRESHD_*` env, validated into typed settings.
//! - [`clock`]: the one source of "now" (system, or manual in tests).
//! - [`model`]: accounts, token sets, statuses, reauth reasons. Plain data.
//! - [`policy`]: `schedule()` of a fresh token set, the one backoff, the reauth window. Pure.
//! - [`store`]: one facade over two backends (SQLite on one worker thread, PostgreSQL for
//!   replicas); leases, generation-guarded writes, group commit, the recovery files.
//! - [`subject`]: the provider's user id, kept exactly; matching stored ones.
//! - [`provider`]: profiles (TikTok, Google, LinkedIn, X, Pinterest, Instagram, Facebook,
//!   Threads, Reddit, or generic from the config): token requests and their answers.
//! - [`provider_state`]: whether a provider refuses our configuration or one account got an
//!   odd answer. Pure.
//! - [`circuit`]: the per-provider circuit breaker (probe while a provider is down). Pure.
//! - [`permits`]: a bound on work in flight that a reload resizes in place, keeping what
//!   is held.
//! - [`engine`]: the refresh loop; its decisions about one account are pure functions
//!   (`engine::decide`).
//! - [`events`]: in-process state changes (tokens rotated, reauth needed, recovered).
//! - [`sink`]: token files for an app, rewritten atomically after each rotation.
//! - [`notify`]: signed webhook notifications of state changes.
//! - [`jobs`]: cron jobs: reauth sweep, digest, log pruning.
//! - [`metrics`]: Prometheus metrics (engine counters, store gauges).
//! - [`lifecycle`]: running the daemon: signals, reload, systemd notifications.
//! - [`crypto`]: token encryption at rest (XChaCha20-Poly1305), key files, key ids.
//! - [`connect`]: connecting accounts: authorization URL, loopback callback (axum), code
//!   exchange.
//! - [`hardening`]: start-up checks: token and key files private, not running as root.
//! - [`import`]: the JSON-lines import format.
//! - [`plan`]: `accounts plan`: due refreshes per minute against the rate limits, the soonest refresh-token ends. Pure.
//! - [`server`]: the ops HTTP server: health, metrics, token API, token proxy, admin page,
//!   web connect.
//! - [`sandbox`]: a TikTok-compatible fake provider for the demo, tests and benchmarks.
//! - [`demo`]: `refreshd demo`.
//! - [`telemetry`]: logging and the stable log events.
//!
//! The modules are layered (ARCHITECTURE.md, "Layers"; kept by `tests/it/layers.rs`): base
//! data, pure rules, config, services, work, daemon, tools; the binary (`src/cli/`) is on top.
//!
//! # Invariants
//! 1. At most one refresh per account is in flight, across all processes sharing the store
//!    (leases).
//! 2. A rotated refresh token is committed durably (or fsynced to the recovery file) before
//!    it is logged or used.
//! 3. No account is silently lost: each ends with a working token or flagged with a reason.
//! 4. No secret reaches a log line, an error, a panic or the CLI unless asked for.
//! 5. Bad input is rejected with an error naming what and where; nothing is half-applied.
//! 6. A transient failure never flags an account; a permanent one is never retried blindly.

pub mod circuit;
pub mod clock;
pub mod config;
pub mod connect;
pub mod crypto;
pub mod demo;
pub mod engine;
pub mod events;
pub mod hardening;
pub mod import;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod permits;
pub mod plan;
pub mod policy;
pub mod provider;
pub mod provider_state;
pub mod sandbox;
pub mod server;
pub mod sink;
pub mod store;
pub mod subject;
pub mod telemetry;
