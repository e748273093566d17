//! The bundle file: one file that carries a slot's payload and its signed manifest.
//!
//! ```text
//! "KEELSONB" (8 bytes)
//! manifest length (u32, little endian, at most 64 KiB)
//! manifest (JSON, see crate::manifest)
//! Ed25519 signature (64 bytes) over every byte before it
//! the parts (root, kernel, initrd), in manifest order, back to back
//! ```
//!
//! The signature covers the manifest, and the manifest holds each part's size and
//! sha256: a node that verified the signature and each part's sha256 has exactly what the
//! key's holder built. Nothing follows the last part.
//!
//! [`write_bundle`] and [`write_bundle_files`] write a bundle; [`BundleParser`] reads one
//! as it streams in, without I/O of its own.

mod parse;
mod write;

pub use parse::{BundleError, BundleParser, Event, ParserLimits};
pub use write::{WriteError, hash_part, write_bundle, write_bundle_files};

use crate::manifest::Manifest;

/// The first 8 bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"KEELSONB";
/// The largest manifest a bundle may hold.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;
/// An Ed25519 signature's size.
pub const SIGNATURE_LEN: usize = 64;
/// The bytes before the manifest: the magic and the manifest's length.
pub const PREFIX_LEN: usize = MAGIC.len() + 4;

/// A bundle's header, as the parser read it: what the signature covers, the signature,
/// and the manifest parsed from those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The manifest, parsed and validated (but not yet trusted: see
    /// [`crate::keys::verify`]).
    pub manifest: Manifest,
    /// The signed bytes: the magic, the length and the manifest's JSON.
    pub signed_bytes: Vec<u8>,
    /// The Ed25519 signature over `signed_bytes`.
    pub signature: [u8; SIGNATURE_LEN],
}

impl Header {
    /// The bundle's total size: the header and every part.
    pub fn bundle_size(&self) -> u64 {
        ((self.signed_bytes.len() + SIGNATURE_LEN) as u64)
            .saturating_add(self.manifest.parts_size())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::{self, SigningKey};
    use crate::manifest::{PART_NAMES, tests::sample};

    /// The parts of a small bundle: a one-block root with its verity tree, a kernel, an
    /// initramfs.
    pub(crate) fn parts() -> [Vec<u8>; 3] {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let tree = crate::verity::build(&data[..], b"salt", [0; 16]).unwrap();
        let mut root = data;
        root.extend_from_slice(&tree.bytes);
        [root, b"kernel bytes".to_vec(), b"initrd!".to_vec()]
    }

    pub(crate) fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// A signed bundle of [`parts`], its manifest as written.
    pub(crate) fn bundle(key: &SigningKey) -> (Vec<u8>, Manifest) {
        let parts = parts();
        let mut manifest = sample([1, 1, 1]);
        manifest.parts = PART_NAMES
            .iter()
            .zip(&parts)
            .map(|(name, bytes)| hash_part(name, &bytes[..]).unwrap())
            .collect();
        let mut out = Vec::new();
        write_bundle(
            &mut out,
            &manifest,
            [&parts[0][..], &parts[1][..], &parts[2][..]],
            key,
        )
        .unwrap();
        manifest.key_id = keys::key_id(&key.verifying_key());
        (out, manifest)
    }

    /// What a parser makes of `bytes` fed in `chunks` (sizes, cycled): the events with
    /// each part's data joined, and the result of the first error or of `finish`.
    type Summary = (
        Vec<String>,
        [Vec<u8>; 3],
        Option<Header>,
        Result<(), String>,
    );

    fn parse_in(bytes: &[u8], chunks: &[usize]) -> Summary {
        let mut parser = BundleParser::new(ParserLimits::default());
        let mut names = Vec::new();
        let mut data: [Vec<u8>; 3] = Default::default();
        let mut header = None;
        let mut rest = bytes;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            match parser.feed(chunk) {
                Ok(events) => {
                    for event in events {
                        match event {
                            Event::Header(h) => {
                                names.push("header".to_string());
                                header = Some(*h);
                            }
                            Event::PartData { part, bytes } => {
                                assert!(!bytes.is_empty());
                                data[part].extend_from_slice(bytes);
                            }
                            Event::PartEnd { part } => names.push(format!("end {part}")),
                            Event::End => names.push("end".to_string()),
                        }
                    }
                }
                Err(e) => return (names, data, header, Err(e.to_string())),
            }
        }
        let done = parser.finish().map_err(|e| e.to_string());
        (names, data, header, done)
    }

    #[test]
    fn a_written_bundle_parses_back() {
        let key = key(1);
        let (bytes, manifest) = bundle(&key);
        let (names, data, header, done) = parse_in(&bytes, &[bytes.len()]);
        done.unwrap();
        assert_eq!(names, ["header", "end 0", "end 1", "end 2", "end"]);
        assert_eq!(data, parts());
        let header = header.unwrap();
        assert_eq!(header.manifest, manifest);
        assert_eq!(header.bundle_size(), bytes.len() as u64);
        assert_eq!(&header.signed_bytes[..8], MAGIC);
        let trusted = keys::TrustedKeys::new([("dev.pub".to_string(), key.verifying_key())]);
        keys::verify(&header, &trusted).unwrap();
    }

    /// A small deterministic generator (xorshift), so that the random chunkings are the
    /// same on every run.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn any_chunking_gives_the_same_events() {
        let (bytes, _) = bundle(&key(2));
        let whole = parse_in(&bytes, &[bytes.len()]);
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for round in 0..300 {
            let max = [1, 3, 13, 64, 700, 5000][round % 6];
            let chunks: Vec<usize> = (0..17)
                .map(|_| 1 + (xorshift(&mut state) % max) as usize)
                .collect();
            assert_eq!(parse_in(&bytes, &chunks), whole, "chunks {chunks:?}");
        }
        assert_eq!(parse_in(&bytes, &[1]), whole);
    }

    /// Expects `bytes` to be refused with a message holding `words`, whatever the chunks.
    fn refused(bytes: &[u8], words: &str) {
        for chunks in [&[usize::MAX][..], &[1], &[7, 100, 3]] {
            let (_, _, _, done) = parse_in(bytes, chunks);
            let err = done.unwrap_err();
            assert!(err.contains(words), "{err:?} should say {words:?}");
        }
    }

    #[test]
    fn malformed_bundles_are_refused() {
        let (bytes, manifest) = bundle(&key(3));
        let header_len = PREFIX_LEN + manifest.to_json().len() + SIGNATURE_LEN;
        refused(b"", "ended after 0 bytes, inside its header");
        refused(b"KEELSONX", "not a Keelson upgrade bundle");
        refused(b"PK\x03\x04", "not a Keelson upgrade bundle");
        let (_, _, _, done) = parse_in(b"PK\x03\x04", &[100]);
        assert!(done.unwrap_err().contains("starts with PK\\x03\\x04"));
        refused(&bytes[..20], "ended after 20 bytes, inside its header");
        refused(
            &bytes[..header_len + 5],
            &format!(
                "ended {} bytes early, inside part root",
                bytes.len() - header_len - 5
            ),
        );
        refused(
            &bytes[..bytes.len() - 1],
            "ended 1 bytes early, inside part initrd",
        );
        let mut long = bytes.clone();
        long.push(0);
        refused(
            &long,
            &format!("past its last part (at byte {})", bytes.len()),
        );

        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        refused(&huge, "manifest length is 4294967295 bytes");
        let mut zero = bytes.clone();
        zero[8..12].copy_from_slice(&0u32.to_le_bytes());
        refused(&zero, "manifest length is 0 bytes");

        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        refused(&tampered, "the bundle's initrd part has sha256");
        let mut tampered = bytes.clone();
        tampered[header_len] ^= 1;
        refused(&tampered, "the bundle's root part has sha256");

        let mut bad_json = bytes.clone();
        bad_json[PREFIX_LEN] = b'[';
        refused(&bad_json, "manifest is refused");
    }

    #[test]
    fn limits_are_kept_and_a_failed_parser_stays_failed() {
        let (bytes, _) = bundle(&key(4));
        let mut parser = BundleParser::new(ParserLimits {
            max_manifest_len: 10,
            ..ParserLimits::default()
        });
        assert!(matches!(
            parser.feed(&bytes),
            Err(BundleError::ManifestLength { max: 10, .. })
        ));
        assert!(matches!(parser.feed(b"x"), Err(BundleError::AlreadyFailed)));
        assert!(parser.finish().is_err());

        let mut parser = BundleParser::new(ParserLimits {
            max_bundle_size: bytes.len() as u64 - 1,
            ..ParserLimits::default()
        });
        assert!(matches!(
            parser.feed(&bytes),
            Err(BundleError::TooLarge { .. })
        ));
        let mut parser = BundleParser::new(ParserLimits {
            max_bundle_size: bytes.len() as u64,
            ..ParserLimits::default()
        });
        parser.feed(&bytes).unwrap();
        assert!(parser.is_done());
        assert_eq!(parser.consumed(), bytes.len() as u64);
    }

    #[test]
    fn huge_part_sizes_end_in_an_error() {
        let mut manifest = sample([u64::MAX - 1, u64::MAX - 1, u64::MAX - 1]);
        manifest.key_id = "0123456789abcdef".into();
        let json = manifest.to_json();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        bytes.extend_from_slice(&[0; SIGNATURE_LEN]);
        bytes.extend_from_slice(b"some root bytes");
        let (names, _, header, done) = parse_in(&bytes, &[5]);
        assert_eq!(names, ["header"]);
        assert_eq!(header.unwrap().bundle_size(), u64::MAX);
        assert!(done.unwrap_err().contains("inside part root"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let (bytes, _) = bundle(&key(5));
        let mut state = 7u64;
        for _ in 0..2000 {
            let mut mutated = bytes.clone();
            for _ in 0..(xorshift(&mut state) % 4 + 1) {
                let at = (xorshift(&mut state) % mutated.len() as u64) as usize;
                mutated[at] = xorshift(&mut state) as u8;
            }
            let cut = (xorshift(&mut state) % (mutated.len() as u64 + 1)) as usize;
            let _ = parse_in(&mutated[..cut], &[1 + (xorshift(&mut state) % 50) as usize]);
        }
    }

    #[test]
    fn the_writer_takes_files_and_fills_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let parts = parts();
        let paths: Vec<_> = PART_NAMES
            .iter()
            .zip(&parts)
            .map(|(name, bytes)| {
                let path = dir.path().join(name);
                std::fs::write(&path, bytes).unwrap();
                path
            })
            .collect();
        let key = key(6);
        let mut out = Vec::new();
        let mut draft = sample([1, 1, 1]);
        draft.parts.clear();
        let written =
            write_bundle_files(&mut out, draft, [&paths[0], &paths[1], &paths[2]], &key).unwrap();
        let (expected, manifest) = bundle(&key);
        assert_eq!(written, manifest);
        assert_eq!(out, expected);

        let missing = dir.path().join("nope");
        let err = write_bundle_files(
            Vec::new(),
            sample([1, 1, 1]),
            [&paths[0], &missing, &paths[2]],
            &key,
        )
        .unwrap_err();
        assert!(err.to_string().contains("kernel part from"), "{err}");
    }

    #[test]
    fn the_writer_refuses_parts_unlike_the_manifest() {
        let (_, manifest) = bundle(&key(7));
        let parts = parts();
        let err = write_bundle(
            Vec::new(),
            &manifest,
            [&parts[0][..], &b"other kernel"[..], &parts[2][..]],
            &key(7),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            WriteError::PartChanged { part: "kernel", .. }
        ));
        let mut invalid = manifest.clone();
        invalid.arch = "sparc".into();
        let err = write_bundle(
            Vec::new(),
            &invalid,
            [&parts[0][..], &parts[1][..], &parts[2][..]],
            &key(7),
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::Manifest(_)));
    }
}
