//! `machinectl dmesg`: the kernel log, read from `/dev/kmsg`.
//!
//! Each `read(2)` of `/dev/kmsg` returns one record, `PRI,SEQ,TIMESTAMP_US,FLAGS;TEXT\n`
//! followed by optional ` KEY=VALUE` lines. The file is opened non-blocking: `EAGAIN` means
//! every record so far has been read, and the same descriptor then yields only new
//! records, which is how `--follow` works. `EPIPE` means records were overwritten before
//! we read them; reading simply continues with the oldest one left.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The largest record the kernel writes (`CONSOLE_EXT_LOG_MAX`).
const RECORD_MAX: usize = 8192;

/// Errors from reading the kernel log.
#[derive(Debug, thiserror::Error)]
pub enum KmsgError {
    /// The device could not be opened.
    #[error("cannot open the kernel log {path}")]
    Open {
        /// The device.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading failed.
    #[error("cannot read the kernel log {path}")]
    Read {
        /// The device.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// One kernel log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Syslog level 0-7.
    pub level: u32,
    /// Syslog facility (0: kernel).
    pub facility: u32,
    /// The kernel's sequence number.
    pub sequence: u64,
    /// Microseconds since boot.
    pub timestamp_us: u64,
    /// The text.
    pub message: String,
}

/// Parses one `/dev/kmsg` record; `None` for anything else.
pub fn parse_record(raw: &[u8]) -> Option<Record> {
    let text = String::from_utf8_lossy(raw);
    let (prefix, rest) = text.split_once(';')?;
    let mut fields = prefix.split(',');
    let pri: u32 = fields.next()?.parse().ok()?;
    let sequence = fields.next()?.parse().ok()?;
    let timestamp_us = fields.next()?.parse().ok()?;
    let message = rest.split('\n').next().unwrap_or_default().to_owned();
    Some(Record {
        level: pri & 7,
        facility: pri >> 3,
        sequence,
        timestamp_us,
        message,
    })
}

/// An open kernel log.
#[derive(Debug)]
pub struct Kmsg {
    file: File,
    path: PathBuf,
}

impl Kmsg {
    /// Opens the kernel log at its start (the oldest record the kernel still holds).
    pub fn open(path: &Path) -> Result<Kmsg, KmsgError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| KmsgError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Kmsg {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Every record not read yet, at most `max` (the rest on the next call).
    pub fn read_available(&mut self, max: usize) -> Result<Vec<Record>, KmsgError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECORD_MAX];
        while out.len() < max {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(record) = buf.get(..n).and_then(parse_record) {
                        out.push(record);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(KmsgError::Read {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_parse() {
        let r = parse_record(
            b"6,339,5140900,-;NET: Registered PF_INET6 protocol family\n SUBSYSTEM=net\n",
        )
        .unwrap();
        assert_eq!(
            r,
            Record {
                level: 6,
                facility: 0,
                sequence: 339,
                timestamp_us: 5_140_900,
                message: "NET: Registered PF_INET6 protocol family".into()
            }
        );
        let r = parse_record(b"30,1,2,c;init: hello").unwrap();
        assert_eq!((r.level, r.facility), (6, 3));
        assert_eq!(parse_record(b"garbage"), None);
        assert_eq!(parse_record(b"x,1,2;a"), None);
    }

    #[test]
    fn a_missing_device_is_named() {
        let err = Kmsg::open(Path::new("/nonexistent/kmsg")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kmsg"), "{err}");
    }
}
