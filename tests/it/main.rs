//! One integration-test binary (fast to build). Modules drive the library or the real
//! binary against the sandbox provider (or wiremock) on loopback and a real SQLite file in
//! a temp dir. Set TEST_LOG=1 to see the daemon's logs.

mod admin;
mod admin_page;
mod answers;
mod apps;
mod apps_config;
mod audit;
mod bench;
mod chaos;
mod chaos_answers;
mod chaos_row;
mod chaos_store;
mod cli;
mod connect;
mod dashboards;
mod deploy;
mod docker;
mod docs;
mod engine;
mod helpers;
mod hostile;
mod import_flags;
mod interop;
mod keep_alive;
mod layers;
mod ops_flood;
mod plan;
mod postgres;
mod props;
mod providers;
mod proxy;
mod security;
mod server;
mod sink;
mod startup;
mod webhook;
mod year;
