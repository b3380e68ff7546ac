//! Zoho's concurrency limit (calls in flight at once, per organisation) covers every worker at
//! once. A client holds one of the [`CallSlots`] for each call. [`Unshared`] adds nothing to the
//! client's own bound (one process); a deployment with several worker processes plugs in a
//! PostgreSQL-backed one (written with the database code) so the limit is shared.

use async_trait::async_trait;

/// Hands out the slots of a shared concurrency limit.
#[async_trait]
pub trait CallSlots: Send + Sync {
    /// Waits for a free slot; it is held until the guard is dropped.
    async fn acquire(&self) -> SlotGuard;

    /// Gives back, and waits until it has given back, every slot this instance still holds (a
    /// graceful shutdown: the calls are over or abandoned); the guards' own releases are then
    /// no-ops.
    async fn close(&self) {}
}

/// A held slot, released when dropped.
#[must_use = "the slot is released when the guard is dropped"]
pub struct SlotGuard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl SlotGuard {
    /// A slot released by `release`.
    pub fn new(release: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(release)))
    }

    /// Nothing to release.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

impl std::fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotGuard")
    }
}

/// No limit beyond the client's own: one process talks to the CRM.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unshared;

#[async_trait]
impl CallSlots for Unshared {
    async fn acquire(&self) -> SlotGuard {
        SlotGuard::none()
    }
}
