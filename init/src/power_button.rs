//! The power button: a press powers the node off cleanly.
//!
//! Hypervisors and clouds ask a machine to stop by pressing its (virtual) power button:
//! an ACPI event on amd64 (driver `button`), a GPIO key on arm64 (`gpio_keys`). The
//! kernel turns it into a `KEY_POWER` input event and nothing more (Debian's kernel has
//! no `tiny-power-button` driver that would signal PID 1), so PID 1 reads the evdev
//! devices (`/dev/input/eventN`, module `evdev`) whose key capabilities include
//! `KEY_POWER`, and sends a [`Pressed`] to the main loop on a press.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sender::Sender;
use crate::syscalls::Syscalls;

/// A press of the power button, on the device named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pressed(pub String);

/// `EV_KEY` from linux/input-event-codes.h.
const EV_KEY: u16 = 1;
/// `KEY_POWER` from linux/input-event-codes.h.
pub const KEY_POWER: u32 = 116;
/// `sizeof(struct input_event)` on 64-bit kernels (a 16-byte timeval, type, code, value).
const EVENT_SIZE: usize = 24;

/// Whether a `capabilities/key` bitmap (hex words, most significant first, each a
/// kernel `long`) has bit `key`.
pub fn has_key(bitmap: &str, key: u32) -> bool {
    let words: Vec<u64> = bitmap
        .split_whitespace()
        .rev()
        .filter_map(|w| u64::from_str_radix(w, 16).ok())
        .collect();
    let (word, bit) = ((key / 64) as usize, key % 64);
    words.get(word).is_some_and(|w| w & (1 << bit) != 0)
}

/// The evdev nodes under `dev` whose device can send `KEY_POWER`, from `sysfs`.
pub fn find(sys: &dyn Syscalls, sysfs: &Path, dev: &Path) -> Vec<PathBuf> {
    let class = sysfs.join("class/input");
    let Ok(names) = sys.read_dir_names(&class) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = names
        .into_iter()
        .filter(|name| name.starts_with("event"))
        .filter(|name| {
            sys.read_file(&class.join(name).join("device/capabilities/key"))
                .is_ok_and(|bits| has_key(&String::from_utf8_lossy(&bits), KEY_POWER))
        })
        .map(|name| dev.join("input").join(name))
        .collect();
    out.sort();
    out
}

/// Whether a 24-byte `input_event` is a press of `KEY_POWER`.
pub fn is_power_press(record: &[u8]) -> bool {
    if record.len() < EVENT_SIZE {
        return false;
    }
    let kind = u16::from_ne_bytes([record[16], record[17]]);
    let code = u16::from_ne_bytes([record[18], record[19]]);
    let value = i32::from_ne_bytes([record[20], record[21], record[22], record[23]]);
    kind == EV_KEY && u32::from(code) == KEY_POWER && value == 1
}

/// Watch `device`; each power press is sent on `events`.
pub fn watch(device: &Path, events: Sender<Pressed>) -> io::Result<()> {
    let file = File::open(device)?;
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::NONBLOCK)?;
    // SAFETY: `file` is an open descriptor that the `AsyncFd` owns until it is dropped,
    // and a `File` always answers the same descriptor from `as_raw_fd`.
    let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    let name = device.display().to_string();
    tokio::spawn(async move {
        let mut buf = [0u8; EVENT_SIZE * 16];
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            match guard.try_io(|inner| inner.get_ref().read(&mut buf)) {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => {
                    if buf[..n].chunks_exact(EVENT_SIZE).any(is_power_press)
                        && events.send(Pressed(name.clone())).is_err()
                    {
                        return;
                    }
                }
                Err(_would_block) => continue,
            }
        }
    });
    Ok(())
}

/// Watch every power button there is; returns the devices watched.
pub fn watch_all(sys: &dyn Syscalls, events: &Sender<Pressed>) -> Vec<(PathBuf, io::Result<()>)> {
    find(sys, Path::new("/sys"), Path::new("/dev"))
        .into_iter()
        .map(|device| {
            let result = watch(&device, events.clone());
            (device, result)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bitmaps_are_read_like_the_kernel_writes_them() {
        // QEMU's ACPI power button: only KEY_POWER (bit 116 = word 1, bit 52).
        assert!(has_key("10000000000000 0", KEY_POWER));
        // A keyboard without KEY_POWER in its lowest word.
        assert!(!has_key("fffffffffffffffe", KEY_POWER));
        assert!(!has_key("", KEY_POWER));
    }

    fn record(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut r = vec![0u8; 16];
        r.extend_from_slice(&kind.to_ne_bytes());
        r.extend_from_slice(&code.to_ne_bytes());
        r.extend_from_slice(&value.to_ne_bytes());
        r
    }

    #[test]
    fn only_a_press_of_the_power_key_counts() {
        assert!(is_power_press(&record(1, 116, 1)));
        assert!(!is_power_press(&record(1, 116, 0)), "release");
        assert!(!is_power_press(&record(1, 30, 1)), "another key");
        assert!(!is_power_press(&record(0, 0, 0)), "sync report");
        assert!(!is_power_press(&[0u8; 8]));
    }

    #[test]
    fn devices_are_found_by_capability() -> io::Result<()> {
        let sys = crate::syscalls::fake::Fake::default();
        for (event, bits) in [
            ("event0", "10000000000000 0"),
            ("event1", "fffffffffffffffe"),
            ("mouse0", ""),
        ] {
            let key = Path::new("/sys/class/input")
                .join(event)
                .join("device/capabilities/key");
            sys.files
                .borrow_mut()
                .insert(key, format!("{bits}\n").into_bytes());
        }
        assert_eq!(
            find(&sys, Path::new("/sys"), Path::new("/dev")),
            [PathBuf::from("/dev/input/event0")]
        );
        Ok(())
    }
}
