//! Fixture root.
pub mod events;
pub mod net;
pub mod timers;
