//! Feeds arbitrary bytes, as what a peer sends on PID 1's control socket, to the socket's
//! framing (`keelson_init::control::read_frame`) and each line to the request parser
//! (`Request::parse`), as the connection loop does.
//!
//! Input: the first byte is the frame limit (1..=256, small so that lines over it are
//! common), the second the read buffer's size (1..=256, so that lines cross buffer
//! fills as they cross TCP reads); the rest is the stream.
//!
//! Properties: nothing panics; the frames are those of a plain split at newlines (a line
//! within the limit is a line, a longer one is refused whole and the next line is the
//! next frame, a longer unended one ends the connection), whatever the buffer's size; a
//! parsed request reads back as itself from its own line.

#![no_main]

use std::sync::OnceLock;

use keelson_init::control::{Frame, Request, parse_signal, read_frame};
use libfuzzer_sys::fuzz_target;
use tokio::io::BufReader;
use tokio::runtime::Runtime;

/// One runtime for every input: read_frame runs its discard under a timeout.
fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
}

/// The frames of `stream` read through a buffer of `capacity` bytes.
fn frames(rt: &Runtime, stream: &[u8], max: usize, capacity: usize) -> Vec<Frame> {
    rt.block_on(async {
        let mut reader = BufReader::with_capacity(capacity, stream);
        let mut out = Vec::new();
        loop {
            match read_frame(&mut reader, max).await {
                Ok(Frame::End) => return out,
                Ok(Frame::TooLongUnended) => {
                    out.push(Frame::TooLongUnended);
                    return out;
                }
                Ok(frame) => out.push(frame),
                Err(e) => panic!("reading from memory failed: {e}"),
            }
        }
    })
}

/// What the frames must be: the stream split at newlines, judged against the limit.
fn expected(stream: &[u8], max: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let (line, ended, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        if line.len() <= max {
            out.push(Frame::Line(line.to_vec()));
        } else if ended {
            out.push(Frame::TooLong);
        } else {
            out.push(Frame::TooLongUnended);
        }
        rest = next;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(rt) = runtime() else { return };
    let (max, capacity, stream) = match data {
        [m, c, rest @ ..] => (usize::from(*m) + 1, usize::from(*c) + 1, rest),
        _ => return,
    };
    let read = frames(rt, stream, max, capacity);
    assert_eq!(read, expected(stream, max));
    for frame in &read {
        let Frame::Line(line) = frame else { continue };
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        let Ok(request) = Request::parse(text.trim()) else {
            continue;
        };
        assert_eq!(Request::parse(&request.to_line()), Ok(request.clone()));
        if let Request::Kill(kill) = &request {
            let _ = parse_signal(&kill.signal);
        }
    }
});
