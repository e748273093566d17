//! Fixture: c -> a, which closes the cycle.
pub fn h() {}

pub fn k() {
    crate::a::g();
}
