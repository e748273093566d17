//! `machined`, the node's API daemon, and `machinectl`, the operator's CLI.

pub mod atomic;
pub mod cli;
pub mod clientconfig;
