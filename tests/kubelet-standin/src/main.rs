//! `kubelet-standin`: a binary that a test serves and pins in the kubelet's place. It is
//! NOT a kubelet and runs no pods: it exercises the node's path to a kubelet (fetched
//! from the release site's layout, verified against its sha256, started with the flags
//! and config the node rendered, supervised, restarted with backoff when killed), which
//! the test then judges from what the stand-in recorded.
//!
//! At each start it records, under [`RECORD_DIR`]:
//! - `argv.json`: its argv, as a JSON array of strings;
//! - `config.yaml`, `kubeconfig`, `bootstrap-kubeconfig`: a copy of the file named by
//!   `--config`, `--kubeconfig` and `--bootstrap-kubeconfig` (or one line saying the file
//!   was absent; a record whose flag was not given is removed);
//! - `starts`: how many times it has started, and `starts.log`: one line per start with
//!   its number, the UTC date and, last, the Unix time in seconds with milliseconds
//!   (`3 2026-12-06T04:15:00Z 1796530500.123`), to measure the gaps between starts.
//!
//! Every record is written (each atomically) before its health endpoint listens, so a
//! test that saw it healthy reads the records of that start. It then answers
//! `GET /healthz` with `200 ok` on the kubelet's healthz address (127.0.0.1:10248) until it
//! is killed; SIGTERM and SIGINT end it with status 0, as a clean stop.
//!
//! Std only, no dependencies: it builds as a static musl binary for both architectures.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the records are written.
const RECORD_DIR: &str = "/var/lib/kubelet/standin";

/// The kubelet's healthz address (its `healthzBindAddress` and `healthzPort`).
const HEALTHZ_ADDRESS: &str = "127.0.0.1:10248";

/// The flags naming a file the stand-in copies, and the record each copy goes to.
const RECORDED_FILES: &[(&str, &str)] = &[
    ("--config", "config.yaml"),
    ("--kubeconfig", "kubeconfig"),
    ("--bootstrap-kubeconfig", "bootstrap-kubeconfig"),
];

fn main() -> ExitCode {
    exit_zero_on_stop_signals();
    let argv: Vec<String> = std::env::args_os()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let start = match record(Path::new(RECORD_DIR), &argv, SystemTime::now()) {
        Ok(start) => start,
        Err(error) => {
            eprintln!("kubelet-standin: {error}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(HEALTHZ_ADDRESS) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "kubelet-standin: listening on {HEALTHZ_ADDRESS} for /healthz: {error} \
                 (is a kubelet or another stand-in running?)"
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "kubelet-standin: start {start} recorded in {RECORD_DIR}; serving /healthz on \
         {HEALTHZ_ADDRESS} (a test's stand-in, not a kubelet)"
    );
    for connection in listener.incoming() {
        match connection {
            Ok(stream) => answer(stream),
            Err(error) => eprintln!("kubelet-standin: accepting a connection: {error}"),
        }
    }
    ExitCode::SUCCESS
}

/// Write this start's records into `dir` (created if missing) and return the start's
/// number (1 for the first start).
fn record(dir: &Path, argv: &[String], now: SystemTime) -> Result<u64, String> {
    let failed = |what: &str, path: &Path, error: std::io::Error| {
        format!("{what} {}: {error}", path.display())
    };
    std::fs::create_dir_all(dir).map_err(|e| failed("creating", dir, e))?;
    write_atomically(&dir.join("argv.json"), json_string_array(argv).as_bytes())?;
    for (flag, name) in RECORDED_FILES {
        let copy = dir.join(name);
        match flag_value(argv, flag) {
            Some(source) => {
                let contents = std::fs::read(source).unwrap_or_else(|error| {
                    format!("kubelet-standin: {source} (named by {flag}) was absent: {error}\n")
                        .into_bytes()
                });
                write_atomically(&copy, &contents)?;
            }
            None => match std::fs::remove_file(&copy) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(failed("removing", &copy, error)),
            },
        }
    }
    let counter = dir.join("starts");
    let previous = match std::fs::read_to_string(&counter) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => return Err(failed("reading", &counter, error)),
    };
    let start = previous + 1;
    let log = dir.join("starts.log");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut file| file.write_all(start_line(start, now).as_bytes()))
        .map_err(|e| failed("appending to", &log, e))?;
    write_atomically(&counter, format!("{start}\n").as_bytes())?;
    Ok(start)
}

/// Replace `path` with `contents` through a temporary file and a rename, so that a
/// reader sees the previous start's record or this one's, never half of one.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, contents)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|error| format!("writing {}: {error}", path.display()))
}

/// The value of `flag` in `argv` (`--flag=VALUE` or `--flag VALUE`; the last one wins,
/// as in the kubelet's flag parsing).
fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let mut value = None;
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        if let Some(rest) = arg.strip_prefix(flag) {
            if let Some(inline) = rest.strip_prefix('=') {
                value = Some(inline);
            } else if rest.is_empty() {
                value = args.next().map(String::as_str);
            }
        }
    }
    value
}

/// `items` as a JSON array of strings.
fn json_string_array(items: &[String]) -> String {
    let mut json = String::from("[");
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            json.push_str(", ");
        }
        json.push('"');
        for c in item.chars() {
            match c {
                '"' => json.push_str("\\\""),
                '\\' => json.push_str("\\\\"),
                '\n' => json.push_str("\\n"),
                '\r' => json.push_str("\\r"),
                '\t' => json.push_str("\\t"),
                c if u32::from(c) < 0x20 => json.push_str(&format!("\\u{:04x}", u32::from(c))),
                c => json.push(c),
            }
        }
        json.push('"');
    }
    json.push_str("]\n");
    json
}

/// One line of `starts.log`: the start's number, the UTC date and the Unix time (seconds
/// with milliseconds).
fn start_line(start: u64, now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    format!(
        "{start} {} {seconds}.{:03}\n",
        keelson_node_protocol::clock::utc(seconds.saturating_mul(1000)),
        since.subsec_millis()
    )
}

/// Answer one HTTP request: `GET /healthz` is `200 ok`, anything else `404`.
fn answer(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let _ = stream.write_all(response(&request).as_bytes());
}

/// The response to `request` (its bytes as received).
fn response(request: &[u8]) -> String {
    let request = String::from_utf8_lossy(request);
    let mut words = request.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next(), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        (Some("GET"), "/healthz") => ("200 OK", "ok"),
        _ => (
            "404 Not Found",
            "not found: this kubelet stand-in serves only GET /healthz",
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

unsafe extern "C" {
    /// C's `signal(2)` (musl's, through sigaction with SA_RESTART).
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    /// C's `_exit(2)`, async-signal-safe.
    fn _exit(status: i32) -> !;
}

/// Linux's SIGINT and SIGTERM (the same on x86-64 and arm64).
const STOP_SIGNALS: [i32; 2] = [2, 15];

extern "C" fn exit_zero(_signal: i32) {
    // SAFETY: `_exit` is async-signal-safe and takes any status; nothing is left to flush
    // (records are written before the server starts, stderr is unbuffered).
    unsafe { _exit(0) }
}

/// A stop (SIGTERM, SIGINT) ends the stand-in with status 0, as a clean stop.
fn exit_zero_on_stop_signals() {
    for signum in STOP_SIGNALS {
        // SAFETY: `exit_zero` is an `extern "C" fn(i32)` that only calls `_exit`, which is
        // what a signal handler may do; the previous handler returned is not needed.
        unsafe {
            signal(signum, exit_zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flags_are_read_in_both_forms_and_the_last_wins() {
        let args = argv(&[
            "kubelet",
            "--config=/a",
            "--kubeconfig",
            "/b",
            "--config=/c",
            "--bootstrap-kubeconfig-extra=/d",
        ]);
        assert_eq!(flag_value(&args, "--config"), Some("/c"));
        assert_eq!(flag_value(&args, "--kubeconfig"), Some("/b"));
        assert_eq!(flag_value(&args, "--bootstrap-kubeconfig"), None);
    }

    #[test]
    fn argv_is_json_with_escapes() {
        let args = argv(&["kubelet", "--x=\"q\"\\", "a\nb\u{1}"]);
        assert_eq!(
            json_string_array(&args),
            "[\"kubelet\", \"--x=\\\"q\\\"\\\\\", \"a\\nb\\u0001\"]\n"
        );
    }

    #[test]
    fn only_get_healthz_is_ok() {
        let ok = response(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok"), "{ok}");
        assert!(response(b"GET /healthz?verbose HTTP/1.1\r\n\r\n").ends_with("ok"));
        assert!(response(b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(response(b"").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn each_start_is_recorded() {
        let dir = std::env::temp_dir().join(format!("kubelet-standin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = dir.join("in-config.yaml");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&config, "kind: KubeletConfiguration\n").unwrap();
        let first = argv(&[
            "kubelet",
            &format!("--config={}", config.display()),
            "--kubeconfig=/nonexistent/kubelet.conf",
        ]);
        let at = UNIX_EPOCH + Duration::from_millis(86_400_250);
        assert_eq!(record(&dir, &first, at).unwrap(), 1);
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("config.yaml"), "kind: KubeletConfiguration\n");
        assert!(
            read("kubeconfig")
                .contains("/nonexistent/kubelet.conf (named by --kubeconfig) was absent")
        );
        assert!(!dir.join("bootstrap-kubeconfig").exists());
        assert!(read("argv.json").starts_with("[\"kubelet\", \"--config="));

        assert_eq!(record(&dir, &argv(&["kubelet"]), at).unwrap(), 2);
        assert_eq!(read("starts"), "2\n");
        assert_eq!(
            read("starts.log"),
            "1 1970-01-02T00:00:00Z 86400.250\n2 1970-01-02T00:00:00Z 86400.250\n"
        );
        assert!(!dir.join("config.yaml").exists());
        assert_eq!(read("argv.json"), "[\"kubelet\"]\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
