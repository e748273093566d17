//! Fixture: a producer that names the gatherer back.
pub struct NetEvent;

pub fn send(_: crate::events::Event) {}
