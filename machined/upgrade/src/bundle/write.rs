//! Writing a bundle: hash the parts, fill in the manifest, sign, stream the parts.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use super::{MAGIC, MAX_MANIFEST_LEN};
use crate::keys::key_id;
use crate::manifest::{Manifest, ManifestError, PART_NAMES, Part};

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The manifest is not valid.
    #[error("the bundle's manifest is not valid")]
    Manifest(#[from] ManifestError),
    /// The manifest is larger than a bundle allows.
    #[error(
        "the bundle's manifest is {0} bytes, over the limit of 65536: list fewer components or config versions"
    )]
    ManifestTooLarge(usize),
    /// A part's file could not be read.
    #[error("cannot read the bundle's {part} part from {}", path.display())]
    ReadPart {
        /// The part.
        part: &'static str,
        /// Its file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A part's reader failed.
    #[error("cannot read the bundle's {part} part")]
    Reader {
        /// The part.
        part: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A part read while writing was not what the manifest says (a file changed between
    /// the two passes, or the caller's manifest does not describe its readers).
    #[error(
        "the bundle's {part} part was {found_size} bytes with sha256 {found_sha256} while written, but the manifest says {size} bytes with sha256 {sha256}: a file changed while the bundle was written; delete the bundle and write it again"
    )]
    PartChanged {
        /// The part.
        part: &'static str,
        /// The manifest's size.
        size: u64,
        /// The manifest's sha256.
        sha256: String,
        /// The size read.
        found_size: u64,
        /// The sha256 read.
        found_sha256: String,
    },
    /// Writing the bundle failed.
    #[error("cannot write the bundle")]
    Write(#[source] io::Error),
}

/// A part's manifest entry (size and sha256) from its bytes.
pub fn hash_part(name: &str, mut bytes: impl Read) -> io::Result<Part> {
    let mut hasher = Sha256::new();
    let size = io::copy(&mut bytes, &mut HashWriter(&mut hasher))?;
    Ok(Part {
        name: name.to_string(),
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Writes a bundle whose parts are the files `parts` (root, kernel, initrd): reads each
/// once to fill in `manifest.parts`, sets `manifest.key_id` to `key`'s, validates and
/// signs the manifest, then streams the files after it (checking that they did not
/// change). Returns the manifest as written.
pub fn write_bundle_files(
    out: impl Write,
    mut manifest: Manifest,
    parts: [&Path; 3],
    key: &SigningKey,
) -> Result<Manifest, WriteError> {
    let open = |i: usize| {
        let path = parts[i];
        File::open(path)
            .map(BufReader::new)
            .map_err(|source| WriteError::ReadPart {
                part: PART_NAMES[i],
                path: path.to_path_buf(),
                source,
            })
    };
    manifest.parts = Vec::with_capacity(3);
    for (i, name) in PART_NAMES.iter().enumerate() {
        let part = hash_part(name, open(i)?).map_err(|source| WriteError::ReadPart {
            part: PART_NAMES[i],
            path: parts[i].to_path_buf(),
            source,
        })?;
        manifest.parts.push(part);
    }
    manifest.key_id = key_id(&key.verifying_key());
    let readers = [open(0)?, open(1)?, open(2)?];
    write_bundle(out, &manifest, readers, key)?;
    Ok(manifest)
}

/// Writes a bundle: the header with `manifest` (whose `parts` must describe `parts`, and
/// whose `key_id` must be empty or `key`'s: it is set to `key`'s) signed by `key`, then
/// the parts. A part whose bytes are not what the manifest says fails the write (the
/// output is then incomplete: delete it).
pub fn write_bundle(
    mut out: impl Write,
    manifest: &Manifest,
    parts: [impl Read; 3],
    key: &SigningKey,
) -> Result<(), WriteError> {
    let mut manifest = manifest.clone();
    manifest.key_id = key_id(&key.verifying_key());
    manifest.validate()?;
    let json = manifest.to_json();
    if json.len() > MAX_MANIFEST_LEN {
        return Err(WriteError::ManifestTooLarge(json.len()));
    }
    let mut signed = Vec::with_capacity(super::PREFIX_LEN + json.len());
    signed.extend_from_slice(MAGIC);
    signed.extend_from_slice(&(json.len() as u32).to_le_bytes());
    signed.extend_from_slice(&json);
    let signature = key.sign(&signed);
    out.write_all(&signed).map_err(WriteError::Write)?;
    out.write_all(&signature.to_bytes())
        .map_err(WriteError::Write)?;
    let mut buf = vec![0u8; 1 << 20];
    for ((i, mut reader), part) in parts.into_iter().enumerate().zip(&manifest.parts) {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(WriteError::Reader {
                        part: PART_NAMES[i],
                        source,
                    });
                }
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(WriteError::Write)?;
            size += n as u64;
        }
        let sha256 = hex::encode(hasher.finalize());
        if size != part.size || sha256 != part.sha256 {
            return Err(WriteError::PartChanged {
                part: PART_NAMES[i],
                size: part.size,
                sha256: part.sha256.clone(),
                found_size: size,
                found_sha256: sha256,
            });
        }
    }
    out.flush().map_err(WriteError::Write)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
