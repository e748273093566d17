//! Fixture: uses store and log, in a group and in code.
use crate::{log, store::{Store, open}};

pub fn run() {
    let _ = crate::store::open();
    log::line("api");
}
