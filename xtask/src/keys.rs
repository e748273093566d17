//! Upgrade signing keys on the build side: `cargo xtask keygen`, the dev key that images
//! trust and bundles are signed with by default, and the keys an image build bakes in.
//!
//! A key pair is a directory holding `upgrade.key` (the Ed25519 private key, PKCS#8 PEM,
//! mode 0600) and `upgrade.pub` (the public key, SPKI PEM). The dev pair lives in
//! `target/keelson-keys/` and is made on first use; an image trusts it unless `--trust`
//! names other public keys. Each trusted key goes into the root as
//! `usr/share/keelson/upgrade-keys/<key id>.pub`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use keelson_upgrade::keys::{self, SigningKey};

use crate::image::UpgradeArgs;
use crate::workspace_root;

/// The private key's file name in a key pair's directory.
pub const PRIVATE_FILE: &str = "upgrade.key";
/// The public key's file name in a key pair's directory.
pub const PUBLIC_FILE: &str = "upgrade.pub";

/// The dev key pair's directory: `target/keelson-keys/`.
pub fn dev_key_dir() -> PathBuf {
    workspace_root().join("target/keelson-keys")
}

/// `cargo xtask keygen`: a new key pair in `dir`, refusing to replace one unless `force`.
/// Returns the key id.
pub fn keygen(dir: &Path, force: bool) -> Result<String> {
    let private = dir.join(PRIVATE_FILE);
    let public = dir.join(PUBLIC_FILE);
    if !force {
        for path in [&private, &public] {
            if path.exists() {
                bail!(
                    "{} exists: pass --force to replace the pair (images that trust the old \
                     public key then refuse bundles signed with the new one)",
                    path.display()
                );
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = keys::generate()?;
    let id = keys::key_id(&key.verifying_key());
    write_file(&private, keys::private_key_pem(&key)?.as_bytes(), 0o600)?;
    write_file(
        &public,
        keys::public_key_pem(&key.verifying_key())?.as_bytes(),
        0o644,
    )?;
    eprintln!(
        "xtask: key {id}: private {} (keep it secret), public {}",
        private.display(),
        public.display()
    );
    Ok(id)
}

/// Write `data` to `path` with `mode`, through a temporary file renamed into place (the
/// private key is never readable by others, not even while it is written).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

/// The dev key pair's directory, the pair made now if it does not exist.
pub fn ensure_dev_key() -> Result<PathBuf> {
    let dir = dev_key_dir();
    let (private, public) = (dir.join(PRIVATE_FILE), dir.join(PUBLIC_FILE));
    match (private.is_file(), public.is_file()) {
        (true, true) => {}
        (false, false) => {
            eprintln!("xtask: no dev key yet: making one in {}", dir.display());
            keygen(&dir, false)?;
        }
        _ => bail!(
            "{} holds half a key pair ({PRIVATE_FILE} and {PUBLIC_FILE} go together): \
             run `cargo xtask keygen --force` for a new dev pair",
            dir.display()
        ),
    }
    Ok(dir)
}

/// The key that signs bundles: the file `flag` names, else the dev key (made on first use).
pub fn signing_key(flag: Option<&Path>) -> Result<SigningKey> {
    let path = match flag {
        Some(path) => path.to_path_buf(),
        None => ensure_dev_key()?.join(PRIVATE_FILE),
    };
    Ok(keys::load_private_key(&path)?)
}

/// The keys of an image build: the public keys it trusts (key id → PEM text, as the
/// imager bakes them) and the key that signs its bundle.
#[derive(Debug)]
pub struct ImageKeys {
    /// Trusted public keys by key id.
    pub trusted: BTreeMap<String, String>,
    /// The bundle's signing key.
    pub signing: SigningKey,
}

impl ImageKeys {
    /// The keys `args` name, the dev key for what they leave out. Every file is read and
    /// checked here, before anything is built.
    pub fn resolve(args: &UpgradeArgs) -> Result<ImageKeys> {
        let signing = signing_key(args.signing_key.as_deref())?;
        let files = if args.trust.is_empty() {
            vec![ensure_dev_key()?.join(PUBLIC_FILE)]
        } else {
            args.trust.clone()
        };
        let mut trusted = BTreeMap::new();
        for path in &files {
            let key = keys::load_public_key(path)?;
            trusted.insert(keys::key_id(&key), keys::public_key_pem(&key)?);
        }
        let signer = keys::key_id(&signing.verifying_key());
        if !trusted.contains_key(&signer) {
            eprintln!(
                "xtask: note: the image does not trust the key {signer} that signs its own \
                 bundle (it trusts {})",
                trusted.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(ImageKeys { trusted, signing })
    }
}
