//! The sans-IO bundle parser: bytes in ([`BundleParser::feed`], in chunks of any size),
//! [`Event`]s out, [`BundleParser::finish`] at the end of the stream.
//!
//! It holds at most the header in memory (64 KiB of manifest); a part's bytes are handed
//! out as slices of the fed chunk while their sha256 is computed, and the part's
//! [`Event::PartEnd`] comes only once all of it matched the manifest. Every malformed
//! input is an error, never a panic: a wrong magic, a manifest length of 0 or over the
//! limit, a manifest that does not parse or validate, a part whose sha256 differs, any
//! byte after the last part, a stream that ends early. After an error the parser refuses
//! everything.

use sha2::{Digest, Sha256};

use super::{Header, MAGIC, MAX_MANIFEST_LEN, PREFIX_LEN, SIGNATURE_LEN};
use crate::manifest::{Manifest, ManifestError, PART_NAMES};

/// How much a parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParserLimits {
    /// The largest manifest (capped at [`MAX_MANIFEST_LEN`]).
    pub max_manifest_len: usize,
    /// The largest bundle, header and parts together.
    pub max_bundle_size: u64,
}

impl Default for ParserLimits {
    fn default() -> ParserLimits {
        ParserLimits {
            max_manifest_len: MAX_MANIFEST_LEN,
            max_bundle_size: u64::MAX,
        }
    }
}

/// What the parser found in the bytes fed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The header is complete: verify its signature ([`crate::keys::verify`]) before
    /// acting on any part.
    Header(Box<Header>),
    /// Bytes of part `part` (an index into [`PART_NAMES`]), in order. Not yet checked:
    /// the part is good only at its [`Event::PartEnd`].
    PartData {
        /// The part's index.
        part: usize,
        /// The bytes, a slice of the chunk fed.
        bytes: &'a [u8],
    },
    /// Part `part` is complete and its size and sha256 match the manifest.
    PartEnd {
        /// The part's index.
        part: usize,
    },
    /// The last part ended: the bundle is complete. No byte may follow.
    End,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bytes do not start with [`MAGIC`].
    #[error(
        "this is not a Keelson upgrade bundle (it starts with {found}, not KEELSONB): give the .bundle file that `cargo xtask image` writes"
    )]
    NotABundle {
        /// The first bytes, escaped.
        found: String,
    },
    /// The manifest's length is 0 or over the limit.
    #[error(
        "the bundle's manifest length is {len} bytes; it must be 1 to {max}: the file is not a bundle or it is damaged"
    )]
    ManifestLength {
        /// The length read.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// The manifest was refused.
    #[error("the bundle's manifest is refused")]
    Manifest(#[from] ManifestError),
    /// The bundle is larger than the limit.
    #[error("the bundle is {size} bytes, over this node's limit of {max}: it cannot be taken here")]
    TooLarge {
        /// Its size from the manifest.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A part's bytes are not what the manifest says.
    #[error(
        "the bundle's {part} part has sha256 {found}, the manifest says {expected}: the bundle was altered or damaged on its way; fetch it again"
    )]
    PartSha256 {
        /// The part.
        part: &'static str,
        /// The manifest's sha256.
        expected: String,
        /// The sha256 of the bytes received.
        found: String,
    },
    /// Bytes followed the last part.
    #[error(
        "the bundle goes on past its last part (at byte {at}): it is not the file that was signed; fetch it again"
    )]
    TrailingBytes {
        /// The first extra byte's offset.
        at: u64,
    },
    /// The stream ended inside the header.
    #[error(
        "the bundle ended after {at} bytes, inside its header: the upload or download was cut; send it again"
    )]
    TruncatedHeader {
        /// Bytes received.
        at: u64,
    },
    /// The stream ended inside a part.
    #[error(
        "the bundle ended {missing} bytes early, inside part {part}: the upload or download was cut; send it again"
    )]
    Truncated {
        /// Bytes missing to the end of the bundle.
        missing: u64,
        /// The part it ended in.
        part: &'static str,
    },
    /// The parser was fed after it refused the bundle.
    #[error("this bundle was already refused; start again with a new parser")]
    AlreadyFailed,
}

/// Where the parser is.
#[derive(Debug)]
enum Phase {
    /// Reading the magic and the manifest's length.
    Prefix,
    /// Reading the manifest (of this length) and the signature.
    Header { manifest_len: usize },
    /// Reading a part.
    Part {
        index: usize,
        remaining: u64,
        hasher: Sha256,
    },
    /// The last part ended.
    Done,
    /// An error was returned.
    Failed,
}

/// A push parser of one bundle (see the module's doc).
#[derive(Debug)]
pub struct BundleParser {
    limits: ParserLimits,
    phase: Phase,
    /// The header's bytes read so far.
    header: Vec<u8>,
    /// Bytes accepted so far.
    consumed: u64,
    /// The manifest, once read.
    manifest: Option<Manifest>,
}

impl BundleParser {
    /// A parser at the start of a bundle.
    pub fn new(limits: ParserLimits) -> BundleParser {
        BundleParser {
            limits,
            phase: Phase::Prefix,
            header: Vec::new(),
            consumed: 0,
            manifest: None,
        }
    }

    /// The manifest, once the header was read.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// Bytes accepted so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The bundle's total size, once the header was read.
    pub fn bundle_size(&self) -> Option<u64> {
        let manifest = self.manifest.as_ref()?;
        Some((self.header.len() as u64).saturating_add(manifest.parts_size()))
    }

    /// Whether the whole bundle was read.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Takes the next chunk of the bundle; returns what it completed.
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> Result<Vec<Event<'a>>, BundleError> {
        if matches!(self.phase, Phase::Failed) {
            return Err(BundleError::AlreadyFailed);
        }
        let mut events = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            match self.step(rest, &mut events) {
                Ok(taken) => {
                    rest = &rest[taken..];
                    self.consumed += taken as u64;
                }
                Err(e) => {
                    self.phase = Phase::Failed;
                    return Err(e);
                }
            }
        }
        Ok(events)
    }

    /// Ends the stream: an error unless the whole bundle was read.
    pub fn finish(&self) -> Result<(), BundleError> {
        match &self.phase {
            Phase::Done => Ok(()),
            Phase::Failed => Err(BundleError::AlreadyFailed),
            Phase::Prefix | Phase::Header { .. } => {
                Err(BundleError::TruncatedHeader { at: self.consumed })
            }
            Phase::Part { index, .. } => Err(BundleError::Truncated {
                missing: self
                    .bundle_size()
                    .unwrap_or(0)
                    .saturating_sub(self.consumed),
                part: PART_NAMES[*index],
            }),
        }
    }

    /// Takes what the current phase needs from `input` (not empty); returns how much.
    fn step<'a>(
        &mut self,
        input: &'a [u8],
        events: &mut Vec<Event<'a>>,
    ) -> Result<usize, BundleError> {
        match &mut self.phase {
            Phase::Prefix => {
                let taken = self.take_header(input, PREFIX_LEN);
                let seen = self.header.len().min(MAGIC.len());
                if self.header[..seen] != MAGIC[..seen] {
                    return Err(BundleError::NotABundle {
                        found: self.header[..seen].escape_ascii().to_string(),
                    });
                }
                if self.header.len() == PREFIX_LEN {
                    let len = u32::from_le_bytes([
                        self.header[8],
                        self.header[9],
                        self.header[10],
                        self.header[11],
                    ]);
                    let max = self.limits.max_manifest_len.min(MAX_MANIFEST_LEN);
                    if len == 0 || len as usize > max {
                        return Err(BundleError::ManifestLength { len, max });
                    }
                    self.phase = Phase::Header {
                        manifest_len: len as usize,
                    };
                }
                Ok(taken)
            }
            Phase::Header { manifest_len } => {
                let signed_len = PREFIX_LEN + *manifest_len;
                let taken = self.take_header(input, signed_len + SIGNATURE_LEN);
                if self.header.len() == signed_len + SIGNATURE_LEN {
                    events.push(Event::Header(Box::new(self.read_header(signed_len)?)));
                }
                Ok(taken)
            }
            Phase::Part {
                index,
                remaining,
                hasher,
            } => {
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                let bytes = &input[..n];
                hasher.update(bytes);
                *remaining -= n as u64;
                let part = *index;
                events.push(Event::PartData { part, bytes });
                if *remaining == 0 {
                    let found = hex::encode(std::mem::take(hasher).finalize());
                    self.end_part(part, found, events)?;
                }
                Ok(n)
            }
            Phase::Done => Err(BundleError::TrailingBytes { at: self.consumed }),
            Phase::Failed => Err(BundleError::AlreadyFailed),
        }
    }

    /// Appends to the header up to `target` bytes; returns how many it took.
    fn take_header(&mut self, input: &[u8], target: usize) -> usize {
        let n = target.saturating_sub(self.header.len()).min(input.len());
        self.header.extend_from_slice(&input[..n]);
        n
    }

    /// The complete header: parses the manifest and moves on to the first part.
    fn read_header(&mut self, signed_len: usize) -> Result<Header, BundleError> {
        let manifest = Manifest::parse(&self.header[PREFIX_LEN..signed_len])?;
        let size = (self.header.len() as u64).saturating_add(manifest.parts_size());
        if size > self.limits.max_bundle_size {
            return Err(BundleError::TooLarge {
                size,
                max: self.limits.max_bundle_size,
            });
        }
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&self.header[signed_len..]);
        self.phase = Phase::Part {
            index: 0,
            remaining: manifest.parts[0].size,
            hasher: Sha256::new(),
        };
        self.manifest = Some(manifest.clone());
        Ok(Header {
            manifest,
            signed_bytes: self.header[..signed_len].to_vec(),
            signature,
        })
    }

    /// Part `part` has all its bytes, whose sha256 is `found`.
    fn end_part(
        &mut self,
        part: usize,
        found: String,
        events: &mut Vec<Event<'_>>,
    ) -> Result<(), BundleError> {
        let parts = self.manifest.as_ref().map_or(&[][..], |m| &m.parts[..]);
        let expected = parts
            .get(part)
            .map(|p| p.sha256.clone())
            .unwrap_or_default();
        if found != expected {
            return Err(BundleError::PartSha256 {
                part: PART_NAMES[part],
                expected,
                found,
            });
        }
        events.push(Event::PartEnd { part });
        self.phase = match parts.get(part + 1) {
            Some(next) => Phase::Part {
                index: part + 1,
                remaining: next.size,
                hasher: Sha256::new(),
            },
            None => {
                events.push(Event::End);
                Phase::Done
            }
        };
        Ok(())
    }
}
