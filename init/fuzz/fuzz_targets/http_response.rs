//! Feeds arbitrary bytes, as a config server's answer, to the HTTP response reader of
//! PID 1's config fetch (`keelson_init::config_source::http`).
//!
//! Properties: reading never panics; a body is never longer than the limit; an answer
//! read in two pieces (split where its first byte says) gives the same body or the same
//! kind of error as read at once, so the reader does not depend on how TCP cuts the
//! stream (an error quotes what it had seen, so its text may differ); an answer whose body
//! ends with the connection is never said to be whole before it (over TLS, such a body
//! cut without close_notify is refused, so the reader must not have ended it already).

#![no_main]

use std::mem::discriminant;

use keelson_init::config_source::http::{ResponseReader, parse_response};
use libfuzzer_sys::fuzz_target;

/// Small, so that the limit's edges are reached.
const LIMIT: usize = 256;

fuzz_target!(|data: &[u8]| {
    let whole = parse_response(data, LIMIT).map_err(|e| discriminant(&e));
    if let Ok(body) = &whole {
        assert!(body.len() <= LIMIT);
    }
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (first, second) = data.split_at(split);
    let mut reader = ResponseReader::new(LIMIT);
    let pieces = reader.feed(first).and_then(|done| {
        assert!(!(done && reader.reads_until_close()));
        if !done {
            let done = reader.feed(second)?;
            assert!(!(done && reader.reads_until_close()));
        }
        Ok(())
    });
    let pieces = pieces
        .and_then(|()| reader.finish())
        .map_err(|e| discriminant(&e));
    assert_eq!(whole, pieces);
});
