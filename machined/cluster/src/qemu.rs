//! Running our images under QEMU: UEFI firmware per architecture, the accelerator
//! probe (KVM only where a guest really runs under it, software emulation otherwise),
//! and the QEMU command line for one machine. The end-to-end tests, the benchmarks and
//! local clusters all start their VMs through [`Machine`], so every VM gets the same
//! fresh firmware variables, console capture and timeout handling.
//!
//! Written by hand: QEMU's command line is the interface, and no crate drives it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keelson_configs::layout::Arch;

/// Errors starting or probing QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A firmware file is missing.
    #[error(
        "UEFI firmware {path} is missing: install Debian's `{package}` package \
         (apt-get install {package}), or run `cargo xtask deps`"
    )]
    MissingFirmware {
        /// The file we looked for.
        path: PathBuf,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// Filesystem trouble preparing the machine's files.
    #[error("preparing {path}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` failed.
    #[error("qemu-img could not create the overlay {path}: {stderr}")]
    QemuImg {
        /// The overlay we tried to create.
        path: PathBuf,
        /// What qemu-img said.
        stderr: String,
    },
}

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (QEMU's tiny code generator).
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The architecture of the machine we run on.
pub fn host_arch() -> Option<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(Arch::Amd64),
        "aarch64" => Some(Arch::Arm64),
        _ => None,
    }
}

/// The QEMU system emulator for a guest architecture.
pub fn qemu_binary(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "qemu-system-x86_64",
        Arch::Arm64 => "qemu-system-aarch64",
    }
}

/// The firmware code and variable-template files for a guest architecture.
pub fn firmware(arch: Arch) -> Result<(PathBuf, PathBuf), QemuError> {
    let (code, vars, package) = match arch {
        Arch::Amd64 => (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
            "ovmf",
        ),
        Arch::Arm64 => (
            "/usr/share/AAVMF/AAVMF_CODE.fd",
            "/usr/share/AAVMF/AAVMF_VARS.fd",
            "qemu-efi-aarch64",
        ),
    };
    for f in [code, vars] {
        if !Path::new(f).is_file() {
            return Err(QemuError::MissingFirmware {
                path: f.into(),
                package,
            });
        }
    }
    Ok((code.into(), vars.into()))
}

/// Decide the accelerator: KVM only when the host runs the same architecture, `/dev/kvm`
/// opens, and the UEFI firmware itself runs under KVM far enough to print on its serial
/// console. On some hosts `/dev/kvm` exists but guests spin forever, or real-mode code
/// runs and the firmware then dies with an emulation failure: only the firmware we
/// really boot is a trustworthy probe. `KEELSON_ACCEL=tcg|kvm` overrides.
pub fn probe_accel(arch: Arch, scratch: &Path) -> Accel {
    match std::env::var("KEELSON_ACCEL").as_deref() {
        Ok("tcg") => return Accel::Tcg,
        Ok("kvm") => return Accel::Kvm,
        _ => {}
    }
    if host_arch() != Some(arch)
        || std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        return Accel::Tcg;
    }
    if kvm_probe_runs(arch, scratch) {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

fn kvm_probe_runs(arch: Arch, scratch: &Path) -> bool {
    let dir = scratch.join("kvm-probe");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let mut machine = Machine::new(arch, Accel::Kvm, PathBuf::new(), dir.clone());
    machine.memory_mib = 256;
    machine.cpus = 1;
    let Ok(mut cmd) = machine.command() else {
        return false;
    };
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    // Under TCG the firmware prints within ~3 s; KVM, when it works, is faster.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = false;
    while Instant::now() < deadline {
        if std::fs::metadata(machine.console_path()).is_ok_and(|m| m.len() > 0) {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// Make a copy-on-write qcow2 overlay over a raw base image, so that a VM never writes
/// the shared image and two VMs never open one writable file.
pub fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<(), QemuError> {
    let base = std::path::absolute(base).map_err(|source| QemuError::Io {
        path: base.into(),
        source,
    })?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(overlay);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    let out = cmd.output().map_err(|source| QemuError::Io {
        path: "qemu-img".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(QemuError::QemuImg {
            path: overlay.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The watchdog device every machine gets (Linux's `i6300esb` driver).
pub const WATCHDOG_DEVICE: &str = "i6300esb";
/// What QEMU does when the guest's watchdog fires: reset the machine.
pub const WATCHDOG_ACTION: &str = "watchdog=reset";

/// One QEMU virtual machine: its disk, firmware variables and console file live in
/// `dir`, which the caller owns.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Guest architecture.
    pub arch: Arch,
    /// How guest code runs.
    pub accel: Accel,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The machine's disk (qcow2 overlay or raw; empty for none).
    pub disk: PathBuf,
    /// Directory for the firmware variables and the console log.
    pub dir: PathBuf,
    /// Exit QEMU when the guest reboots instead of rebooting it.
    pub no_reboot: bool,
    /// `fw_cfg` entries: (name, file).
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// Extra QEMU arguments (network devices, ...).
    pub extra: Vec<String>,
    /// Put the serial console on QEMU's standard input/output (interactive runs)
    /// instead of the console file.
    pub console_stdio: bool,
    /// Append to the console file rather than start it afresh (a power-cycled node's
    /// console log keeps every boot).
    pub console_append: bool,
}

impl Machine {
    /// A machine with a disk, defaults: 1 GiB, 2 vCPUs, reboots pass through.
    pub fn new(arch: Arch, accel: Accel, disk: PathBuf, dir: PathBuf) -> Self {
        Machine {
            arch,
            accel,
            memory_mib: 1024,
            cpus: 2,
            disk,
            dir,
            no_reboot: false,
            fw_cfg: Vec::new(),
            extra: Vec::new(),
            console_stdio: false,
            console_append: false,
        }
    }

    /// Where the serial console is written.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Where the machine's UEFI variables are kept.
    pub fn vars_path(&self) -> PathBuf {
        self.dir.join("efivars.fd")
    }

    /// Copy fresh firmware variables into the machine's directory (a VARS file reused
    /// across a changed device set drops the firmware into its shell), start an empty
    /// console file, and build the QEMU command line.
    pub fn command(&self) -> Result<Command, QemuError> {
        let (_, vars_template) = firmware(self.arch)?;
        let vars = self.vars_path();
        std::fs::copy(&vars_template, &vars).map_err(|source| QemuError::Io {
            path: vars.clone(),
            source,
        })?;
        let console = self.console_path();
        std::fs::File::create(&console)
            .and_then(|mut f| f.flush())
            .map_err(|source| QemuError::Io {
                path: console.clone(),
                source,
            })?;
        self.command_line()
    }

    /// The QEMU command line alone, over the firmware variables and console file already
    /// in the machine's directory (a machine booted again with the same devices keeps
    /// its variables). Touches no file; fails only when the firmware is not installed.
    pub fn command_line(&self) -> Result<Command, QemuError> {
        let (code, _) = firmware(self.arch)?;
        let vars = self.vars_path();
        let console = self.console_path();
        let mut cmd = Command::new(qemu_binary(self.arch));
        match self.arch {
            Arch::Amd64 => {
                cmd.args(["-machine", "q35"]);
                // QEMU's default model (qemu64) has no RDRAND, so under TCG the
                // kernel's random pool waits on jitter entropy for the first second
                // or more; nor the SHA extensions (with SSSE3 and SSE4.1, which their
                // kernel code uses), so dm-verity hashed with generic C, emulated
                // instruction by instruction; nor AES-NI and PCLMULQDQ, without which
                // the TLS of an upgrade's transfer (AES-GCM) ran in ring's software
                // AES. Current x86-64 servers have all of them. (`max` has them too,
                // but its AVX paths are slower to emulate: the boot took 20% longer.)
                let cpu = if self.accel == Accel::Kvm {
                    "host"
                } else {
                    "qemu64,+rdrand,+ssse3,+sse4.1,+sha-ni,+aes,+pclmulqdq"
                };
                cmd.args(["-cpu", cpu]);
            }
            Arch::Arm64 => {
                cmd.args(["-machine", "virt"]);
                let cpu = if self.accel == Accel::Kvm {
                    "host"
                } else {
                    // Pointer authentication is slow to emulate; QEMU's own
                    // implementation-defined algorithm is fast.
                    "max,pauth-impdef=on"
                };
                cmd.args(["-cpu", cpu]);
            }
        }
        cmd.args(["-accel", self.accel.name()]);
        cmd.args(["-m", &self.memory_mib.to_string()]);
        cmd.args(["-smp", &self.cpus.to_string()]);
        cmd.args(["-display", "none", "-nodefaults", "-no-user-config"]);
        if self.console_stdio {
            cmd.args(["-serial", "stdio"]);
        } else if self.console_append {
            cmd.arg("-chardev").arg(format!(
                "file,id=console,path={},append=on",
                console.display()
            ));
            cmd.args(["-serial", "chardev:console"]);
        } else {
            cmd.arg("-serial")
                .arg(format!("file:{}", console.display()));
        }
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            code.display()
        ));
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ));
        if !self.disk.as_os_str().is_empty() {
            let format = if self.disk.extension().is_some_and(|e| e == "qcow2") {
                "qcow2"
            } else {
                "raw"
            };
            cmd.arg("-drive").arg(format!(
                "if=none,id=disk0,format={format},file={}",
                self.disk.display()
            ));
            cmd.args(["-device", "virtio-blk-pci,drive=disk0,bootindex=1"]);
        }
        // The watchdog PID 1 arms in stage 1 and pings from stage 2 (init's
        // `watchdog`): an Intel 6300ESB on the PCI bus (q35's, and virt's PCIe host
        // bridge on arm64), and what QEMU does when it fires, a reset. `reset` is QEMU's
        // default, named here so that a hung guest is never paused or left running; under
        // `-no-reboot` that reset, like any other, ends QEMU instead.
        cmd.args(["-device", WATCHDOG_DEVICE, "-action", WATCHDOG_ACTION]);
        for (name, file) in &self.fw_cfg {
            cmd.arg("-fw_cfg")
                .arg(format!("name={name},file={}", file.display()));
        }
        if self.no_reboot {
            cmd.arg("-no-reboot");
        }
        cmd.args(&self.extra);
        if !self.console_stdio {
            cmd.stdin(Stdio::null());
        }
        Ok(cmd)
    }
}

/// Append the tail of a console log to an error message, so that a timeout says what
/// the machine was doing.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_command_line_has_firmware_disk_and_console() {
        let dir = std::env::temp_dir().join(format!("keelson-qemu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Machine::new(Arch::Amd64, Accel::Tcg, dir.join("d.qcow2"), dir.clone());
        match m.command() {
            Ok(cmd) => {
                let args: Vec<String> = cmd
                    .get_args()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                let line = args.join(" ");
                assert!(line.contains("OVMF_CODE_4M.fd"), "{line}");
                assert!(line.contains("format=qcow2"), "{line}");
                assert!(line.contains("-accel tcg"), "{line}");
                assert!(
                    line.contains("-device i6300esb -action watchdog=reset"),
                    "{line}"
                );
                assert!(dir.join("efivars.fd").is_file());
            }
            Err(QemuError::MissingFirmware { package, .. }) => {
                panic!("firmware missing: install {package} (cargo xtask deps)")
            }
            Err(e) => panic!("{e}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
