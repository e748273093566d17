use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config_source::MAX_CONFIG;

/// The limit of the parser cases below.
const LIMIT: usize = 64;

const OK: &str = "HTTP/1.1 200 OK\r\n";
const CHUNKED: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

/// `raw` parsed whole, and fed one byte at a time, gives `expected`: the body, or an
/// error whose message contains the text.
fn check(raw: &[u8], expected: Result<&[u8], &str>) {
    let shown = raw.escape_ascii().to_string();
    let whole = parse_response(raw, LIMIT).map_err(|e| e.to_string());
    let mut reader = ResponseReader::new(LIMIT);
    let mut fed = Ok(false);
    for byte in raw {
        fed = reader.feed(std::slice::from_ref(byte));
        if !matches!(fed, Ok(false)) {
            break;
        }
    }
    let bytewise = fed.and_then(|_| reader.finish()).map_err(|e| e.to_string());
    assert_eq!(whole, bytewise, "{shown}");
    match expected {
        Ok(body) => assert_eq!(whole.as_deref(), Ok(body), "{shown}"),
        Err(needle) => assert!(
            whole.as_ref().is_err_and(|e| e.contains(needle)),
            "{shown}: {whole:?} does not say {needle:?}"
        ),
    }
}

#[test]
fn urls_are_plain_http_to_a_host() {
    let url = |s: &str| parse_http_url(s).map(|u| (u.host, u.port, u.path));
    assert_eq!(
        url("http://10.0.2.2:8080/n.toml").ok(),
        Some(("10.0.2.2".into(), 8080, "/n.toml".into()))
    );
    assert_eq!(
        url("http://cfg.example").ok(),
        Some(("cfg.example".into(), 80, "/".into()))
    );
    assert_eq!(
        url("http://[fd00::1]:81/a?b=c").ok(),
        Some(("[fd00::1]".into(), 81, "/a?b=c".into()))
    );
    let refused = |s: &str, needle: &str| {
        let got = url(s).map_err(|e| e.to_string());
        assert!(
            got.as_ref().is_err_and(|e| e.contains(needle)),
            "{s}: {got:?}"
        );
    };
    refused("ftp://x/", "only http:// and https://");
    refused("http://x:port/", "bad port");
    refused("http://x:99999/", "bad port");
    refused("http://user@x/", "no host");
    refused("http:///a", "no host");
    refused("http://:80/a", "no host");
    refused("http://[fd00::1/", "unclosed");
    refused("http://[fd00::1]x/", "junk");
    refused("http://h/a b", "space");
    refused("http://h/a\r\nX-Evil: 1", "control");
}

#[test]
fn answers_are_framed_by_length_by_chunks_or_by_the_end_of_the_connection() {
    let ok = |raw: &str, body: &str| check(raw.as_bytes(), Ok(body.as_bytes()));
    ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "abc");
    ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", "abc");
    ok("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\nabc", "abc");
    ok("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "");
    ok("HTTP/1.0 200 OK\r\n\r\nuntil the end", "until the end");
    // httparse takes a bare LF as a line end.
    ok("HTTP/1.1 200 OK\nContent-Length: 1\n\na", "a");
    ok("\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", "a");
    ok(
        &format!("{CHUNKED}3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"),
        "abcde",
    );
    ok(
        &format!("{CHUNKED}A\r\n0123456789\r\n0\r\n\r\n"),
        "0123456789",
    );
    // A trailer is skipped; a connection closed in it lost nothing of the body.
    ok(&format!("{CHUNKED}1\r\na\r\n0\r\nX-Sum: 1\r\n\r\n"), "a");
    ok(
        &format!("{CHUNKED}1\r\na\r\n0\r\nX: \r\r\nY: \n\r\n\r\n"),
        "a",
    );
    ok(&format!("{CHUNKED}1\r\na\r\n0\r\n"), "a");
    // Transfer-Encoding wins over Content-Length.
    ok(
        "HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
        "a",
    );
    ok(
        &format!("{OK}Content-Length: 64\r\n\r\n{}", "x".repeat(64)),
        &"x".repeat(64),
    );
}

#[test]
fn malformed_answers_are_refused_saying_what_is_wrong() {
    let refused = |raw: &str, needle: &str| check(raw.as_bytes(), Err(needle));
    refused(
        "",
        "closed the connection after 0 bytes, before the end of the header",
    );
    refused(
        "HTTP/1.1 200 OK\r\nContent-",
        "before the end of the header",
    );
    refused("garbage\r\n\r\n", "not HTTP/1.x");
    refused("HTTP/1.1 404 Not Found\r\n\r\n", "answered 404 Not Found");
    refused(
        "HTTP/1.1 301 Moved\r\nLocation: http://x/\r\n\r\n",
        "answered 301 Moved, not 200 OK",
    );
    refused(
        &format!("{OK}Transfer-Encoding: gzip, chunked\r\n\r\n"),
        "transfer coding \"gzip, chunked\"",
    );
    refused(
        &format!("{OK}Transfer-Encoding: chunked, chunked\r\n\r\n"),
        "transfer coding",
    );
    refused(
        &format!("{OK}Content-Length: +3\r\n\r\nabc"),
        "Content-Length \"+3\"",
    );
    refused(
        &format!("{OK}Content-Length: 3, 4\r\n\r\nabc"),
        "Content-Length",
    );
    refused(
        &format!("{OK}Content-Length: 3\r\nContent-Length: 4\r\n\r\nabc"),
        "Content-Length \"4\"",
    );
    refused(
        &format!("{OK}Content-Length: 99999999999999999999999\r\n\r\n"),
        "Content-Length",
    );
    refused(
        &format!("{OK}Content-Length: 5\r\n\r\nabc"),
        "after 3 of the 5 bytes it announced",
    );
    refused(
        &format!("{OK}X: {}\r\n\r\n", "y".repeat(MAX_HEAD)),
        "longer than 65536",
    );
    let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
    refused(&format!("{OK}{many}\r\n"), "too many headers");
}

#[test]
fn crafted_chunked_bodies_are_refused_never_a_panic() {
    let refused =
        |body: &str, needle: &str| check(format!("{CHUNKED}{body}").as_bytes(), Err(needle));
    // usize::MAX and usize::MAX - 1: `size + 2` wrapped in the hand-written decoder.
    refused(
        "ffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        "a chunk of 18446744073709551615 bytes after 0 bytes of body would pass the 64-byte limit",
    );
    refused(
        "fffffffffffffffe\r\nabc\r\n0\r\n\r\n",
        "a chunk of 18446744073709551614 bytes",
    );
    refused(
        "10000000000000000\r\nabc\r\n0\r\n\r\n",
        "chunk-size line \"10000000000000000\" is not a hexadecimal size of at most 16 digits",
    );
    refused("41\r\n", "a chunk of 65 bytes");
    refused(
        &format!("20\r\n{x}\r\n20\r\n{x}\r\n1\r\n", x = "x".repeat(32)),
        "a chunk of 1 bytes after 64 bytes of body",
    );
    refused(
        "3\r\nabcXY1\r\nd\r\n0\r\n\r\n",
        "the chunk that ends at byte 3 of the body is not followed by CRLF",
    );
    refused(
        "3\r\nabc",
        "after 3 bytes of a chunked body, before its last chunk",
    );
    refused("3\r\nab", "after 2 bytes of a chunked body");
    refused("3\r\nabc\r", "after 3 bytes");
    refused("3\r\nabc\r\n", "after 3 bytes");
    refused("3\r\nabc\r\n0", "after 3 bytes");
    refused("", "after 0 bytes of a chunked body");
    refused("\r\n", "chunk-size line \"\"");
    refused("x\r\n", "chunk-size line \"x\"");
    refused("3 x\r\nabc\r\n", "chunk-size line \"3 x\"");
    refused("3\rabc\r\n", "chunk-size line");
    refused(
        &format!("3;{}", "e".repeat(MAX_CHUNK_LINE)),
        "longer than 4096 bytes",
    );
    refused(
        &format!("0\r\n{}", "t".repeat(MAX_HEAD + 1)),
        "trailer is longer than 65536 bytes",
    );
}

#[test]
fn a_body_read_to_the_end_stops_at_the_limit() {
    check(
        format!("{OK}\r\n{}", "x".repeat(LIMIT + 1)).as_bytes(),
        Err("the body is longer than the 64-byte limit of a config"),
    );
    check(
        format!("{OK}Content-Length: 65\r\n\r\n").as_bytes(),
        Err("the server announces 65 bytes, more than the 64-byte limit of a config"),
    );
}

#[test]
fn pins_are_64_hex_digits() {
    let sum = sha256_hex(b"abc");
    assert_eq!(
        sum,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(parse_pin(&sum.to_uppercase()).ok(), Some(sum.clone()));
    for bad in [
        "",
        "abc",
        &sum[1..],
        &format!("{sum}0"),
        &sum.replace('a', "g"),
    ] {
        let got = parse_pin(bad).map_err(|e| e.to_string());
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("keelson.config.sha256=")
                    && e.contains("is not 64 hexadecimal digits")),
            "{bad}: {got:?}"
        );
    }
}

/// A server on 127.0.0.1 that answers each request with the next of `answers` (closing
/// the connection unless `keep_open`), and the URL of its `/node.toml`.
async fn serve(
    answers: Vec<Vec<u8>>,
    keep_open: bool,
) -> io::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://127.0.0.1:{}/node.toml",
        listener.local_addr()?.port()
    );
    let server = tokio::spawn(async move {
        for answer in answers {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let port = url_port(&request);
            let answer = if request.starts_with(b"GET /node.toml HTTP/1.1\r\n") && port {
                answer
            } else {
                b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()
            };
            let _ = conn.write_all(&answer).await;
            if keep_open {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    });
    Ok((url, server))
}

/// Whether the request names the host with its port, as HTTP/1.1 asks.
fn url_port(request: &[u8]) -> bool {
    String::from_utf8_lossy(request)
        .lines()
        .any(|l| l.starts_with("Host: 127.0.0.1:"))
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[test]
fn a_real_server_s_answer_is_read_until_it_is_whole() -> io::Result<()> {
    runtime()?.block_on(async {
        let answers = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"
                .to_vec(),
        ];
        for answer in answers {
            // The connection stays open: the client must stop where the answer ends.
            let (url, server) = serve(vec![answer], true).await?;
            let got = get(
                &url,
                &Trust::PublicRoots,
                MAX_CONFIG,
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(got.ok(), Some(b"hello".to_vec()));
            server.abort();
        }
        Ok(())
    })
}

#[test]
fn a_hostile_server_s_chunked_body_is_refused_never_a_panic() -> io::Result<()> {
    let chunked = |body: &str| format!("{CHUNKED}{body}").into_bytes();
    let too_big = MAX_CONFIG + 1;
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            chunked("ffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
            format!("a chunk of {} bytes", usize::MAX),
        ),
        (
            chunked("fffffffffffffffe\r\nabc\r\n0\r\n\r\n"),
            format!("a chunk of {} bytes", usize::MAX - 1),
        ),
        (
            chunked(&format!("{too_big:x}\r\nabc\r\n0\r\n\r\n")),
            format!(
                "a chunk of {too_big} bytes after 0 bytes of body would pass the {MAX_CONFIG}-byte limit"
            ),
        ),
        (
            chunked("3\r\nabcde\r\n0\r\n\r\n"),
            "the chunk that ends at byte 3 of the body is not followed by CRLF".into(),
        ),
        (
            chunked("5\r\nab"),
            "closed the connection after 2 bytes of a chunked body".into(),
        ),
        (
            [b"HTTP/1.1 200 OK\r\n\r\n".to_vec(), vec![b'#'; too_big]].concat(),
            format!("the body is longer than the {MAX_CONFIG}-byte limit"),
        ),
    ];
    runtime()?.block_on(async {
        for (answer, needle) in cases {
            let (url, server) = serve(vec![answer], false).await?;
            let got = get(
                &url,
                &Trust::PublicRoots,
                MAX_CONFIG,
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| e.to_string());
            assert!(
                got.as_ref().is_err_and(|e| e.contains(&needle)),
                "{url}: {got:?} does not say {needle:?}"
            );
            server.abort();
        }
        Ok(())
    })
}

#[test]
fn a_pinned_config_is_taken_only_with_its_sha256() -> io::Result<()> {
    let body = b"version = \"v1\"\n";
    let answer = [
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes(),
        body.to_vec(),
    ]
    .concat();
    let sum = sha256_hex(body);
    let other = sha256_hex(b"another config");
    runtime()?.block_on(async {
        let (url, server) = serve(vec![answer.clone(), answer], false).await?;
        let timeout = Duration::from_secs(5);
        let got = fetch(
            &url,
            Some(&sum.to_uppercase()),
            &Trust::PublicRoots,
            MAX_CONFIG,
            timeout,
        )
        .await;
        assert_eq!(got.ok(), Some(body.to_vec()));
        let got = fetch(&url, Some(&other), &Trust::PublicRoots, MAX_CONFIG, timeout)
            .await
            .map_err(|e| e.to_string());
        let Err(message) = got else {
            panic!("a config with another sha256 was taken");
        };
        for needle in [
            &format!("the config's sha256 is {sum}, but keelson.config.sha256 pins {other}"),
            "serve the pinned config",
            "keelson.config.sha256=<the sha256sum of the config you mean>",
        ] {
            assert!(message.contains(needle), "{message}");
        }
        server.abort();
        // A malformed pin refuses before connecting: nothing listens here any more.
        let got = fetch(&url, Some("abc"), &Trust::PublicRoots, MAX_CONFIG, timeout)
            .await
            .map_err(|e| e.to_string());
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("\"abc\" is not 64 hexadecimal digits")),
            "{got:?}"
        );
        Ok(())
    })
}
