//! Ed25519 keys for bundles: making a key pair, saving and loading it as PEM (the private
//! key PKCS#8, mode 0600; the public key SPKI), key ids for messages, the directory of
//! public keys a node trusts, and the verification of a bundle's header.
//!
//! A bundle's manifest names the id of the key that signed it ([`key_id`]: the first 16
//! hex digits of the sha256 of the 32 public key bytes), so a node tells "signed by a key
//! I do not trust" from "the bundle was changed after it was signed". The id only picks
//! the key: a signature is accepted only if a trusted key verifies it
//! (`verify_strict`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::Signature;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use sha2::{Digest, Sha256};

use crate::bundle::Header;

/// The key types, so that callers need no dependency of their own.
pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// The extension of the public key files a node trusts.
pub const PUBLIC_KEY_EXTENSION: &str = "pub";

/// Why a key could not be made, saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The system's random source failed.
    #[error("cannot get random bytes for a new key from the system")]
    Random(#[source] getrandom::Error),
    /// A key file could not be read or written.
    #[error("cannot {action} the key file {}", path.display())]
    Io {
        /// `read`, `write`, `list`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A key file is not a PEM key of the expected kind.
    #[error(
        "{} is not an Ed25519 {kind} in PEM ({reason}): give the file `cargo xtask keygen` wrote",
        path.display()
    )]
    Pem {
        /// The file.
        path: PathBuf,
        /// `private key (PKCS#8)` or `public key (SPKI)`.
        kind: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// A key could not be encoded.
    #[error("cannot encode the key as PEM: {0}")]
    Encode(String),
    /// A private key file already exists.
    #[error(
        "the key file {} already exists: remove it first or keep using it",
        path.display()
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// Why a bundle's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The node trusts no key at all.
    #[error(
        "this node trusts no upgrade key (none in its image): it cannot take a signed bundle; build an image with --trust"
    )]
    NoTrustedKeys,
    /// The key that signed the bundle is not one the node trusts.
    #[error(
        "the bundle is signed by a key this node does not trust (key id {key_id}; trusted: {trusted}): sign it with a trusted key, or install an image that trusts this one"
    )]
    UntrustedKey {
        /// The manifest's key id.
        key_id: String,
        /// The trusted keys' ids, comma separated.
        trusted: String,
    },
    /// A trusted key does not verify the signature.
    #[error(
        "the signature does not match the manifest (signed by trusted key {key_id}): the bundle was changed after it was signed (tampered or damaged); do not use it"
    )]
    Mismatch {
        /// The key tried.
        key_id: String,
    },
}

/// A new key pair, from the system's random source.
pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(KeyError::Random)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The id of a public key: the first 16 hex digits of the sha256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// The private key as PKCS#8 PEM.
pub fn private_key_pem(key: &SigningKey) -> Result<String, KeyError> {
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// The public key as SPKI PEM.
pub fn public_key_pem(key: &VerifyingKey) -> Result<String, KeyError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// Saves a private key as PKCS#8 PEM in a new file of mode 0600 (an existing file is
/// never overwritten).
pub fn save_private_key(path: &Path, key: &SigningKey) -> Result<(), KeyError> {
    let pem = private_key_pem(key)?;
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    file.write_all(pem.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// Saves a public key as SPKI PEM (replacing the file).
pub fn save_public_key(path: &Path, key: &VerifyingKey) -> Result<(), KeyError> {
    fs::write(path, public_key_pem(key)?).map_err(|source| KeyError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    fs::read_to_string(path).map_err(|source| KeyError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a private key (PKCS#8 PEM).
pub fn load_private_key(path: &Path) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(&read_text(path)?).map_err(|e| KeyError::Pem {
        path: path.to_path_buf(),
        kind: "private key (PKCS#8)",
        reason: e.to_string(),
    })
}

/// Loads a public key (SPKI PEM).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_public_key_pem(&read_text(path)?).map_err(|e| KeyError::Pem {
        path: path.to_path_buf(),
        kind: "public key (SPKI)",
        reason: e.to_string(),
    })
}

/// One key a node trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// Where it came from (the file's name, or what the caller said).
    pub name: String,
    /// Its id ([`key_id`]).
    pub id: String,
    /// The key.
    pub key: VerifyingKey,
}

/// The public keys a node trusts to sign bundles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// Trusts these keys, each with a name for messages.
    pub fn new(keys: impl IntoIterator<Item = (String, VerifyingKey)>) -> TrustedKeys {
        TrustedKeys {
            keys: keys
                .into_iter()
                .map(|(name, key)| TrustedKey {
                    id: key_id(&key),
                    name,
                    key,
                })
                .collect(),
        }
    }

    /// Loads every `*.pub` file of `dir` (in name order); a file that cannot be read or
    /// is not a key is an error naming it. A missing directory trusts nothing.
    pub fn load_dir(dir: &Path) -> Result<TrustedKeys, KeyError> {
        let list_err = |source| KeyError::Io {
            action: "list",
            path: dir.to_path_buf(),
            source,
        };
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TrustedKeys::default()),
            Err(e) => return Err(list_err(e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.map_err(list_err)?.path();
            if path.extension().is_some_and(|e| e == PUBLIC_KEY_EXTENSION) {
                paths.push(path);
            }
        }
        paths.sort();
        let mut keys = Vec::with_capacity(paths.len());
        for path in paths {
            let key = load_public_key(&path)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            keys.push((name, key));
        }
        Ok(TrustedKeys::new(keys))
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids, comma separated, for messages.
    pub fn ids(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        ids.join(", ")
    }
}

/// Checks a bundle header's signature against the trusted keys; returns the key that
/// verified it. The manifest's `key_id` picks the key; a manifest without one is tried
/// against every trusted key.
pub fn verify<'k>(
    header: &Header,
    trusted: &'k TrustedKeys,
) -> Result<&'k TrustedKey, SignatureError> {
    if trusted.is_empty() {
        return Err(SignatureError::NoTrustedKeys);
    }
    let signature = Signature::from_bytes(&header.signature);
    let good = |k: &&TrustedKey| {
        k.key
            .verify_strict(&header.signed_bytes, &signature)
            .is_ok()
    };
    let key_id = &header.manifest.key_id;
    if key_id.is_empty() {
        return trusted
            .keys
            .iter()
            .find(good)
            .ok_or_else(|| SignatureError::UntrustedKey {
                key_id: "(not named in the manifest)".into(),
                trusted: trusted.ids(),
            });
    }
    let candidates: Vec<&TrustedKey> = trusted.keys.iter().filter(|k| &k.id == key_id).collect();
    if candidates.is_empty() {
        return Err(SignatureError::UntrustedKey {
            key_id: key_id.clone(),
            trusted: trusted.ids(),
        });
    }
    candidates
        .into_iter()
        .find(good)
        .ok_or_else(|| SignatureError::Mismatch {
            key_id: key_id.clone(),
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::bundle::tests::{bundle, key};
    use crate::bundle::{BundleParser, Event, ParserLimits};

    fn header(bytes: &[u8]) -> Header {
        let mut parser = BundleParser::new(ParserLimits::default());
        match parser.feed(bytes).unwrap().remove(0) {
            Event::Header(h) => *h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_round_trip_through_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate().unwrap();
        assert_ne!(key.to_bytes(), generate().unwrap().to_bytes());
        let private = dir.path().join("upgrade.key");
        let public = dir.path().join("upgrade.pub");
        save_private_key(&private, &key).unwrap();
        save_public_key(&public, &key.verifying_key()).unwrap();
        let mode = fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            fs::read_to_string(&private)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert!(
            fs::read_to_string(&public)
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert_eq!(
            load_private_key(&private).unwrap().to_bytes(),
            key.to_bytes()
        );
        assert_eq!(load_public_key(&public).unwrap(), key.verifying_key());
        assert!(matches!(
            save_private_key(&private, &key),
            Err(KeyError::Exists { .. })
        ));
        // A public key is not a private one, and the other way round.
        let err = load_private_key(&public).unwrap_err().to_string();
        assert!(
            err.contains("upgrade.pub is not an Ed25519 private key"),
            "{err}"
        );
        assert!(load_public_key(&private).is_err());
        assert_eq!(key_id(&key.verifying_key()).len(), 16);
    }

    #[test]
    fn a_directory_of_keys_is_loaded_and_a_bad_one_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            TrustedKeys::load_dir(&dir.path().join("none"))
                .unwrap()
                .is_empty()
        );
        for (name, seed) in [("b.pub", 2), ("a.pub", 1)] {
            save_public_key(&dir.path().join(name), &key(seed).verifying_key()).unwrap();
        }
        fs::write(dir.path().join("README"), "not a key").unwrap();
        let trusted = TrustedKeys::load_dir(dir.path()).unwrap();
        let names: Vec<&str> = trusted.keys().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a.pub", "b.pub"]);
        assert_eq!(
            trusted.ids(),
            format!(
                "{}, {}",
                key_id(&key(1).verifying_key()),
                key_id(&key(2).verifying_key())
            )
        );
        fs::write(dir.path().join("c.pub"), "garbage").unwrap();
        let err = TrustedKeys::load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("c.pub is not an Ed25519 public key"), "{err}");
    }

    #[test]
    fn signatures_are_told_apart() {
        let (bytes, _) = bundle(&key(1));
        let good = header(&bytes);
        let trusted = TrustedKeys::new([
            ("one.pub".to_string(), key(1).verifying_key()),
            ("three.pub".to_string(), key(3).verifying_key()),
        ]);
        assert_eq!(verify(&good, &trusted).unwrap().name, "one.pub");

        let others = TrustedKeys::new([("three.pub".to_string(), key(3).verifying_key())]);
        let err = verify(&good, &others).unwrap_err();
        let id = key_id(&key(1).verifying_key());
        assert_eq!(
            err,
            SignatureError::UntrustedKey {
                key_id: id.clone(),
                trusted: key_id(&key(3).verifying_key()),
            }
        );
        assert!(
            err.to_string()
                .contains(&format!("does not trust (key id {id}; trusted: "))
        );

        let mut tampered = good.clone();
        let at = tampered.signed_bytes.len() - 3;
        tampered.signed_bytes[at] ^= 1;
        assert!(matches!(
            verify(&tampered, &trusted),
            Err(SignatureError::Mismatch { .. })
        ));
        let mut bad_signature = good.clone();
        bad_signature.signature[0] ^= 1;
        assert!(matches!(
            verify(&bad_signature, &trusted),
            Err(SignatureError::Mismatch { .. })
        ));
        assert_eq!(
            verify(&good, &TrustedKeys::default()),
            Err(SignatureError::NoTrustedKeys)
        );

        // A manifest that names no key is tried against every trusted key.
        let mut unnamed = good.clone();
        unnamed.manifest.key_id.clear();
        assert_eq!(verify(&unnamed, &trusted).unwrap().name, "one.pub");
        assert!(matches!(
            verify(&unnamed, &others),
            Err(SignatureError::UntrustedKey { .. })
        ));
    }
}
