//! Where the machine config comes from, in order, and how it is judged.
//!
//! 1. **STATE**: `/system/state/config.toml`, the last config this node applied.
//! 2. **QEMU fw_cfg**: the entry `opt/keelson/config`
//!    (`-fw_cfg name=opt/keelson/config,file=node.toml`), read from
//!    `/sys/firmware/qemu_fw_cfg/by_name/opt/keelson/config/raw` (module `qemu_fw_cfg`).
//! 3. **A config drive**: a vfat or iso9660 filesystem labelled `cidata`/`CIDATA`
//!    (NoCloud: the config is its `user-data` file) or `config-2` (OpenStack config
//!    drive: `openstack/latest/user_data`). Labels are read from the superblocks (no
//!    blkid, no udev); the filesystem is mounted read-only for the read, then unmounted.
//! 4. **A URL** on the kernel command line, `keelson.config=http://host/node.toml` or
//!    `https://...`, fetched once the network is up (HTTP/1.1, see [`http`]) in a task
//!    that sends the answer to the main loop as a [`Fetched`] ([`fetch_later`]). An
//!    `https://` server's certificate must be for the URL's host and signed by a public
//!    CA (Mozilla's roots, compiled in), or, with `keelson.config.ca=<the CA's
//!    certificate in base64, or the path of its PEM file>` beside it, by that CA alone
//!    ([`tls`], [`cmdline_trust`]). With `keelson.config.sha256=<64 hex digits>` beside
//!    it, only a body with that sha256 is taken, over either scheme: any other is refused
//!    (the URL, both sums, what to do) and fetched again later, as a failed fetch is
//!    ([`cmdline_sha256`]).
//!
//! The first source that holds a valid config wins. Every config is checked with
//! `keelson_configs::check_bytes` in metal mode: one that fails is refused whole, each
//! error goes to the console, and the next source is tried; when none is valid the node
//! keeps waiting and says every 30 s how to give it a config ([`waiting_message`]). A
//! config from fw_cfg, a config drive or a URL that is valid is written to STATE
//! (atomically), so later boots use it even when the source is gone.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keelson_configs::layout::{
    self, CMDLINE_CONFIG_CA, CMDLINE_CONFIG_SHA256, CMDLINE_CONFIG_URL, FW_CFG_CONFIG,
};
use keelson_configs::{MachineConfig, Mode, check_bytes};

use crate::blockdev::BlockDev;
use crate::console::Log;
use crate::kmods::{self, ModuleIndex};
use crate::mounts::ensure_dir;
use crate::sender::Sender;
use crate::syscalls::{MountFlags, Syscalls, errno_name};

pub mod http;
pub mod tls;

/// Where the kernel publishes fw_cfg entries by name.
pub const FW_CFG_BY_NAME: &str = "/sys/firmware/qemu_fw_cfg/by_name";
/// Where a config drive is mounted while it is read.
pub const DRIVE_MOUNT: &str = "/run/keelson/config-drive";
/// The largest config accepted from any source: the one limit machined's
/// `apply-config` and validation hold too ([`keelson_configs::MAX_CONFIG_BYTES`], 1 MiB).
pub const MAX_CONFIG: usize = keelson_configs::MAX_CONFIG_BYTES;
/// How often the node says that it waits for a config.
pub const REMINDER: Duration = Duration::from_secs(30);

/// A place a config can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The last applied config in STATE.
    State,
    /// QEMU's fw_cfg.
    FwCfg,
    /// A NoCloud or config-drive volume.
    ConfigDrive {
        /// The device (`/dev/vdb`).
        device: String,
        /// Its label (`cidata`, `config-2`).
        label: String,
    },
    /// A URL from the kernel command line.
    Url(String),
    /// The node API: machined applied it live (and wrote STATE itself).
    Api,
}

impl Source {
    /// Whether a config from here is written to STATE once it validates.
    pub fn persist(&self) -> bool {
        !matches!(self, Source::State | Source::Api)
    }

    /// A short name for logs and `info`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::State => "state",
            Source::FwCfg => "fw_cfg",
            Source::ConfigDrive { .. } => "config-drive",
            Source::Url(_) => "url",
            Source::Api => "api",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::State => write!(
                f,
                "STATE ({}/{})",
                layout::STATE_MOUNT,
                layout::STATE_CONFIG
            ),
            Source::FwCfg => write!(f, "fw_cfg {FW_CFG_CONFIG}"),
            Source::ConfigDrive { device, label } => {
                write!(f, "config drive {device} ({label})")
            }
            Source::Url(url) => write!(f, "URL {url}"),
            Source::Api => f.write_str("the node API (machined)"),
        }
    }
}

/// The path of the STATE config.
pub fn state_config_path() -> PathBuf {
    Path::new(layout::STATE_MOUNT).join(layout::STATE_CONFIG)
}

/// The path of the fw_cfg config entry's content.
pub fn fw_cfg_path() -> PathBuf {
    Path::new(FW_CFG_BY_NAME).join(FW_CFG_CONFIG).join("raw")
}

/// Check a config from `source`: the config, or one line per error.
pub fn judge(source: &Source, bytes: &[u8], log: &dyn Log) -> Result<MachineConfig, Vec<String>> {
    let checked = check_bytes(bytes, &source.to_string(), Mode::Metal);
    for warning in checked.diagnostics.iter().filter(|d| !d.is_error()) {
        log.line(&format!("config {warning}"));
    }
    checked.config.ok_or_else(|| {
        checked
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(ToString::to_string)
            .collect()
    })
}

/// Log a refused config, one line per error.
pub fn report_refusal(source: &Source, errors: &[String], log: &dyn Log) {
    log.line(&format!(
        "config from {source} refused: {} error{}; nothing of it is applied",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    ));
    for e in errors {
        log.line(&format!("config error: {e}"));
    }
}

/// A config found and accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Where it came from.
    pub source: Source,
    /// Its text, as found.
    pub bytes: Vec<u8>,
    /// The checked config.
    pub config: MachineConfig,
}

/// Look at STATE, fw_cfg and config drives in that order; the first valid config wins.
/// Invalid ones are reported and skipped.
/// `modules` is where a config drive's filesystem modules come from (`None`: the kernel
/// must already have them).
pub fn find_local(
    sys: &dyn Syscalls,
    log: &dyn Log,
    sysfs: &Path,
    modules: Option<&ModuleIndex>,
) -> Option<Accepted> {
    let mut candidates: Vec<(Source, Vec<u8>)> = Vec::new();
    if let Ok(bytes) = sys.read_file(&state_config_path()) {
        candidates.push((Source::State, bytes));
    }
    if let Some(found) = read_fw_cfg(sys) {
        candidates.push((Source::FwCfg, found));
    }
    for (source, bytes) in candidates {
        if let Some(accepted) = accept(source, bytes, log) {
            return Some(accepted);
        }
    }
    // Config drives are mounted to be read: only when nothing before them was valid.
    for (source, bytes) in read_config_drives(sys, log, sysfs, modules) {
        if let Some(accepted) = accept(source, bytes, log) {
            return Some(accepted);
        }
    }
    None
}

/// Judge one candidate; log what happened.
pub fn accept(source: Source, bytes: Vec<u8>, log: &dyn Log) -> Option<Accepted> {
    if bytes.len() > MAX_CONFIG {
        report_refusal(
            &source,
            &[format!(
                "{} bytes: larger than the {MAX_CONFIG}-byte limit",
                bytes.len()
            )],
            log,
        );
        return None;
    }
    match judge(&source, &bytes, log) {
        Ok(config) => {
            log.line(&format!("config from {source} is valid"));
            Some(Accepted {
                source,
                bytes,
                config,
            })
        }
        Err(errors) => {
            report_refusal(&source, &errors, log);
            None
        }
    }
}

fn read_fw_cfg(sys: &dyn Syscalls) -> Option<Vec<u8>> {
    sys.read_file(&fw_cfg_path()).ok()
}

/// Filesystems a config drive may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveFs {
    /// FAT (`vfat`).
    Vfat,
    /// ISO 9660 (`iso9660`).
    Iso9660,
}

impl DriveFs {
    /// The kernel's filesystem type name.
    pub fn fstype(self) -> &'static str {
        match self {
            DriveFs::Vfat => "vfat",
            DriveFs::Iso9660 => "iso9660",
        }
    }

    /// The modules its mount needs (the filesystem and its character sets), loaded only
    /// when a config drive of this type is found: a node configured from STATE or
    /// fw_cfg never pays for them.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            DriveFs::Vfat => &["vfat", "nls_cp437", "nls_utf8"],
            DriveFs::Iso9660 => &["isofs"],
        }
    }

    /// Mount options: FAT names as UTF-8 (`nls_utf8`), not the kernel's default `ascii`
    /// charset, whose module the image does not carry.
    pub fn options(self) -> &'static str {
        match self {
            DriveFs::Vfat => "iocharset=utf8",
            DriveFs::Iso9660 => "",
        }
    }
}

/// Bytes of a device read to find its label (the ISO 9660 primary volume descriptor
/// ends at 34 KiB).
pub const LABEL_PROBE: usize = 0x8000 + 2048;

/// The filesystem and label in the first [`LABEL_PROBE`] bytes of a device, for the
/// two filesystems config drives use.
pub fn volume_label(head: &[u8]) -> Option<(DriveFs, String)> {
    let text = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    // ISO 9660: the primary volume descriptor (type 1, "CD001") at sector 16.
    if head.len() >= 0x8000 + 72 && &head[0x8001..0x8006] == b"CD001" && head[0x8000] == 1 {
        return Some((DriveFs::Iso9660, text(&head[0x8028..0x8048])));
    }
    // FAT: the boot signature, then the label where FAT32 or FAT12/16 keep it.
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xaa {
        if &head[0x52..0x57] == b"FAT32" {
            return Some((DriveFs::Vfat, text(&head[0x47..0x52])));
        }
        if &head[0x36..0x39] == b"FAT" {
            return Some((DriveFs::Vfat, text(&head[0x2b..0x36])));
        }
    }
    None
}

/// The config file inside a drive with this label, if the label is one we read.
pub fn drive_config_file(label: &str) -> Option<&'static str> {
    match label {
        "cidata" | "CIDATA" => Some("user-data"),
        "config-2" | "CONFIG-2" => Some("openstack/latest/user_data"),
        _ => None,
    }
}

fn read_head(sys: &dyn Syscalls, dev: &BlockDev) -> Option<Vec<u8>> {
    let mut reader = sys.open_read(Path::new(&dev.path())).ok()?;
    let mut head = vec![0u8; LABEL_PROBE];
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head.truncate(got);
    Some(head)
}

/// Find config drives among the block devices and read their config file.
pub fn read_config_drives(
    sys: &dyn Syscalls,
    log: &dyn Log,
    sysfs: &Path,
    modules: Option<&ModuleIndex>,
) -> Vec<(Source, Vec<u8>)> {
    // A drive may sit behind a disk driver that stage 1 left to stage 2: those load first,
    // probing inside the load, so that the scan below lists what they found. Drivers
    // already in the kernel are skipped quietly: this runs at every reminder.
    if let Some(index) = modules {
        let missing: Vec<&str> = crate::drivers::DISK_MODULES
            .iter()
            .copied()
            .filter(|m| !sys.exists(&Path::new("/sys/module").join(m)))
            .collect();
        if !missing.is_empty() {
            kmods::load(sys, log, index, &missing);
        }
    }
    let Ok(devs) = crate::blockdev::scan(sys, sysfs) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dev in devs {
        // Our own disk's partitions are never config drives.
        if dev.partname.is_some()
            || dev.devname.starts_with("dm-")
            || dev.devname.starts_with("loop")
        {
            continue;
        }
        let Some(head) = read_head(sys, &dev) else {
            continue;
        };
        let Some((fs, label)) = volume_label(&head) else {
            continue;
        };
        let Some(file) = drive_config_file(&label) else {
            continue;
        };
        let source = Source::ConfigDrive {
            device: dev.path(),
            label: label.clone(),
        };
        if let Some(index) = modules {
            kmods::load(sys, log, index, fs.modules());
        }
        let mount = Path::new(DRIVE_MOUNT);
        if let Err(e) = ensure_dir(sys, mount, 0o700) {
            log.line(&format!("cannot create {DRIVE_MOUNT}: {}", errno_name(&e)));
            continue;
        }
        let flags =
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        if let Err(e) = sys.mount(&dev.path(), mount, fs.fstype(), flags, fs.options()) {
            log.line(&format!(
                "{source}: cannot mount {} read-only: {}",
                fs.fstype(),
                errno_name(&e)
            ));
            continue;
        }
        match sys.read_file(&mount.join(file)) {
            Ok(bytes) => out.push((source, bytes)),
            Err(e) => log.line(&format!("{source} has no {file}: {}", errno_name(&e))),
        }
        if let Err(e) = sys.unmount(mount, false) {
            log.line(&format!("cannot unmount {DRIVE_MOUNT}: {}", errno_name(&e)));
        }
    }
    out
}

/// The URL on the kernel command line, if any.
pub fn cmdline_url(cmdline: &str) -> Option<String> {
    let args = layout::parse_cmdline(cmdline);
    layout::cmdline_value(&args, CMDLINE_CONFIG_URL)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// The config's pinned sha256 on the kernel command line (`keelson.config.sha256=`), as
/// written: [`http::fetch`] judges it.
pub fn cmdline_sha256(cmdline: &str) -> Option<String> {
    let args = layout::parse_cmdline(cmdline);
    layout::cmdline_value(&args, CMDLINE_CONFIG_SHA256).map(str::to_string)
}

/// Whom an `https://` config URL's server must be signed by: the CA of
/// `keelson.config.ca=`, as written ([`tls::Trust::roots`] judges it at each fetch), else
/// the public roots.
pub fn cmdline_trust(cmdline: &str) -> tls::Trust {
    let args = layout::parse_cmdline(cmdline);
    tls::Trust::from_cmdline_value(layout::cmdline_value(&args, CMDLINE_CONFIG_CA))
}

/// What the console says while the node waits for a config.
pub fn waiting_message(url: Option<&str>) -> Vec<String> {
    let mut lines = vec![
        "waiting for a machine config; give one by any of:".to_string(),
        format!("  QEMU fw_cfg: -fw_cfg name={FW_CFG_CONFIG},file=node.toml"),
        "  a NoCloud drive (vfat or iso9660 labelled cidata) with the config as user-data, \
         or a config-2 drive with openstack/latest/user_data"
            .to_string(),
        format!(
            "  the kernel argument {CMDLINE_CONFIG_URL}=http(s)://<host>/<node>.toml \
             (pinned by {CMDLINE_CONFIG_SHA256}=<its sha256>; a private CA by \
             {CMDLINE_CONFIG_CA}=<its certificate in base64>)"
        ),
        format!(
            "  machinectl apply-config --insecure --nodes <this node's address> --file node.toml (port {})",
            layout::API_PORT
        ),
    ];
    if let Some(url) = url {
        lines.push(format!(
            "  (this boot's {CMDLINE_CONFIG_URL}={url} gave no valid config yet)"
        ));
    }
    lines
}

/// A config fetched from a URL, for the main loop: its bytes, or why it could not be
/// fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The URL.
    pub url: String,
    /// The body, or the error.
    pub result: Result<Vec<u8>, String>,
}

/// How long one fetch of the config URL may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// After `delay`, fetch `url` ([`http::fetch`], within [`FETCH_TIMEOUT`] and
/// [`MAX_CONFIG`], its body checked against `pin`: the value of
/// `keelson.config.sha256=`, [`cmdline_sha256`]; an `https://` server's certificate against
/// `trust`, [`cmdline_trust`]) in a task and send what came back on `to`.
pub fn fetch_later(
    url: String,
    pin: Option<String>,
    trust: tls::Trust,
    delay: Duration,
    to: Sender<Fetched>,
) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let result = http::fetch(&url, pin.as_deref(), &trust, MAX_CONFIG, FETCH_TIMEOUT)
            .await
            .map_err(|e| e.to_string());
        let _ = to.send(Fetched { url, result });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    const VALID: &str = include_str!("../../configs/tests/data/controlplane.toml");

    #[test]
    fn the_disk_drivers_stage_1_left_load_before_config_drives_are_looked_for() {
        let index = ModuleIndex {
            dir: PathBuf::from("/usr/lib/modules/test"),
            modules: kmods::parse_dep(
                "kernel/ahci.ko: kernel/libahci.ko\nkernel/libahci.ko:\nkernel/nvme.ko:\n\
                 kernel/virtio_scsi.ko:\nkernel/sd_mod.ko:\n",
            ),
            builtin: Default::default(),
        };
        // nvme is in the kernel already (stage 1 loaded it): it is skipped quietly.
        let fake = Fake::new().with_file("/sys/module/nvme", "");
        let log = MemoryLog::default();
        let found = read_config_drives(&fake, &log, Path::new("/nonexistent-sysfs"), Some(&index));
        assert!(found.is_empty());
        let loads: Vec<String> = fake
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::FinitModule(path, _) => Some(path),
                _ => None,
            })
            .collect();
        assert_eq!(
            loads,
            [
                "/usr/lib/modules/test/kernel/libahci.ko",
                "/usr/lib/modules/test/kernel/ahci.ko",
                "/usr/lib/modules/test/kernel/virtio_scsi.ko",
                "/usr/lib/modules/test/kernel/sd_mod.ko",
            ]
        );
        assert!(
            !log.lines().iter().any(|l| l.contains("nvme")),
            "{:?}",
            log.lines()
        );
    }

    #[test]
    fn sources_are_tried_in_order_and_invalid_ones_refused() {
        let state = state_config_path().display().to_string();
        let fw = fw_cfg_path().display().to_string();
        let broken = VALID.replace("mtu = 1500", "mtu = 99999");
        /// (files present, expected source, expected refusal count)
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<Source>, usize);
        let cases: &[Case] = &[
            (&[(&state, VALID), (&fw, VALID)], Some(Source::State), 0),
            (&[(&fw, VALID)], Some(Source::FwCfg), 0),
            (&[(&state, &broken), (&fw, VALID)], Some(Source::FwCfg), 1),
            (&[(&fw, &broken)], None, 1),
            (&[(&fw, "version = \"v1\"\n[machine\n")], None, 1),
            (&[], None, 0),
        ];
        for (files, expected, refusals) in cases {
            let mut fake = Fake::new();
            for (path, text) in *files {
                fake = fake.with_file(path, text);
            }
            let log = MemoryLog::default();
            // The fake sysfs has no block devices: no config drive.
            let found = find_local(&fake, &log, Path::new("/nonexistent-sysfs"), None);
            assert_eq!(
                found.as_ref().map(|a| &a.source),
                expected.as_ref(),
                "{:?}",
                log.lines()
            );
            let refused = log.lines().iter().filter(|l| l.contains("refused")).count();
            assert_eq!(refused, *refusals, "{:?}", log.lines());
        }
    }

    #[test]
    fn a_refusal_names_every_error_with_its_place() {
        let log = MemoryLog::default();
        let broken = VALID
            .replace("mtu = 1500", "mtu = 99999")
            .replace("hostname = \"cp-1\"", "hostname = \"-bad-\"");
        assert!(accept(Source::FwCfg, broken.into_bytes(), &log).is_none());
        let lines = log.lines();
        assert_eq!(
            lines[0],
            "keelson-init: config from fw_cfg opt/keelson/config refused: 2 errors; nothing of it is applied"
        );
        assert!(
            lines[1].starts_with("keelson-init: config error: fw_cfg opt/keelson/config:6:"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("machine.network.interfaces[0].mtu"),
            "{lines:?}"
        );
        let huge = vec![b'#'; MAX_CONFIG + 1];
        assert!(accept(Source::Url("http://x/".into()), huge, &log).is_none());
    }

    #[test]
    fn boot_holds_the_config_size_limit_machined_holds() {
        // One constant for PID 1 and machined's apply-config: a config machined accepts
        // is never refused at the next boot for its size, nor the other way round.
        assert_eq!(MAX_CONFIG, keelson_configs::MAX_CONFIG_BYTES);
        assert_eq!(MAX_CONFIG, 1024 * 1024);
        let log = MemoryLog::default();
        assert!(
            accept(
                Source::Url("http://x/".into()),
                vec![b'#'; MAX_CONFIG + 1],
                &log
            )
            .is_none()
        );
        let lines = log.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("1048577 bytes: larger than the 1048576-byte limit")),
            "{lines:?}"
        );
    }

    fn fat32_head(label: &[u8; 11]) -> Vec<u8> {
        let mut head = vec![0u8; LABEL_PROBE];
        head[0x47..0x52].copy_from_slice(label);
        head[0x52..0x5a].copy_from_slice(b"FAT32   ");
        head[510] = 0x55;
        head[511] = 0xaa;
        head
    }

    #[test]
    fn config_drive_labels_come_from_superblocks() {
        assert_eq!(
            volume_label(&fat32_head(b"CIDATA     ")),
            Some((DriveFs::Vfat, "CIDATA".into()))
        );
        let mut fat16 = vec![0u8; 512];
        fat16[0x2b..0x36].copy_from_slice(b"config-2   ");
        fat16[0x36..0x3e].copy_from_slice(b"FAT16   ");
        fat16[510] = 0x55;
        fat16[511] = 0xaa;
        assert_eq!(
            volume_label(&fat16),
            Some((DriveFs::Vfat, "config-2".into()))
        );
        let mut iso = vec![0u8; LABEL_PROBE];
        iso[0x8000] = 1;
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        iso[0x8028..0x8048].copy_from_slice(b"cidata                          ");
        assert_eq!(
            volume_label(&iso),
            Some((DriveFs::Iso9660, "cidata".into()))
        );
        assert_eq!(volume_label(&[0u8; LABEL_PROBE]), None);
        assert_eq!(volume_label(&[0u8; 10]), None);
        assert_eq!(drive_config_file("CIDATA"), Some("user-data"));
        assert_eq!(
            drive_config_file("config-2"),
            Some("openstack/latest/user_data")
        );
        assert_eq!(drive_config_file("DATA"), None);
    }

    #[test]
    fn the_url_and_its_pin_come_from_the_command_line() {
        let sum = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let cmdline =
            format!("console=ttyS0 keelson.config=http://h/c.toml keelson.config.sha256={sum}");
        assert_eq!(cmdline_url(&cmdline), Some("http://h/c.toml".into()));
        assert_eq!(cmdline_sha256(&cmdline), Some(sum.into()));
        assert_eq!(cmdline_url("console=ttyS0 keelson.config="), None);
        assert_eq!(cmdline_sha256("keelson.config=http://h/c.toml"), None);
        // A pin that is not a sum is passed on as written: the fetch refuses it.
        assert_eq!(
            cmdline_sha256("keelson.config.sha256=abc"),
            Some("abc".into())
        );
        // The CA: inline base64 (its padding kept), or a path; none: the public roots.
        assert_eq!(
            cmdline_trust("keelson.config=https://h/c.toml keelson.config.ca=MIIBkTCB+w=="),
            tls::Trust::Inline("MIIBkTCB+w==".into())
        );
        assert_eq!(
            cmdline_trust("keelson.config.ca=/run/ca.pem"),
            tls::Trust::File("/run/ca.pem".into())
        );
        assert_eq!(
            cmdline_trust("keelson.config=https://h/c.toml"),
            tls::Trust::PublicRoots
        );
    }

    #[test]
    fn a_fetch_sends_its_url_with_the_body_or_the_refusal() -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let to =
                Sender::from_fn(move |f: Fetched| tx.send(f).map_err(|_| crate::sender::Closed));
            // Nothing listens on port 9 of 127.0.0.1 (discard), and a bad pin is refused
            // before any connection.
            let url = "http://127.0.0.1:9/node.toml".to_string();
            fetch_later(
                url.clone(),
                Some("abc".into()),
                tls::Trust::PublicRoots,
                Duration::ZERO,
                to.clone(),
            );
            let fetched = rx.recv().await;
            let why = fetched.as_ref().and_then(|f| f.result.as_ref().err());
            assert!(
                why.is_some_and(|w| w.contains("keelson.config.sha256=\"abc\"")),
                "{fetched:?}"
            );
            assert_eq!(fetched.map(|f| f.url), Some(url.clone()));
            fetch_later(
                url.clone(),
                None,
                tls::Trust::PublicRoots,
                Duration::ZERO,
                to,
            );
            let fetched = rx.recv().await;
            let why = fetched.as_ref().and_then(|f| f.result.as_ref().err());
            assert!(
                why.is_some_and(|w| w.contains("cannot connect to 127.0.0.1:9")),
                "{fetched:?}"
            );
            Ok(())
        })
    }

    #[test]
    fn the_waiting_message_says_every_way() {
        let text = waiting_message(Some("http://h/x")).join("\n");
        for needle in [
            "opt/keelson/config",
            "cidata",
            "keelson.config=",
            "apply-config --insecure",
            "http://h/x",
        ] {
            assert!(text.contains(needle), "{needle}");
        }
    }
}
