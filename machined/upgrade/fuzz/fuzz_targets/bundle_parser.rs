//! Feeds arbitrary bytes, as an uploaded or downloaded bundle, to the sans-IO bundle
//! parser of machined's upgrade (`keelson_upgrade::bundle::BundleParser`). The first two
//! bytes (little endian) say where to cut the rest in two; the rest is the bundle.
//!
//! Properties: parsing never panics; the parts' bytes handed out never exceed the sizes
//! the manifest gives; a part ends only once all its bytes came; a bundle fed in two
//! pieces gives the same header, the same part bytes, the same ends and the same kind of
//! error as fed at once, so the parser does not depend on how the stream is cut (an
//! error may quote what it had seen, so its text may differ).

#![no_main]

use std::mem::discriminant;

use keelson_upgrade::bundle::{BundleError, BundleParser, Event, Header, ParserLimits};
use libfuzzer_sys::fuzz_target;

/// What a parser made of a stream: the header, each part's bytes, the ends seen, and
/// the first error or `finish`'s.
#[derive(Debug, PartialEq)]
struct Outcome {
    header: Option<Header>,
    data: [Vec<u8>; 3],
    ends: Vec<Option<usize>>,
    error: Option<std::mem::Discriminant<BundleError>>,
}

fn parse(pieces: &[&[u8]]) -> Outcome {
    let mut parser = BundleParser::new(ParserLimits::default());
    let mut outcome = Outcome {
        header: None,
        data: Default::default(),
        ends: Vec::new(),
        error: None,
    };
    for piece in pieces {
        match parser.feed(piece) {
            Ok(events) => {
                for event in events {
                    match event {
                        Event::Header(h) => outcome.header = Some(*h),
                        Event::PartData { part, bytes } => {
                            outcome.data[part].extend_from_slice(bytes)
                        }
                        Event::PartEnd { part } => {
                            let size = outcome.header.as_ref().map(|h| h.manifest.parts[part].size);
                            assert_eq!(Some(outcome.data[part].len() as u64), size);
                            outcome.ends.push(Some(part));
                        }
                        Event::End => outcome.ends.push(None),
                    }
                }
            }
            Err(e) => {
                outcome.error = Some(discriminant(&e));
                return outcome;
            }
        }
    }
    outcome.error = parser.finish().err().map(|e| discriminant(&e));
    outcome
}

fuzz_target!(|data: &[u8]| {
    let Some((cut, bundle)) = data.split_first_chunk::<2>() else {
        return;
    };
    let whole = parse(&[bundle]);
    if let Some(header) = &whole.header {
        for (part, bytes) in whole.data.iter().enumerate() {
            assert!(bytes.len() as u64 <= header.manifest.parts[part].size);
        }
    }
    let (first, second) = bundle.split_at(usize::from(u16::from_le_bytes(*cut)).min(bundle.len()));
    assert_eq!(whole, parse(&[first, second]));
});
