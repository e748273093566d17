//! Fixture: a -> b.
use crate::b::f;

pub fn g() {
    f();
}
