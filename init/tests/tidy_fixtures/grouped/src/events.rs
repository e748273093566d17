//! Fixture: the gatherer, importing its producers in one group.
use crate::{
    net::NetEvent,
    timers::{self, Timer},
};

pub enum Event {
    Net(NetEvent),
    Timer(Timer),
}

pub fn start() {
    timers::start();
}
