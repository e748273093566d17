//! Fixture: a producer that does not.
pub struct Timer;

pub fn start() {}
