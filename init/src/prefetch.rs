//! Read the programs stage 2 starts at boot into the page cache, on a CPU the boot's own
//! work leaves idle.
//!
//! The root is a zstd squashfs under dm-verity: the first touch of a program's page costs
//! the decompression of its squashfs block and the verity hashes under it, and a program
//! that starts cold pays that one page fault at a time, on its own critical path.
//! containerd (Debian's 51 MiB Go binary) is the case that matters: under TCG, exec to
//! its first log line took 3.4 s cold and 1.1 s with the binary already in the page
//! cache; reading the file whole took 1.6 s (BENCHMARKS.md, the morning of
//! 2026-12-04). Stage 2 spends its first seconds on one CPU (modules, disks, config) before it
//! can start containerd, so a background thread reads the file meanwhile, and containerd
//! then starts from memory.
//!
//! The imager lists the files (each early program after the shared objects it loads:
//! mke2fs on a first boot took 0.65 s cold and 0.2 s with its libraries read ahead).
//!
//! Plain `read(2)` into one reused buffer, not `readahead(2)` or `POSIX_FADV_WILLNEED`:
//! those may return before the pages are in, so the line that reports the read would
//! not say when the work was done. A file that cannot be read is reported and skipped;
//! the program's own start then pays for it as before. Each outcome goes to the main
//! loop through a typed [`Sender`] (one boot-log line each).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sender::Sender;

/// The list of files to read, written by the imager (see `keelson_imager::prefetch`).
pub fn list_path() -> PathBuf {
    Path::new("/").join(keelson_configs::layout::PREFETCH_LIST)
}

/// The files of a prefetch list: absolute paths, one a line; anything else is skipped.
pub fn parse_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// The read size: large enough that the syscalls cost nothing next to the decompression.
const CHUNK: usize = 1 << 20;

/// What reading one file ahead came to.
#[derive(Debug)]
pub struct Outcome {
    /// The file.
    pub path: PathBuf,
    /// Bytes read, or why the file could not be read.
    pub result: Result<u64, io::Error>,
    /// How long it took.
    pub took: Duration,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.took.as_millis();
        match &self.result {
            Ok(bytes) => write!(
                f,
                "prefetch {}: {:.1} MiB read into the page cache in {ms} ms",
                self.path.display(),
                *bytes as f64 / f64::from(1u32 << 20)
            ),
            Err(e) => write!(
                f,
                "prefetch {}: not read ({}); it loads on demand when it starts",
                self.path.display(),
                crate::syscalls::errno_name(e)
            ),
        }
    }
}

/// Read `path` to its end, discarding the bytes, with `buf` as scratch.
pub fn read_through(path: &Path, buf: &mut [u8]) -> Outcome {
    let start = Instant::now();
    let result = File::open(path).and_then(|mut file| match crate::drain(&mut file, buf) {
        (total, None) => Ok(total),
        (_, Some(e)) => Err(e),
    });
    Outcome {
        path: path.to_path_buf(),
        result,
        took: start.elapsed(),
    }
}

/// On a new thread: read the list at `list`, then each file it names in turn, handing
/// each outcome to `report` as it comes (a list that cannot be read is one outcome).
/// Returns the thread, or why it could not be started (the boot goes on without).
pub fn spawn(list: PathBuf, report: Sender<Outcome>) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            let started = Instant::now();
            let paths = match std::fs::read_to_string(&list) {
                Ok(text) => parse_list(&text),
                Err(e) => {
                    let _ = report.send(Outcome {
                        path: list,
                        result: Err(e),
                        took: started.elapsed(),
                    });
                    return;
                }
            };
            let mut buf = vec![0u8; CHUNK];
            for path in paths {
                let _ = report.send(read_through(&path, &mut buf));
            }
        })
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::sender::Closed;

    #[test]
    fn every_file_is_read_to_its_end_and_a_missing_one_is_reported() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let big = dir.path().join("big");
        std::fs::write(&big, vec![7u8; 3 * CHUNK + 5])?;
        let missing = dir.path().join("missing");
        let list = dir.path().join("prefetch");
        std::fs::write(
            &list,
            format!("{}\n\nnot/absolute\n{}\n", big.display(), missing.display()),
        )?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = spawn(
            list,
            Sender::from_fn(move |o| tx.send(o).map_err(|_| Closed)),
        )?;
        let _ = thread.join();
        let outcomes: Vec<Outcome> = rx.iter().collect();
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[0].path, big);
        assert_eq!(
            outcomes[0].result.as_ref().ok(),
            Some(&(3 * CHUNK as u64 + 5))
        );
        let line = outcomes[0].to_string();
        assert!(
            line.starts_with(&format!("prefetch {}: 3.0 MiB read", big.display())),
            "{line}"
        );
        assert_eq!(outcomes[1].path, missing);
        assert_eq!(
            outcomes[1].to_string(),
            format!(
                "prefetch {}: not read (ENOENT (2)); it loads on demand when it starts",
                missing.display()
            )
        );
        Ok(())
    }

    #[test]
    fn a_missing_list_is_one_outcome() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let report = Sender::from_fn(move |o| tx.send(o).map_err(|_| Closed));
        let thread = spawn(dir.path().join("none"), report)?;
        let _ = thread.join();
        let outcomes: Vec<Outcome> = rx.iter().collect();
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].to_string().contains("not read (ENOENT"));
        Ok(())
    }
}
