//! Fixture root.
pub mod api;
pub mod log;
pub mod store;
