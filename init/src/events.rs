//! The one event type of stage 2's main loop: it gathers the messages of the loop's
//! producers, each of which owns its message type and sends it through a typed
//! [`crate::sender::Sender`] (`From<T> for Event` below makes the conversion).
//!
//! Everything that can happen to PID 1 after boot is a variant of [`Event`]: a signal
//! ([`crate::signals`]), a service's output line, readiness result or timer (the
//! supervisor's runner), one of stage 2's own timers, a network change ([`crate::network`]),
//! a power-button press, a control request ([`crate::control`]), a fetched config
//! ([`crate::config_source`]), a program read ahead ([`crate::prefetch`]). Producers
//! only turn what they see into messages; the main loop in `stage2` owns all state and
//! handles each event in one `match`. No producer imports this module.

use keelson_netconf::NetEvent;
use tokio::sync::mpsc::UnboundedSender;

use crate::config_source::Fetched;
use crate::control::Call;
use crate::power_button::Pressed;
use crate::prefetch::Outcome;
use crate::signals::SignalKind;
use crate::supervisor::runner::ServiceEvent;

/// How the machine goes down; it is [`crate::shutdown`]'s, named here too for the loop's
/// handlers that still import it from here.
pub use crate::shutdown::ShutdownKind;

/// Stage 2's own timers (the services' timers are the runner's, [`ServiceEvent::Timer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerEvent {
    /// Time to look for a config again (STATE, fw_cfg, config drive) and, without one,
    /// to say again that the node waits for one.
    ConfigReminder,
    /// Time to report PID 1's memory once the node is up and quiet.
    IdleReport,
    /// Time to load the network drivers (and the disk drivers stage 1 left) even though
    /// containerd is not ready yet.
    LateDrivers,
    /// The shutdown's last deadline: kill whatever is left and go down.
    ShutdownDeadline,
    /// A shutdown asked for through the control socket, begun once its answer is out.
    Shutdown(ShutdownKind),
    /// A trial boot's health deadline (`boot_assess`, checked after every event).
    HealthDeadline,
}

/// Everything the main loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// A signal arrived.
    Signal(SignalKind),
    /// A service printed a line, a readiness check finished, or a service timer fired.
    Service(ServiceEvent),
    /// One of stage 2's timers fired.
    Timer(TimerEvent),
    /// The power button was pressed.
    PowerButton(Pressed),
    /// The network changed (from `netconf`; one boot-log line each).
    Network(NetEvent),
    /// A control-socket request and where its answer goes.
    Control(Call),
    /// A program read ahead into the page cache (one boot-log line).
    Prefetched(Outcome),
    /// A config fetched from a URL: its bytes, or why it could not be fetched.
    ConfigFetched(Fetched),
}

/// The main loop's inbox.
pub type EventTx = UnboundedSender<Event>;

macro_rules! from_producer {
    ($($message:ty => $variant:ident),* $(,)?) => {$(
        impl From<$message> for Event {
            fn from(message: $message) -> Event {
                Event::$variant(message)
            }
        }
    )*};
}

from_producer! {
    SignalKind => Signal,
    ServiceEvent => Service,
    TimerEvent => Timer,
    Pressed => PowerButton,
    NetEvent => Network,
    Call => Control,
    Outcome => Prefetched,
    Fetched => ConfigFetched,
}
