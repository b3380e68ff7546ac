//! The outbox and its worker (SPEC §1.3).
//!
//! * [`projector`] derives `integrations_outbox` rows from events (on the projection runner, so
//!   derivation and checkpoint commit together; `dedupe_key` makes it idempotent).
//! * [`worker`] claims due rows with `FOR UPDATE SKIP LOCKED` and a lease, delivers them in order
//!   per entity and target, writes returned ids back through commands, retries with exponential
//!   backoff and full jitter, snoozes on 429 without burning an attempt, dead-letters as `failed`.
//! * [`pg`] keeps what workers share in PostgreSQL: encrypted CRM tokens (one refresher at a
//!   time) and Kommo's request pacing across processes.
//! * [`setup`] builds the CRM clients from the SPEC §6 settings, or the built-in sandbox.
//!
//! Retry timing is computed here from the attempt count stored in the row (a pure function), not
//! by the `backoff` crate the client named: that crate retries in-process and is unmaintained
//! (RUSTSEC-2025-0012); the durable retry state has to live in the table anyway.

pub mod backoff;
pub mod pg;
pub mod projector;
pub mod setup;
pub mod worker;
