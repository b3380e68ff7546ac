//! Integration tests: one test binary, each test with its own database (store::testing).

// Test helpers may unwrap: a failure there is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod cli;
mod event_store;
mod global_log;
