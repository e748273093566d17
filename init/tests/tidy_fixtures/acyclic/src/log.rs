//! Fixture: a leaf. Its doc names crate::api, which is no edge.

/// Not an import: "crate::api::run".
pub fn line(_: &str) {
    let _ = "use crate::store;";
    let _ = '{';
}
