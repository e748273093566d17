//! A typed sender into stage 2's main loop: what each producer gets instead of the loop's
//! whole channel.
//!
//! A producer (the signal listeners, the supervisor's runner, the control socket, the
//! network engine, the power button, the prefetch, the config fetch) owns its message
//! type and sends it through a [`Sender`] of that type. Stage 2 builds each sender from
//! the loop's channel, whose event type converts from the message (`From<T>`), so no
//! producer names the loop's event type and [`crate::events`] only gathers them.

use std::fmt;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

/// The receiving loop has ended: nothing will read the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the main loop no longer receives messages")]
pub struct Closed;

/// Sends `T` into a channel of any event type that converts from `T`.
pub struct Sender<T> {
    send: Arc<dyn Fn(T) -> Result<(), Closed> + Send + Sync>,
}

impl<T: 'static> Sender<T> {
    /// A sender whose messages arrive on `channel` as `E::from(message)`.
    pub fn new<E>(channel: UnboundedSender<E>) -> Sender<T>
    where
        E: From<T> + Send + 'static,
    {
        Sender {
            send: Arc::new(move |message| channel.send(E::from(message)).map_err(|_| Closed)),
        }
    }

    /// A sender whose messages go to `f` (a test's own channel, a mapping).
    pub fn from_fn(f: impl Fn(T) -> Result<(), Closed> + Send + Sync + 'static) -> Sender<T> {
        Sender { send: Arc::new(f) }
    }

    /// Send `message`; [`Closed`] once the loop has ended.
    pub fn send(&self, message: T) -> Result<(), Closed> {
        (self.send)(message)
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Sender<T> {
        Sender {
            send: Arc::clone(&self.send),
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sender")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Loop {
        Number(u32),
    }

    impl From<u32> for Loop {
        fn from(n: u32) -> Loop {
            Loop::Number(n)
        }
    }

    #[test]
    fn messages_arrive_converted_and_a_closed_loop_is_an_error() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Loop>();
        let numbers: Sender<u32> = Sender::new(tx);
        assert_eq!(numbers.clone().send(7), Ok(()));
        assert_eq!(rx.try_recv().ok(), Some(Loop::Number(7)));
        drop(rx);
        assert_eq!(numbers.send(8), Err(Closed));
    }
}
