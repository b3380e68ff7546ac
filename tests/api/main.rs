//! API tests: the real service over HTTP, each test with its own database and fake CRMs.

// Test helpers may unwrap: a failure there is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod auth;
mod commands;
mod concurrency;
mod errors;
mod helpers;
mod openapi;
mod operations;
mod story;
mod webhooks;
