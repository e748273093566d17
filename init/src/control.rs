//! PID 1's control socket, [`SOCKET`] (`/run/keelson/init.sock`), for machined: a Unix
//! stream socket, mode 0600 (root's: machined, which runs as its own user, reaches it
//! with `CAP_DAC_OVERRIDE`), one JSON request per line and one answer per line, any
//! number of them on a connection, answered in order.
//!
//! What is said on it is the node protocol's ([`keelson_node_protocol::control`], whose
//! module doc lists every request and its answer): each request is its own type, and
//! stage 2 answers it with that request's own answer type ([`Answer::to`]), so PID 1 and
//! machined read and write the same types. This module serves the socket: it reads a
//! line, parses it, hands the request to the main loop as a [`Call`], and writes back the
//! answer the loop gives; a line that is not a request is refused on the spot and the
//! connection stays open. Reboot, power-off and reset begin [`SHUTDOWN_DELAY`] after
//! their answer, so that the answer reaches the caller (machined) before it is stopped.
//!
//! # Who may speak
//!
//! Only machined, the process the supervisor started: each connection's peer
//! credentials (`SO_PEERCRED`, read by the kernel at `connect`) must name machined's own
//! uid ([`PEER_UID`], `services::MACHINED_USER`) and the pid that the service
//! [`MACHINED_SERVICE`] runs as now, which the main loop publishes through a
//! [`MachinedPid`] before it waits for each event. Nothing else speaks on the socket (the
//! tests speak to machined's API, and machined's own tests to a fake socket), so while
//! machined does not run every connection is refused: a root process in a container, or
//! one that outlived a machined it was not, gets nothing. A refused connection gets one
//! refusal line, is closed before anything it sent is read, and is logged once with the
//! peer's pid and uid and why.
//!
//! # Framing
//!
//! A request line is at most [`MAX_REQUEST`] bytes before its newline. A longer one is
//! refused whole ([`read_frame`]): its bytes are read and dropped up to its newline, so
//! its tail is never read as the next request; a line that has no newline within
//! [`DISCARD_LIMIT`] bytes or [`DISCARD_TIME`] closes the connection.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use crate::sender::Sender;
use crate::syscalls::Syscalls;

pub use keelson_node_protocol::control::{
    Answer, Info, MAX_REQUEST, Refusal, Request, SHUTDOWN_DELAY, SIGNALS, SOCKET, parse_signal,
    vm_rss_kib,
};

/// The service whose process may speak on the socket (`services::machined`'s name).
pub const MACHINED_SERVICE: &str = "machined";
/// The uid the peer must run as: machined's own user's (`services::MACHINED_USER`).
pub const PEER_UID: u32 = crate::services::MACHINED_USER.uid;
/// How many bytes of a line over [`MAX_REQUEST`] are read and dropped, at most, looking
/// for its newline before the connection is closed.
pub const DISCARD_LIMIT: u64 = 64 * 1024 * 1024;
/// How long the rest of a line over [`MAX_REQUEST`] may take to arrive before the
/// connection is closed (machined gives up on a call after 30 s).
pub const DISCARD_TIME: Duration = Duration::from_secs(30);

/// One request for the main loop, and where its answer goes.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// The answer, written back to the connection that asked.
    pub reply: oneshot::Sender<Answer>,
}

/// The pid machined runs as, shared between the main loop (which owns the supervisor
/// and sets it) and the socket (which reads it for each connection). 0 while it does
/// not run: no process has pid 0.
#[derive(Debug, Clone, Default)]
pub struct MachinedPid(Arc<AtomicU32>);

impl MachinedPid {
    /// Say that machined runs as `pid` (`None`: it does not run).
    pub fn set(&self, pid: Option<u32>) {
        self.0.store(pid.unwrap_or(0), Ordering::SeqCst);
    }

    /// The pid machined runs as, if it runs.
    pub fn get(&self) -> Option<u32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }
}

/// Who may speak on the socket: a process of `uid` whose pid is `machined`'s.
#[derive(Debug, Clone)]
pub struct AllowedPeer {
    /// The uid the peer must run as ([`PEER_UID`] on the node).
    pub uid: u32,
    /// The pid of the running machined.
    pub machined: MachinedPid,
}

impl AllowedPeer {
    /// The node's rule: machined's uid, and the pid of the machined the supervisor
    /// started.
    pub fn machined(machined: MachinedPid) -> AllowedPeer {
        AllowedPeer {
            uid: PEER_UID,
            machined,
        }
    }

    /// Whether the peer of `uid` and `pid` (as `SO_PEERCRED` gave them) may speak.
    pub fn judge(&self, uid: u32, pid: Option<i32>) -> Result<(), PeerRefused> {
        if uid != self.uid {
            return Err(PeerRefused::WrongUid {
                uid,
                expected: self.uid,
            });
        }
        let Some(machined) = self.machined.get() else {
            return Err(PeerRefused::NoMachined);
        };
        match pid.and_then(|p| u32::try_from(p).ok()) {
            Some(pid) if pid == machined => Ok(()),
            Some(pid) => Err(PeerRefused::NotMachined { pid, machined }),
            None => Err(PeerRefused::NoPid),
        }
    }
}

/// Why a connection was refused before any of its lines was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefused {
    /// The kernel did not give the peer's credentials.
    #[error("its credentials (SO_PEERCRED) cannot be read: {0}")]
    Unreadable(String),
    /// The peer runs as another user.
    #[error("it runs as uid {uid}, and only machined, as uid {expected}, may speak here")]
    WrongUid {
        /// The peer's uid.
        uid: u32,
        /// The uid required.
        expected: u32,
    },
    /// No machined runs, so no process may speak.
    #[error("machined is not running, and only machined may speak here")]
    NoMachined,
    /// The peer is another process than the running machined.
    #[error("pid {pid} is not machined (pid {machined}), and only machined may speak here")]
    NotMachined {
        /// The peer's pid.
        pid: u32,
        /// machined's pid.
        machined: u32,
    },
    /// The kernel gave no pid for the peer (one in a pid namespace PID 1 cannot see).
    #[error("its pid is unknown, so it cannot be machined")]
    NoPid,
}

/// One line read from a connection by [`read_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A line within the limit, without its newline (the last line may lack one).
    Line(Vec<u8>),
    /// A line over the limit, read up to and with its newline and dropped: the next
    /// line is the next request.
    TooLong,
    /// A line over the limit whose newline did not come within [`DISCARD_LIMIT`] bytes
    /// or [`DISCARD_TIME`], or before the end: the connection is to be closed.
    TooLongUnended,
    /// The peer closed the connection.
    End,
}

/// Read the next line of at most `max` bytes (without its newline) from `reader`; a
/// longer one is read and dropped whole, never seen as the start of the next line.
pub async fn read_frame<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> io::Result<Frame> {
    let mut line = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Frame::Line(line));
    }
    if line.is_empty() {
        return Ok(Frame::End);
    }
    if line.len() <= max {
        // The last line, without a newline.
        return Ok(Frame::Line(line));
    }
    match tokio::time::timeout(DISCARD_TIME, discard_line(reader, DISCARD_LIMIT)).await {
        Ok(Ok(true)) => Ok(Frame::TooLong),
        Ok(Ok(false)) | Err(_) => Ok(Frame::TooLongUnended),
        Ok(Err(e)) => Err(e),
    }
}

/// Drop bytes up to and with the next newline, at most `limit` of them. Whether the
/// newline was found.
async fn discard_line<R: AsyncBufRead + Unpin>(reader: &mut R, limit: u64) -> io::Result<bool> {
    let mut left = limit;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(false);
        }
        let newline = chunk.iter().position(|&b| b == b'\n');
        let used = newline.map_or(chunk.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(true);
        }
        left = left.saturating_sub(u64::try_from(used).unwrap_or(u64::MAX));
        if left == 0 {
            return Ok(false);
        }
    }
}

/// Bind the socket at `path` (replacing a stale one, mode 0600) and serve it to the
/// peer `allowed` lets in: each request is sent on `events` as a [`Call`] whose answer
/// is written back. Aborting the returned handle closes the socket (its mount, `/run`,
/// is then no longer busy).
pub fn serve(
    sys: &dyn Syscalls,
    path: &Path,
    events: Sender<Call>,
    allowed: AllowedPeer,
) -> io::Result<tokio::task::AbortHandle> {
    if let Some(dir) = path.parent() {
        sys.create_dir_all(dir)?;
    }
    let _ = sys.remove_file(path);
    let listener = UnixListener::bind(path)?;
    sys.set_mode(path, 0o600)?;
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve_connection(conn, events.clone(), allowed.clone()));
        }
    });
    Ok(task.abort_handle())
}

/// Serve one connection: its peer judged first, then its lines one by one.
async fn serve_connection(conn: UnixStream, events: Sender<Call>, allowed: AllowedPeer) {
    let (uid, pid, verdict) = match conn.peer_cred() {
        Ok(cred) => (
            Some(cred.uid()),
            cred.pid(),
            allowed.judge(cred.uid(), cred.pid()),
        ),
        Err(e) => (None, None, Err(PeerRefused::Unreadable(e.to_string()))),
    };
    let (read, mut write) = conn.into_split();
    if let Err(why) = verdict {
        let known = |n: Option<String>| n.unwrap_or_else(|| "unknown".into());
        tracing::warn!(
            peer_pid = %known(pid.map(|p| p.to_string())),
            peer_uid = %known(uid.map(|u| u.to_string())),
            "control socket: connection refused: {why}"
        );
        // Nothing it sent is read: the refusal, then the close.
        let refusal = Answer::refused(format!("control socket: refused: {why}"));
        let _ = write
            .write_all(format!("{}\n", refusal.line()).as_bytes())
            .await;
        return;
    }
    let mut lines = BufReader::new(read);
    loop {
        let (answer, go_on) = match read_frame(&mut lines, MAX_REQUEST).await {
            Ok(Frame::End) | Err(_) => break,
            Ok(Frame::Line(line)) => match String::from_utf8(line) {
                Ok(text) => match Request::parse(text.trim()) {
                    Ok(request) => match ask(&events, request).await {
                        Some(answer) => (answer, true),
                        None => break,
                    },
                    Err(e) => (Answer::refused(e), true),
                },
                Err(_) => (Answer::refused("not a request: not UTF-8"), true),
            },
            Ok(Frame::TooLong) => (too_long(), true),
            Ok(Frame::TooLongUnended) => (too_long(), false),
        };
        let mut text = answer.line().to_string();
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() || !go_on {
            break;
        }
    }
}

/// Hand `request` to the main loop and wait for its answer; `None` once the loop is gone.
async fn ask(events: &Sender<Call>, request: Request) -> Option<Answer> {
    let (reply, rx) = oneshot::channel();
    events.send(Call { request, reply }).ok()?;
    Some(
        rx.await
            .unwrap_or_else(|_| Answer::refused("PID 1 dropped the request")),
    )
}

/// The refusal of a line over [`MAX_REQUEST`].
fn too_long() -> Answer {
    Answer::refused(format!(
        "request line longer than {MAX_REQUEST} bytes, the control socket's limit: refused whole, none of it was read as a request"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_node_protocol::control::Services;
    use tokio::sync::mpsc::UnboundedReceiver;

    /// The main loop's part: answer list with nothing, anything else with a refusal
    /// naming it; every request it saw goes on `seen`.
    fn answer_calls(
        mut rx: UnboundedReceiver<Call>,
        seen: tokio::sync::mpsc::UnboundedSender<String>,
    ) {
        tokio::spawn(async move {
            while let Some(Call { request, reply }) = rx.recv().await {
                let _ = seen.send(request.op().to_string());
                let _ = reply.send(match request {
                    Request::List(list) => Answer::to(
                        &list,
                        Ok(Services {
                            services: Vec::new(),
                        }),
                    ),
                    other => Answer::refused(format!("refused {}", other.op())),
                });
            }
        });
    }

    /// Serve a socket in a temporary directory to `machined` (with the test's own uid),
    /// connect, write `sent`, close the writing half and read every answer line; also
    /// the ops the main loop was asked. The socket's mode is checked.
    fn converse(machined: Option<u32>, sent: &[u8]) -> io::Result<(Vec<String>, Vec<String>)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run/keelson/init.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Call>();
            let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
            let pid = MachinedPid::default();
            pid.set(machined);
            let allowed = AllowedPeer {
                uid: rustix::process::getuid().as_raw(),
                machined: pid,
            };
            serve(&crate::syscalls::Linux, &path, Sender::new(tx), allowed)?;
            answer_calls(rx, seen_tx);
            let conn = UnixStream::connect(&path).await?;
            let (read, mut write) = conn.into_split();
            // Written by a task, as a client that writes its whole line before it reads.
            let sent = sent.to_vec();
            let writer = tokio::spawn(async move {
                let _ = write.write_all(&sent).await;
                let _ = write.shutdown().await;
            });
            let mut answers = Vec::new();
            let mut lines = BufReader::new(read);
            let mut line = String::new();
            // A refused peer's close may end its reads with ECONNRESET after the answer.
            while let Ok(1..) = lines.read_line(&mut line).await {
                answers.push(line.trim_end().to_string());
                line.clear();
            }
            let _ = writer.await;
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
            assert_eq!(mode & 0o777, 0o600);
            let mut seen = Vec::new();
            while let Ok(op) = seen_rx.try_recv() {
                seen.push(op);
            }
            Ok((answers, seen))
        })
    }

    fn me() -> Option<u32> {
        Some(std::process::id())
    }

    #[test]
    fn the_socket_answers_machined_line_by_line() -> io::Result<()> {
        let (answers, seen) =
            converse(me(), b"{\"op\":\"list\"}\nnonsense\n{\"op\":\"reboot\"}\n")?;
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert_eq!(answers[0], r#"{"ok":true,"services":[]}"#);
        assert!(answers[1].starts_with(r#"{"ok":false,"error":"not a request"#));
        assert_eq!(answers[2], r#"{"ok":false,"error":"refused reboot"}"#);
        assert_eq!(seen, ["list", "reboot"]);
        Ok(())
    }

    #[test]
    fn a_line_over_the_limit_is_refused_whole_and_the_next_is_served() -> io::Result<()> {
        // Today's server read the first MAX_REQUEST bytes as one line and the tail,
        // a valid request, as the next: it ran the reboot.
        let mut sent = vec![b' '; MAX_REQUEST];
        sent.extend_from_slice(b"{\"op\":\"reboot\"}\n{\"op\":\"list\"}\n");
        let (answers, seen) = converse(me(), &sent)?;
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert_eq!(
            answers[0],
            format!(
                r#"{{"ok":false,"error":"request line longer than {MAX_REQUEST} bytes, the control socket's limit: refused whole, none of it was read as a request"}}"#
            )
        );
        assert_eq!(answers[1], r#"{"ok":true,"services":[]}"#);
        assert_eq!(seen, ["list"]);
        Ok(())
    }

    #[test]
    fn a_line_at_the_limit_is_served() -> io::Result<()> {
        let request = b"{\"op\":\"list\"}";
        let mut sent = vec![b' '; MAX_REQUEST - request.len()];
        sent.extend_from_slice(request);
        sent.push(b'\n');
        let (answers, seen) = converse(me(), &sent)?;
        assert_eq!(answers, [r#"{"ok":true,"services":[]}"#]);
        assert_eq!(seen, ["list"]);
        Ok(())
    }

    #[test]
    fn a_peer_that_is_not_machined_is_refused_and_nothing_it_sent_runs() -> io::Result<()> {
        // machined runs as another pid than this test's process.
        let other = std::process::id().wrapping_add(1).max(2);
        let (answers, seen) = converse(Some(other), b"{\"op\":\"reboot\"}\n")?;
        assert_eq!(
            answers,
            [format!(
                r#"{{"ok":false,"error":"control socket: refused: pid {} is not machined (pid {other}), and only machined may speak here"}}"#,
                std::process::id()
            )]
        );
        assert!(seen.is_empty(), "{seen:?}");
        // No machined at all: nobody is served.
        let (answers, seen) = converse(None, b"{\"op\":\"reboot\"}\n")?;
        assert_eq!(
            answers,
            [
                r#"{"ok":false,"error":"control socket: refused: machined is not running, and only machined may speak here"}"#
            ]
        );
        assert!(seen.is_empty(), "{seen:?}");
        Ok(())
    }

    #[test]
    fn the_judge_wants_machined_uid_and_pid() {
        const M: u32 = 50;
        assert_eq!(PEER_UID, M);
        let machined = MachinedPid::default();
        let allowed = AllowedPeer::machined(machined.clone());
        assert_eq!(allowed.judge(M, Some(42)), Err(PeerRefused::NoMachined));
        machined.set(Some(42));
        let cases = [
            ((M, Some(42)), Ok(())),
            (
                (1000, Some(42)),
                Err(PeerRefused::WrongUid {
                    uid: 1000,
                    expected: M,
                }),
            ),
            // root is not machined: a root process in a container gets nothing.
            (
                (0, Some(42)),
                Err(PeerRefused::WrongUid {
                    uid: 0,
                    expected: M,
                }),
            ),
            (
                (M, Some(43)),
                Err(PeerRefused::NotMachined {
                    pid: 43,
                    machined: 42,
                }),
            ),
            ((M, None), Err(PeerRefused::NoPid)),
            (
                (M, Some(0)),
                Err(PeerRefused::NotMachined {
                    pid: 0,
                    machined: 42,
                }),
            ),
            ((M, Some(-1)), Err(PeerRefused::NoPid)),
        ];
        for ((uid, pid), expected) in cases {
            assert_eq!(allowed.judge(uid, pid), expected, "uid {uid} pid {pid:?}");
        }
        machined.set(None);
        assert_eq!(allowed.judge(M, Some(42)), Err(PeerRefused::NoMachined));
    }

    #[test]
    fn the_served_service_is_the_one_stage2_starts() {
        assert_eq!(crate::services::machined().name, MACHINED_SERVICE);
    }

    fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let Ok(rt) = rt else { return Vec::new() };
        rt.block_on(async {
            let mut reader = input;
            let mut out = Vec::new();
            loop {
                match read_frame(&mut reader, max).await {
                    Ok(Frame::End) | Err(_) => return out,
                    Ok(frame) => out.push(frame),
                }
            }
        })
    }

    #[test]
    fn frames_are_lines_up_to_the_limit() {
        let line = |s: &str| Frame::Line(s.as_bytes().to_vec());
        let cases: &[(&[u8], Vec<Frame>)] = &[
            (b"", vec![]),
            (b"abcd\nef\n", vec![line("abcd"), line("ef")]),
            (b"abcd\nlast", vec![line("abcd"), line("last")]),
            (b"abcde\nef\n", vec![Frame::TooLong, line("ef")]),
            (b"abcdefghij\nef\n", vec![Frame::TooLong, line("ef")]),
            (b"abcde", vec![Frame::TooLongUnended]),
            (b"\n\n", vec![line(""), line("")]),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &frames(input, 4),
                expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
