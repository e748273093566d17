//! Fixture: a directory module.
pub mod disk;

pub struct Store;

pub fn open() -> Store {
    disk::touch();
    Store
}
