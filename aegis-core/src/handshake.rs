//! The handshake-phase signal that travels with a connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A handle that marks the end of a connection's handshake phase.
///
/// Deadline layers (the slowloris layer in `aegis-layers`) apply strict clocks while a
/// client is still handshaking, and only an idle timeout afterwards. The layer that
/// understands the protocol (the MQTT layer when CONNECT is complete, an HTTP server when
/// headers are read) calls [`complete`](Self::complete) on the handle it reads from its
/// stream with `Param::<Handshake>::param(&io)`.
///
/// A plain [`Conn`](crate::Conn) carries an untracked handle, on which `complete` does
/// nothing. Cloning is cheap (an `Arc`), and every IO wrapper forwards the param.
#[derive(Clone, Debug, Default)]
pub struct Handshake {
    done: Option<Arc<AtomicBool>>,
}

impl Handshake {
    /// A tracked handle, for a layer that enforces a handshake deadline.
    pub fn tracked() -> Self {
        Self {
            done: Some(Arc::new(AtomicBool::new(false))),
        }
    }

    /// An untracked handle: nobody is waiting for the handshake.
    pub const fn untracked() -> Self {
        Self { done: None }
    }

    /// Marks the handshake as complete. Idempotent.
    pub fn complete(&self) {
        if let Some(done) = &self.done {
            done.store(true, Ordering::Release);
        }
    }

    /// Whether [`complete`](Self::complete) was called on this handle or a clone. An
    /// untracked handle always reports `false`.
    pub fn is_complete(&self) -> bool {
        self.done
            .as_ref()
            .is_some_and(|d| d.load(Ordering::Acquire))
    }

    /// Whether this handle is tracked by some layer.
    pub const fn is_tracked(&self) -> bool {
        self.done.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_completion_and_untracked_is_inert() {
        let h = Handshake::tracked();
        let seen_by_layer = h.clone();
        assert!(!seen_by_layer.is_complete());
        h.complete();
        assert!(seen_by_layer.is_complete());
        let none = Handshake::untracked();
        none.complete();
        assert!(!none.is_complete() && !none.is_tracked());
    }
}
