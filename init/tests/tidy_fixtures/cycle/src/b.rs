//! Fixture: b -> c.
pub fn f() {
    crate::c::h();
}
