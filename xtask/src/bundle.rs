//! Upgrade bundles on the build side.
//!
//! `cargo xtask image` writes `keelson-<arch>.bundle` next to `keelson.raw`
//! ([`write_image_bundle`]): slot A of the image it has just written, read back from the
//! raw disk (the root = the squashfs and its verity tree as they stand at the start of
//! ROOT-A, the kernel and the initramfs from the ESP), with a manifest from the build.
//!
//! `cargo xtask bundle --from DIR` ([`derive`]) makes another bundle from that one without
//! building anything: another version, kernel arguments appended, another initramfs,
//! signed again. The image build leaves nothing else behind for it: the bundle holds every
//! part and the manifest, and each part's sha256 is checked as it is read back.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use keelson_configs::layout::{self, Arch, Slot};
use keelson_configs::schema::CONFIG_VERSION;
use keelson_imager::build::BuildReport;
use keelson_imager::definition::Definition;
use keelson_imager::esp::EspReader;
use keelson_imager::gpt::{self, Window};
use keelson_upgrade::bundle::{self as format, BundleParser, Event, ParserLimits};
use keelson_upgrade::keys::SigningKey;
use keelson_upgrade::manifest::{self, Manifest, PART_NAMES};

use crate::keys;

/// The bundle's file name for `arch`, in an image's output directory.
pub fn file_name(arch: Arch) -> String {
    format!("keelson-{}.bundle", arch.debian())
}

/// A version flag's value: semver (`0.2.0`), as the manifest requires.
pub fn parse_version(s: &str) -> Result<String, String> {
    semver::Version::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}` is not a semantic version such as 0.2.0 ({e})"))
}

/// The three parts of a bundle, in [`manifest::PART_NAMES`] order.
#[derive(Debug)]
pub struct Parts {
    /// The root: squashfs and verity tree, as at the start of the slot's partition.
    pub root: Vec<u8>,
    /// The kernel.
    pub kernel: Vec<u8>,
    /// The initramfs.
    pub initrd: Vec<u8>,
}

/// What [`write_image_bundle`] needs from an image build.
#[derive(Debug)]
pub struct ImageBundle<'a> {
    /// The image definition (for the base command line).
    pub def: &'a Definition,
    /// The architecture.
    pub arch: Arch,
    /// The build's output directory, holding `keelson.raw`.
    pub out_dir: &'a Path,
    /// The OS version.
    pub version: &'a str,
    /// The oldest version the bundle upgrades from.
    pub min_version: Option<&'a str>,
    /// What the build reported (verity parameters, components).
    pub report: &'a BuildReport,
    /// The key that signs the bundle.
    pub signing_key: &'a SigningKey,
}

/// Write `keelson-<arch>.bundle` into the image's output directory, returning its path.
pub fn write_image_bundle(image: &ImageBundle) -> Result<PathBuf> {
    let raw = image.out_dir.join("keelson.raw");
    let parts = read_slot_a(&raw, image.report.verity.hash_offset)?;
    let manifest = Manifest {
        format: manifest::FORMAT,
        version: image.version.to_string(),
        arch: image.arch.debian().to_string(),
        min_version: image.min_version.map(str::to_string),
        components: image.report.components.clone(),
        config_versions: vec![CONFIG_VERSION.to_string()],
        cmdline: image.def.cmdline(image.arch)?,
        verity: image.report.verity.clone(),
        key_id: String::new(),
        parts: Vec::new(),
    };
    let path = image.out_dir.join(file_name(image.arch));
    write(&path, manifest, &parts, image.signing_key)?;
    Ok(path)
}

/// Slot A's parts, read back from the raw image at `raw`: ROOT-A's first
/// `hash_offset` bytes and the verity tree after them, the kernel and initramfs from the
/// ESP.
pub fn read_slot_a(raw: &Path, hash_offset: u64) -> Result<Parts> {
    let mut disk =
        BufReader::new(File::open(raw).with_context(|| format!("opening {}", raw.display()))?);
    let table = gpt::read_gpt(&mut disk).with_context(|| format!("reading {}", raw.display()))?;
    let root_part = table.partition(layout::PART_ROOT_A)?.clone();
    let esp_part = table.partition(layout::PART_EFI)?.clone();
    let data_blocks = hash_offset / layout::VERITY_BLOCK_SIZE;
    let root_len = hash_offset + keelson_upgrade::verity::tree_size(data_blocks);
    if root_len > root_part.size() {
        bail!(
            "{}: the root and its verity tree ({root_len} bytes) overrun ROOT-A ({} bytes): rebuild the image",
            raw.display(),
            root_part.size()
        );
    }
    let mut root = vec![0; usize::try_from(root_len)?];
    disk.seek(SeekFrom::Start(root_part.start()))?;
    disk.read_exact(&mut root)
        .with_context(|| format!("reading ROOT-A of {}", raw.display()))?;
    let esp = EspReader::open(Window::partition(disk, &esp_part))
        .with_context(|| format!("opening the ESP of {}", raw.display()))?;
    let read = |path: String| {
        esp.read_file(&path)
            .with_context(|| format!("reading {path} from the ESP of {}", raw.display()))
    };
    Ok(Parts {
        root,
        kernel: read(keelson_configs::boot::slot_kernel_path(Slot::A))?,
        initrd: read(keelson_configs::boot::slot_initrd_path(Slot::A))?,
    })
}

/// Write a bundle of `parts` described by `manifest` (its parts and key id are filled in
/// by the writer) to `path`, through a temporary file renamed into place.
pub fn write(path: &Path, mut manifest: Manifest, parts: &Parts, key: &SigningKey) -> Result<()> {
    let bytes = [&parts.root[..], &parts.kernel[..], &parts.initrd[..]];
    manifest.parts = PART_NAMES
        .iter()
        .zip(bytes)
        .map(|(name, part)| format::hash_part(name, part))
        .collect::<std::io::Result<_>>()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial"));
    let written = (|| -> Result<()> {
        let mut out = std::io::BufWriter::new(
            File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        format::write_bundle(&mut out, &manifest, bytes, key)?;
        out.flush()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing the bundle {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

/// Read a bundle back: its manifest and parts, each part checked against its sha256.
/// The signature is not checked (a derivation signs again).
pub fn read(path: &Path) -> Result<(Manifest, Parts)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (manifest, [root, kernel, initrd]) =
        parse(&bytes).with_context(|| format!("reading the bundle {}", path.display()))?;
    Ok((
        manifest,
        Parts {
            root,
            kernel,
            initrd,
        },
    ))
}

/// A whole bundle's manifest and parts, through keelson-upgrade's parser (fed in chunks,
/// as a node reads an upload).
pub fn parse(bytes: &[u8]) -> Result<(Manifest, [Vec<u8>; 3]), format::BundleError> {
    let mut parser = BundleParser::new(ParserLimits::default());
    let mut manifest = None;
    let mut parts: [Vec<u8>; 3] = Default::default();
    for chunk in bytes.chunks(1 << 20) {
        for event in parser.feed(chunk)? {
            match event {
                Event::Header(header) => manifest = Some(header.manifest),
                Event::PartData { part, bytes } => {
                    if let Some(buf) = parts.get_mut(part) {
                        buf.extend_from_slice(bytes);
                    }
                }
                Event::PartEnd { .. } | Event::End => {}
            }
        }
    }
    parser.finish()?;
    // The parser ended (`finish` succeeded), so it read the header.
    let manifest = manifest.ok_or(format::BundleError::TruncatedHeader { at: 0 })?;
    Ok((manifest, parts))
}

/// `cargo xtask bundle`'s options.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// An image's output directory (`target/images/amd64`), holding the
    /// `keelson-<arch>.bundle` that `cargo xtask image` wrote.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// The bundle to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The manifest's version (semver). The root keeps the os-release it was built with:
    /// only the manifest and the boot entry the node writes from it change.
    #[arg(long, value_parser = parse_version)]
    pub version: Option<String>,
    /// Replace the manifest's minimum version (semver).
    #[arg(long, value_name = "VERSION", value_parser = parse_version)]
    pub min_version: Option<String>,
    /// Kernel arguments appended to the manifest's command line (e.g.
    /// `keelson.fault=stage1-hang`).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline_append: Option<String>,
    /// Another initramfs (a file as the kernel takes it).
    #[arg(long, value_name = "FILE", conflicts_with = "empty_initrd")]
    pub initrd: Option<PathBuf>,
    /// An initramfs with no files at all (no `/init`: the kernel panics at boot).
    #[arg(long)]
    pub empty_initrd: bool,
    /// The private key that signs the bundle (default: the dev key,
    /// target/keelson-keys/upgrade.key, made on first use).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
}

/// The one bundle in an image's output directory.
fn bundle_in(dir: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for arch in Arch::ALL {
        let path = dir.join(file_name(arch));
        if path.is_file() {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "{} holds no keelson-<arch>.bundle: build the image there with \
             `cargo xtask image --out {}` first",
            dir.display(),
            dir.display()
        ),
        _ => bail!(
            "{} holds bundles for both architectures; pass the directory of one \
             architecture's image",
            dir.display()
        ),
    }
}

/// An initramfs with no files: a newc archive holding only its trailer.
pub fn empty_initrd() -> Result<Vec<u8>> {
    Ok(keelson_imager::cpio::CpioWriter::new(Vec::new(), 0).finish()?)
}

/// `manifest` changed as `args` asks (before it is signed again).
fn derived_manifest(mut manifest: Manifest, args: &BundleArgs) -> Manifest {
    if let Some(version) = &args.version {
        manifest.version = version.clone();
    }
    if let Some(min) = &args.min_version {
        manifest.min_version = Some(min.clone());
    }
    if let Some(extra) = args.cmdline_append.as_deref().map(str::trim)
        && !extra.is_empty()
    {
        manifest.cmdline = format!("{} {extra}", manifest.cmdline.trim_end());
    }
    manifest.key_id = String::new();
    manifest.parts = Vec::new();
    manifest
}

/// `cargo xtask bundle`.
pub fn derive(args: &BundleArgs) -> Result<()> {
    let source = bundle_in(&args.from)?;
    let key = keys::signing_key(args.signing_key.as_deref())?;
    let (manifest, mut parts) = read(&source)?;
    if let Some(path) = &args.initrd {
        parts.initrd = std::fs::read(path)
            .with_context(|| format!("reading the initramfs {}", path.display()))?;
    } else if args.empty_initrd {
        parts.initrd = empty_initrd()?;
    }
    let manifest = derived_manifest(manifest, args);
    let shown = format!(
        "version {}, cmdline `{}`",
        manifest.version, manifest.cmdline
    );
    write(&args.out, manifest, &parts, &key)?;
    eprintln!(
        "xtask: wrote {} from {} ({shown})",
        args.out.display(),
        source.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use keelson_imager::esp::Esp;
    use keelson_imager::gpt::{Content, DiskSpec, Guid, PartitionSpec};
    use keelson_upgrade::keys::{self as upgrade_keys, TrustedKeys};
    use keelson_upgrade::verity;

    use super::*;

    /// A root of `blocks` 4 KiB data blocks and its verity tree, with its parameters.
    fn fake_root(blocks: usize) -> (Vec<u8>, keelson_configs::boot::VerityParams) {
        let mut data: Vec<u8> = (0..blocks * 4096).map(|i| (i % 251) as u8).collect();
        let tree = verity::build(&data[..], b"salt", [7; 16]).unwrap();
        data.extend_from_slice(&tree.bytes);
        (data, tree.params.boot_params())
    }

    fn fake_manifest(verity: keelson_configs::boot::VerityParams) -> Manifest {
        Manifest {
            format: manifest::FORMAT,
            version: "0.2.0".into(),
            arch: "amd64".into(),
            min_version: None,
            components: vec!["containerd".into(), "etcd".into()],
            config_versions: vec![CONFIG_VERSION.into()],
            cmdline: "panic=10 console=ttyS0,115200".into(),
            verity,
            key_id: String::new(),
            parts: Vec::new(),
        }
    }

    fn fake_parts(root: Vec<u8>) -> Parts {
        Parts {
            root,
            kernel: b"MZ a kernel".to_vec(),
            initrd: b"an initramfs".to_vec(),
        }
    }

    #[test]
    fn a_written_bundle_parses_back_and_its_signature_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = upgrade_keys::generate().unwrap();
        let (root, verity) = fake_root(3);
        let path = dir.path().join("keelson-amd64.bundle");
        write(
            &path,
            fake_manifest(verity.clone()),
            &fake_parts(root.clone()),
            &key,
        )
        .unwrap();
        assert!(!dir.path().join(".keelson-amd64.bundle.partial").exists());

        let bytes = std::fs::read(&path).unwrap();
        // Through the node's parser in small chunks, the signature checked against a
        // trusted key and refused by another.
        let mut parser = BundleParser::new(ParserLimits::default());
        let mut header = None;
        let mut ended = Vec::new();
        for chunk in bytes.chunks(1000) {
            for event in parser.feed(chunk).unwrap() {
                match event {
                    Event::Header(h) => header = Some(h),
                    Event::PartEnd { part } => ended.push(part),
                    _ => {}
                }
            }
        }
        parser.finish().unwrap();
        assert_eq!(ended, [0, 1, 2]);
        let header = header.unwrap();
        let trusted = TrustedKeys::new([("dev".to_string(), key.verifying_key())]);
        upgrade_keys::verify(&header, &trusted).unwrap();
        let other = TrustedKeys::new([(
            "other".to_string(),
            upgrade_keys::generate().unwrap().verifying_key(),
        )]);
        assert!(upgrade_keys::verify(&header, &other).is_err());

        let (manifest, parts) = read(&path).unwrap();
        assert_eq!(manifest.version, "0.2.0");
        assert_eq!(manifest.verity, verity);
        assert_eq!(manifest.key_id, upgrade_keys::key_id(&key.verifying_key()));
        assert_eq!(manifest.config_versions, ["v1"]);
        assert_eq!(parts.root, root);
        assert_eq!(parts.kernel, b"MZ a kernel");
        assert_eq!(parts.initrd, b"an initramfs");
    }

    #[test]
    fn slot_a_is_read_back_from_a_raw_image_without_the_rest_of_root_a() {
        let dir = tempfile::tempdir().unwrap();
        let (root, verity) = fake_root(5);
        let mut esp = Esp::new();
        esp.add_slot(Slot::A, b"MZ kernel".to_vec(), b"initrd".to_vec());
        let esp_bytes = esp.to_vec(40 << 20, 0).unwrap();
        // What follows the tree in ROOT-A (here junk, on a disk zeros) is not the root's.
        let mut root_a = root.clone();
        root_a.extend_from_slice(&[0xaa; 8192]);
        let part = |name: &str, type_guid: &str, content| PartitionSpec {
            name: name.into(),
            type_guid: Guid::parse(type_guid).unwrap(),
            size: if name == layout::PART_EFI {
                40 << 20
            } else {
                1 << 20
            },
            attributes: 0,
            content: Content::Bytes(content),
        };
        let raw = dir.path().join("keelson.raw");
        gpt::write_disk(
            &raw,
            &DiskSpec {
                seed: b"test".to_vec(),
                partitions: vec![
                    part(layout::PART_EFI, layout::TYPE_GUID_EFI, esp_bytes),
                    part(layout::PART_ROOT_A, Arch::Amd64.root_type_guid(), root_a),
                ],
                disk_size: None,
            },
        )
        .unwrap();
        let parts = read_slot_a(&raw, verity.hash_offset).unwrap();
        assert_eq!(parts.root, root);
        assert_eq!(parts.kernel, b"MZ kernel");
        assert_eq!(parts.initrd, b"initrd");
    }

    fn derive_args(from: &Path, out: &Path, key: &Path) -> BundleArgs {
        BundleArgs {
            from: from.to_path_buf(),
            out: out.to_path_buf(),
            version: None,
            min_version: None,
            cmdline_append: None,
            initrd: None,
            empty_initrd: false,
            signing_key: Some(key.to_path_buf()),
        }
    }

    #[test]
    fn a_derived_bundle_changes_only_what_it_is_asked_to() {
        let dir = tempfile::tempdir().unwrap();
        let image_dir = dir.path().join("image");
        std::fs::create_dir(&image_dir).unwrap();
        let keys = dir.path().join("keys");
        keys::keygen(&keys, false).unwrap();
        let key = upgrade_keys::load_private_key(&keys.join(keys::PRIVATE_FILE)).unwrap();
        let (root, verity) = fake_root(2);
        write(
            &image_dir.join(file_name(Arch::Amd64)),
            fake_manifest(verity),
            &fake_parts(root.clone()),
            &key,
        )
        .unwrap();
        let (original, _) = read(&image_dir.join(file_name(Arch::Amd64))).unwrap();

        let hang = dir.path().join("v3-hang.bundle");
        derive(&BundleArgs {
            version: Some("0.3.1".into()),
            cmdline_append: Some(" keelson.fault=stage1-hang ".into()),
            ..derive_args(&image_dir, &hang, &keys.join(keys::PRIVATE_FILE))
        })
        .unwrap();
        let (manifest, parts) = read(&hang).unwrap();
        assert_eq!(manifest.version, "0.3.1");
        assert_eq!(
            manifest.cmdline,
            "panic=10 console=ttyS0,115200 keelson.fault=stage1-hang"
        );
        assert_eq!(
            Manifest {
                version: original.version.clone(),
                cmdline: original.cmdline.clone(),
                ..manifest.clone()
            },
            original
        );
        assert_eq!(
            (parts.root, parts.initrd),
            (root.clone(), b"an initramfs".to_vec())
        );

        let panic = dir.path().join("v3-panic.bundle");
        derive(&BundleArgs {
            empty_initrd: true,
            ..derive_args(&image_dir, &panic, &keys.join(keys::PRIVATE_FILE))
        })
        .unwrap();
        let (manifest, parts) = read(&panic).unwrap();
        assert_eq!(parts.initrd, empty_initrd().unwrap());
        let text = String::from_utf8_lossy(&parts.initrd);
        assert!(
            text.starts_with("070701") && text.contains("TRAILER!!!"),
            "{text:?}"
        );
        assert_eq!(text.matches("070701").count(), 1, "{text:?}");
        assert_eq!(manifest.parts[2].size, parts.initrd.len() as u64);
        assert_eq!(parts.root, root);

        let err = derive(&derive_args(
            dir.path(),
            &dir.path().join("x.bundle"),
            &keys.join(keys::PRIVATE_FILE),
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("holds no keelson-<arch>.bundle"),
            "{err}"
        );
    }

    #[test]
    fn keygen_writes_a_private_key_only_its_owner_reads_and_never_replaces_it_unasked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("k");
        let id = keys::keygen(&keys_dir, false).unwrap();
        let private = keys_dir.join(keys::PRIVATE_FILE);
        let public = keys_dir.join(keys::PUBLIC_FILE);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o600);
        assert_eq!(mode(&public), 0o644);
        let key = upgrade_keys::load_private_key(&private).unwrap();
        assert_eq!(upgrade_keys::key_id(&key.verifying_key()), id);
        assert_eq!(
            upgrade_keys::load_public_key(&public).unwrap(),
            key.verifying_key()
        );

        let before = std::fs::read(&private).unwrap();
        let err = keys::keygen(&keys_dir, false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        assert_eq!(std::fs::read(&private).unwrap(), before);
        let new_id = keys::keygen(&keys_dir, true).unwrap();
        assert_ne!(new_id, id);
        assert_eq!(mode(&private), 0o600);
    }
}
