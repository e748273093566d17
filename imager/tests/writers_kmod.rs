//! Kernel module closure from `.modinfo`, on tiny synthetic ELF modules (written with the
//! `object` crate, plain, xz- and zstd-compressed) so that it runs without the network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use keelson_imager::kmod::{KmodError, ModuleIndex};
use keelson_imager::rootfs::Tree;
use object::write::Object;
use object::{Architecture, BinaryFormat, Endianness, SectionKind};

/// A minimal relocatable ELF with a `.modinfo` section holding `modinfo` strings.
fn fake_module(arch: Architecture, modinfo: &[&str]) -> Vec<u8> {
    let mut obj = Object::new(BinaryFormat::Elf, arch, Endianness::Little);
    let section = obj.add_section(
        Vec::new(),
        b".modinfo".to_vec(),
        SectionKind::ReadOnlyString,
    );
    let mut data = Vec::new();
    for s in modinfo {
        data.extend_from_slice(s.as_bytes());
        data.push(0);
    }
    obj.append_section_data(section, &data, 1);
    let text = obj.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
    obj.append_section_data(text, &[0xc3; 16], 16);
    obj.write().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    liblzma::read::XzEncoder::new(data, 6)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A small tree shaped like Debian's: virtio_blk (no deps), dm-verity (deps on dm-bufio,
/// dm-mod, softdep on an alias), squashfs (alias fs-squashfs), a builtin list.
fn tree(arch: Architecture) -> ModuleIndex {
    let m = |info: &[&str]| fake_module(arch, info);
    let files = vec![
        (
            "kernel/drivers/block/virtio_blk.ko.xz".to_string(),
            xz(&m(&[
                "name=virtio_blk",
                "depends=",
                "alias=virtio:d00000002v*",
            ])),
        ),
        (
            "kernel/drivers/md/dm-verity.ko.xz".to_string(),
            xz(&m(&[
                "name=dm_verity",
                "depends=dm-bufio,dm-mod",
                "softdep=pre: crypto-sha256",
                "alias=dm-target-verity",
            ])),
        ),
        (
            "kernel/drivers/md/dm-bufio.ko.zst".to_string(),
            zstd::encode_all(&m(&["name=dm_bufio", "depends=dm-mod"])[..], 3).unwrap(),
        ),
        (
            "kernel/drivers/md/dm-mod.ko".to_string(),
            m(&["name=dm_mod", "depends="]),
        ),
        (
            "kernel/fs/squashfs/squashfs.ko.xz".to_string(),
            xz(&m(&["name=squashfs", "alias=fs-squashfs", "depends="])),
        ),
        (
            "kernel/arch/x86/crypto/sha256-ssse3.ko.xz".to_string(),
            xz(&m(&[
                "name=sha256_ssse3",
                "alias=crypto-sha256",
                "depends=",
            ])),
        ),
        (
            "modules.builtin".to_string(),
            b"kernel/drivers/virtio/virtio_pci.ko\nkernel/crypto/sha256_generic.ko\n".to_vec(),
        ),
        (
            "modules.builtin.modinfo".to_string(),
            b"sha256_generic.alias=sha256\0sha256_generic.license=GPL\0".to_vec(),
        ),
    ];
    ModuleIndex::from_files(files)
}

fn check(index: &ModuleIndex, requested: &[&str], modules: &[&str], builtin: &[&str]) {
    let res = index.resolve(requested).unwrap();
    assert_eq!(res.names(), modules, "modules for {requested:?}");
    assert_eq!(res.builtin, builtin, "built-ins for {requested:?}");
}

#[test]
fn closure_is_dependencies_first() {
    for arch in [Architecture::X86_64, Architecture::Aarch64] {
        let index = tree(arch);
        assert_eq!(index.len(), 6);
        check(&index, &["virtio-blk"], &["virtio_blk"], &[]);
        check(
            &index,
            &["dm-verity"],
            &["sha256_ssse3", "dm_mod", "dm_bufio", "dm_verity"],
            &[],
        );
        check(
            &index,
            &["virtio_pci", "fs-squashfs", "dm_verity", "dm_mod", "sha256"],
            &[
                "squashfs",
                "sha256_ssse3",
                "dm_mod",
                "dm_bufio",
                "dm_verity",
            ],
            &["virtio_pci", "sha256_generic"],
        );
    }
}

#[test]
fn unknown_module_suggests_close_names() {
    let index = tree(Architecture::X86_64);
    let err = index.resolve(&["virtio_blc"]).unwrap_err();
    let KmodError::Unknown { name, suggestions } = &err else {
        panic!("wrong error: {err}");
    };
    assert_eq!(name, "virtio_blc");
    assert_eq!(suggestions, &["virtio_blk".to_string()]);
    assert!(
        err.to_string().contains("did you mean virtio_blk?"),
        "{err}"
    );
}

#[test]
fn missing_dependency_is_named() {
    let files = vec![(
        "kernel/a.ko".to_string(),
        fake_module(Architecture::X86_64, &["name=a", "depends=b"]),
    )];
    let err = ModuleIndex::from_files(files).resolve(&["a"]).unwrap_err();
    assert!(
        matches!(&err, KmodError::MissingDependency { module, missing } if module == "a" && missing == "b"),
        "{err}"
    );
}

#[test]
fn initramfs_gets_flat_modules_and_order() {
    let index = tree(Architecture::X86_64);
    let res = index.resolve(&["dm-verity", "virtio_blk"]).unwrap();
    let mut initramfs = Tree::new(0);
    let bytes = index.add_to_initramfs(&res, &mut initramfs).unwrap();
    assert!(bytes > 0);
    assert_eq!(
        std::str::from_utf8(initramfs.file("modules/order").unwrap()).unwrap(),
        "sha256_ssse3.ko\ndm_mod.ko\ndm_bufio.ko\ndm_verity.ko\nvirtio_blk.ko\n"
    );
    // Written decompressed: an ELF header, not xz.
    assert_eq!(
        &initramfs.file("modules/dm_verity.ko").unwrap()[..4],
        b"\x7fELF"
    );
}

#[test]
fn indexes_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("lib/modules/6.12.0-test");
    std::fs::create_dir_all(kdir.join("kernel/drivers/md")).unwrap();
    std::fs::write(
        kdir.join("kernel/drivers/md/dm-mod.ko.xz"),
        xz(&fake_module(
            Architecture::X86_64,
            &["name=dm_mod", "depends="],
        )),
    )
    .unwrap();
    std::fs::write(kdir.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
    let index = ModuleIndex::from_dir(&kdir).unwrap();
    check(&index, &["dm-mod", "ext4"], &["dm_mod"], &["ext4"]);
    let missing = ModuleIndex::from_dir(&dir.path().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}
