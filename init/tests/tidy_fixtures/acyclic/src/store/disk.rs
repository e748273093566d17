//! Fixture: inside store; super is store, super::super the root.
use super::Store;

pub fn touch() {
    let _: Option<Store> = None;
    super::super::log::line("disk");
    /* crate::api::run() in a block comment */
}
