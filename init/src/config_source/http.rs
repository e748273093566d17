//! The config URL's HTTP/1.1 client: one GET over plain TCP (`http://`) or TLS
//! (`https://`, see [`super::tls`]), its answer read within bounds, and the body checked
//! against `keelson.config.sha256=` when the kernel command line pins it ([`fetch`]).
//!
//! Every byte here comes from the network, and PID 1 reboots on a panic: a server that
//! could make this code panic would reboot the node at every boot. So nothing here
//! indexes past what it checked, every size is added with checked arithmetic, and every
//! malformed, truncated or oversized answer is an [`Error`] that says what was wrong.
//!
//! - The status line and the headers are parsed by `httparse`
//!   ([`httparse::Response::parse`]); each chunk-size line of a chunked body too
//!   ([`httparse::parse_chunk_size`]: at most 16 hex digits, extensions skipped).
//! - What `httparse` leaves to its caller is written here, as the state machine of
//!   [`ResponseReader`]: which framing the headers choose (the `Content-Length` value,
//!   the `Transfer-Encoding` list), the CRLF after each chunk's data, the trailer, and the
//!   running size of the body against the limit. No small crate does only this (hyper
//!   would bring a whole HTTP stack and its connection machinery into PID 1 for one GET
//!   per boot); the fuzz target `init/fuzz/fuzz_targets/http_response.rs` runs it in the
//!   test command's fuzzing stage.
//! - The URL parser ([`parse_http_url`]) is ours too: it accepts only
//!   `http://host[:port]/path` and `https://host[:port]/path` in visible ASCII.
//! - Over TLS, a server that closes without TLS's `close_notify` may have been cut short
//!   by someone in between: that is a refusal ([`Error::UncleanClose`]) unless the
//!   answer's framing (`Content-Length`, chunked) already said it was whole.
//!
//! Bounds: the header [`MAX_HEAD`] bytes (at most [`MAX_HEADERS`] headers), a chunk-size
//! line [`MAX_CHUNK_LINE`], the trailer [`MAX_HEAD`], the body the caller's limit (the
//! config size limit), the whole fetch the caller's timeout.
//!
//! **The pin.** `keelson.config.sha256=<64 hex digits>` next to `keelson.config=` pins a
//! plain-HTTP config (an `https://` one too, on top of its certificate): a body whose
//! sha256 differs is refused ([`Error::PinMismatch`], naming both sums), before it is
//! judged as a config, and the fetch is retried as any failed fetch is. A pin that is not
//! 64 hex digits refuses every fetch ([`Error::BadPin`]): a typo must not turn the pin off.

use std::io;
use std::time::Duration;

use keelson_configs::layout::CMDLINE_CONFIG_SHA256;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::tls::{self, Trust};

/// The largest response header accepted (also the largest chunked trailer).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields accepted.
pub const MAX_HEADERS: usize = 64;
/// The longest chunk-size line accepted (the size and its extensions).
pub const MAX_CHUNK_LINE: usize = 4096;
/// How many bytes of a bad line an error quotes.
const QUOTE: usize = 40;

/// Why a config URL gave no config. The caller names the URL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is neither `http://` nor `https://`.
    #[error("only http:// and https:// URLs are fetched")]
    NotHttp,
    /// No host, or credentials in the URL.
    #[error("no host, or credentials in the URL")]
    NoHost,
    /// A character that cannot go into a request line.
    #[error("the URL has a space, a control or a non-ASCII character")]
    BadUrlCharacter,
    /// The port is not a number.
    #[error("bad port {0:?}")]
    BadPort(String),
    /// `[` without `]`.
    #[error("unclosed IPv6 address")]
    UnclosedIpv6,
    /// Something between `]` and the path.
    #[error("junk after the IPv6 address")]
    JunkAfterIpv6,
    /// The pin on the command line is not a sha256.
    #[error(
        "{CMDLINE_CONFIG_SHA256}={0:?} is not 64 hexadecimal digits, so no config is accepted: \
         give the config's sha256 (sha256sum node.toml), or remove the key"
    )]
    BadPin(String),
    /// The body's sha256 is not the pinned one.
    #[error(
        "the config's sha256 is {actual}, but {CMDLINE_CONFIG_SHA256} pins {pinned}; it is \
         refused: serve the pinned config at this URL, or boot with \
         {CMDLINE_CONFIG_SHA256}=<the sha256sum of the config you mean>"
    )]
    PinMismatch {
        /// The sum of what came.
        actual: String,
        /// The sum on the command line.
        pinned: String,
    },
    /// TCP connect failed.
    #[error("cannot connect to {address}: {error}")]
    Connect {
        /// `host:port`.
        address: String,
        /// Why.
        error: io::Error,
    },
    /// The TLS side of an `https://` URL: its CA, its handshake.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// Writing the request failed.
    #[error("cannot send the request: {0}")]
    Send(io::Error),
    /// Reading the answer failed.
    #[error("reading the answer: {0}")]
    Read(io::Error),
    /// A TLS connection closed without `close_notify` while the body was read to its end.
    #[error(
        "the server closed the TLS connection without close_notify after {0} bytes of a body \
         that ends with the connection, so it may be cut short and is refused: the server \
         should send Content-Length, or end TLS with close_notify"
    )]
    UncleanClose(usize),
    /// The whole fetch took too long.
    #[error("no whole answer within {0} s")]
    Timeout(u64),
    /// The connection closed before a whole header came.
    #[error("the server closed the connection after {0} bytes, before the end of the header")]
    TruncatedHead(usize),
    /// `httparse` refused the status line or a header.
    #[error("the answer's header is not HTTP/1.x ({0})")]
    BadHead(httparse::Error),
    /// The header is longer than [`MAX_HEAD`].
    #[error("the answer's header is longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// Not 200.
    #[error("the server answered {code} {reason}, not 200 OK: is the config at this path?")]
    Status {
        /// The status code.
        code: u16,
        /// The reason phrase, quoted safely.
        reason: String,
    },
    /// A transfer coding other than `chunked` (we ask for none).
    #[error("the answer uses the transfer coding \"{0}\"; only chunked is read")]
    UnsupportedCoding(String),
    /// A `Content-Length` that is not a number, or two that differ.
    #[error("the answer's Content-Length \"{0}\" is not one decimal number")]
    BadContentLength(String),
    /// `Content-Length` over the limit.
    #[error("the server announces {declared} bytes, more than the {limit}-byte limit of a config")]
    DeclaredTooLarge {
        /// What `Content-Length` says.
        declared: u64,
        /// The limit.
        limit: usize,
    },
    /// A body read to the end of the connection grew over the limit.
    #[error("the body is longer than the {0}-byte limit of a config")]
    BodyTooLarge(usize),
    /// The connection closed before `Content-Length` bytes came.
    #[error("the server closed the connection after {got} of the {declared} bytes it announced")]
    TruncatedBody {
        /// Bytes of body received.
        got: usize,
        /// What `Content-Length` said.
        declared: usize,
    },
    /// A chunk-size line `httparse` refuses (more than 16 hex digits, not hex, no CRLF).
    #[error(
        "the chunk-size line \"{0}\" is not a hexadecimal size of at most 16 digits followed by CRLF"
    )]
    BadChunkSize(String),
    /// A chunk-size line longer than [`MAX_CHUNK_LINE`].
    #[error("a chunk-size line is longer than {MAX_CHUNK_LINE} bytes")]
    ChunkLineTooLong,
    /// A chunk that would take the body over the limit.
    #[error(
        "a chunk of {size} bytes after {got} bytes of body would pass the {limit}-byte limit of a config"
    )]
    ChunkTooLarge {
        /// The chunk's size.
        size: u64,
        /// Body bytes before it.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// A chunk's data is not followed by CRLF.
    #[error("the chunk that ends at byte {0} of the body is not followed by CRLF")]
    MissingCrlf(usize),
    /// The trailer is longer than [`MAX_HEAD`].
    #[error("the chunked body's trailer is longer than {MAX_HEAD} bytes")]
    TrailerTooLarge,
    /// The connection closed inside a chunked body.
    #[error(
        "the server closed the connection after {0} bytes of a chunked body, before its last chunk"
    )]
    TruncatedChunked(usize),
}

/// Parts of an `http://host[:port]/path` or `https://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `https://`: TLS.
    pub tls: bool,
    /// Host name or address (IPv6 in brackets).
    pub host: String,
    /// Port (80 by default, 443 with TLS).
    pub port: u16,
    /// Path with query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// The port a URL without one means.
    fn default_port(tls: bool) -> u16 {
        if tls { 443 } else { 80 }
    }

    /// The host without an IPv6 address's brackets: what is connected to, and what a
    /// certificate names.
    pub fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// Parse an `http://` or `https://` URL.
pub fn parse_http_url(url: &str) -> Result<HttpUrl, Error> {
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        (None, None) => return Err(Error::NotHttp),
    };
    let default_port = HttpUrl::default_port(tls);
    if !rest.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::BadUrlCharacter);
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(Error::NoHost);
    }
    let port = |p: &str| p.parse().map_err(|_| Error::BadPort(p.to_string()));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(Error::UnclosedIpv6)?;
        let port = match after.strip_prefix(':') {
            Some(p) => port(p)?,
            None if after.is_empty() => default_port,
            None => return Err(Error::JunkAfterIpv6),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), port(p)?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(Error::NoHost);
    }
    Ok(HttpUrl {
        tls,
        host,
        port,
        path: path.to_string(),
    })
}

/// The pin's sum in lower case, or [`Error::BadPin`].
pub fn parse_pin(value: &str) -> Result<String, Error> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(Error::BadPin(value.chars().take(80).collect()))
    }
}

/// The sha256 of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fetch `url` ([`get`], an `https://` server's certificate checked against `trust`) and,
/// when `pin` is given (the value of `keelson.config.sha256=`), refuse a body with another
/// sha256. A malformed pin, or a CA named for an `http://` URL, refuses before connecting.
pub async fn fetch(
    url: &str,
    pin: Option<&str>,
    trust: &Trust,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let pinned = pin.map(parse_pin).transpose()?;
    let body = get(url, trust, limit, timeout).await?;
    if let Some(pinned) = pinned {
        let actual = sha256_hex(&body);
        if actual != pinned {
            return Err(Error::PinMismatch { actual, pinned });
        }
    }
    Ok(body)
}

/// One HTTP/1.1 GET of `url` (no redirects) within `timeout`, over TLS for `https://`
/// with `trust`'s CAs (for `http://`, a CA named is refused): the body of a 200 answer, at
/// most `limit` bytes.
pub async fn get(
    url: &str,
    trust: &Trust,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let parsed = parse_http_url(url)?;
    let roots = match (parsed.tls, trust) {
        (true, trust) => Some(trust.roots()?),
        (false, Trust::PublicRoots) => None,
        (false, _) => return Err(tls::Error::CaWithoutHttps.into()),
    };
    let exchange = async {
        let host = parsed.bare_host();
        let stream = tokio::net::TcpStream::connect((host, parsed.port))
            .await
            .map_err(|error| Error::Connect {
                address: format!("{}:{}", parsed.host, parsed.port),
                error,
            })?;
        match roots {
            Some(roots) => {
                let stream = tls::connect(stream, host, roots, trust.trusted()).await?;
                exchange(stream, &parsed, limit).await
            }
            None => exchange(stream, &parsed, limit).await,
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout(timeout.as_secs()))?
}

/// The request for `url` written to `stream`, and the answer read from it.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &HttpUrl,
    limit: usize,
) -> Result<Vec<u8>, Error> {
    let authority = if url.port == HttpUrl::default_port(url.tls) {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: keelson-init\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(Error::Send)?;
    // Read until the answer is whole (a proxy may keep the connection open), or the
    // server closes; the reader refuses what passes its bounds.
    let mut reader = ResponseReader::new(limit);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            // A TLS connection closed without close_notify (never a plain TCP one): the
            // end of the connection cannot be the end of the body.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                if reader.reads_until_close() {
                    return Err(Error::UncleanClose(reader.body.len()));
                }
                0
            }
            Err(e) => return Err(Error::Read(e)),
        };
        let got = buf.get(..n).unwrap_or_default();
        if got.is_empty() || reader.feed(got)? {
            return reader.finish();
        }
    }
}

/// Parse a whole answer, as read until the connection closed: the body of a 200 answer
/// (chunked bodies decoded), at most `limit` bytes.
pub fn parse_response(raw: &[u8], limit: usize) -> Result<Vec<u8>, Error> {
    let mut reader = ResponseReader::new(limit);
    reader.feed(raw)?;
    reader.finish()
}

/// Where a [`ResponseReader`] is in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the end of the header: how many bytes of it were looked at for its end.
    Head { scanned: usize },
    /// A `Content-Length` body: bytes still to come.
    Length { left: usize, declared: usize },
    /// No length given: the body ends when the connection does.
    UntilClose,
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: its bytes still to come.
    ChunkData { left: usize },
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    /// After the last chunk: trailer lines up to an empty one; how many bytes so far,
    /// and whether the current line is empty so far.
    Trailer { seen: usize, empty: bool },
    /// The answer is whole.
    Done,
}

/// An HTTP/1.x answer read as it arrives: [`ResponseReader::feed`] each read, then
/// [`ResponseReader::finish`] once it says the answer is whole or the connection closed.
#[derive(Debug)]
pub struct ResponseReader {
    limit: usize,
    state: State,
    /// Bytes received but not consumed (an incomplete header or line).
    pending: Vec<u8>,
    body: Vec<u8>,
}

impl ResponseReader {
    /// A reader for an answer whose body may have at most `limit` bytes.
    pub fn new(limit: usize) -> ResponseReader {
        ResponseReader {
            limit,
            state: State::Head { scanned: 0 },
            pending: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Take the next bytes of the answer: `true` once it is whole (what follows is not
    /// read), an error as soon as it cannot be a valid answer.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<bool, Error> {
        let mut input = std::mem::take(&mut self.pending);
        input.extend_from_slice(bytes);
        let mut pos = 0;
        while self.state != State::Done {
            let rest = input.get(pos..).unwrap_or_default();
            match self.step(rest)? {
                Some(used) => pos = pos.saturating_add(used),
                None => break,
            }
        }
        input.drain(..pos.min(input.len()));
        self.pending = input;
        Ok(self.state == State::Done)
    }

    /// Whether the body, as far as the header says, ends when the connection does (no
    /// `Content-Length`, not chunked).
    pub fn reads_until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// The connection closed (or [`ResponseReader::feed`] said the answer is whole): the
    /// body, or why it is not whole.
    pub fn finish(self) -> Result<Vec<u8>, Error> {
        match self.state {
            // The last chunk came: a connection closed inside the trailer lost nothing.
            State::Done | State::UntilClose | State::Trailer { .. } => Ok(self.body),
            State::Head { .. } => Err(Error::TruncatedHead(self.pending.len())),
            State::Length { left, declared } => Err(Error::TruncatedBody {
                got: declared.saturating_sub(left),
                declared,
            }),
            State::ChunkSize | State::ChunkData { .. } | State::ChunkEnd => {
                Err(Error::TruncatedChunked(self.body.len()))
            }
        }
    }

    /// One step on the unconsumed `input`: how many bytes it used (possibly none, when
    /// only the state changed), or `None` when it needs more.
    fn step(&mut self, input: &[u8]) -> Result<Option<usize>, Error> {
        match self.state {
            State::Head { scanned } => self.head(input, scanned),
            State::Length { left, declared } => {
                let take = left.min(input.len());
                if take == 0 {
                    return Ok(None);
                }
                self.body
                    .extend_from_slice(input.get(..take).unwrap_or_default());
                let left = left - take;
                self.state = if left == 0 {
                    State::Done
                } else {
                    State::Length { left, declared }
                };
                Ok(Some(take))
            }
            State::UntilClose => {
                if input.is_empty() {
                    return Ok(None);
                }
                let total = self.body.len().checked_add(input.len());
                if total.is_none_or(|t| t > self.limit) {
                    return Err(Error::BodyTooLarge(self.limit));
                }
                self.body.extend_from_slice(input);
                Ok(Some(input.len()))
            }
            State::ChunkSize => self.chunk_size(input),
            State::ChunkData { left } => {
                let take = left.min(input.len());
                if take == 0 {
                    return Ok(None);
                }
                self.body
                    .extend_from_slice(input.get(..take).unwrap_or_default());
                let left = left - take;
                self.state = if left == 0 {
                    State::ChunkEnd
                } else {
                    State::ChunkData { left }
                };
                Ok(Some(take))
            }
            State::ChunkEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Ok(Some(2))
                }
                [] | [b'\r'] => Ok(None),
                _ => Err(Error::MissingCrlf(self.body.len())),
            },
            State::Trailer { seen, empty } => self.trailer(input, seen, empty),
            State::Done => Ok(None),
        }
    }

    /// The status line and headers, by `httparse`, once a blank line may end them; then
    /// the body's framing. Only the bytes not `scanned` yet are looked at for the blank
    /// line, so a server that sends its header a byte at a time costs no more.
    fn head(&mut self, input: &[u8], scanned: usize) -> Result<Option<usize>, Error> {
        // A blank line is `\n\n` or `\n\r\n` (httparse takes a bare LF as a line end); it
        // may straddle the bytes scanned before.
        let new = input.get(scanned.saturating_sub(2)..).unwrap_or_default();
        let blank = new.windows(2).any(|w| w == b"\n\n") || new.windows(3).any(|w| w == b"\n\r\n");
        if !blank {
            if input.len() > MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
            self.state = State::Head {
                scanned: input.len(),
            };
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(input) {
            Ok(httparse::Status::Partial) if input.len() > MAX_HEAD => Err(Error::HeadTooLarge),
            Ok(httparse::Status::Partial) => Ok(None),
            Ok(httparse::Status::Complete(used)) if used > MAX_HEAD => Err(Error::HeadTooLarge),
            Ok(httparse::Status::Complete(used)) => {
                let code = response.code.unwrap_or_default();
                if code != 200 {
                    let reason = response.reason.unwrap_or_default();
                    return Err(Error::Status {
                        code,
                        reason: quote(reason.as_bytes()),
                    });
                }
                self.state = framing(response.headers, self.limit)?;
                Ok(Some(used))
            }
            Err(e) => Err(Error::BadHead(e)),
        }
    }

    /// A chunk-size line, by `httparse`; its size checked against the limit.
    fn chunk_size(&mut self, input: &[u8]) -> Result<Option<usize>, Error> {
        // httparse reads an empty line as size 0: a size has at least one digit.
        if input.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
            return Err(Error::BadChunkSize(quote_line(input)));
        }
        match httparse::parse_chunk_size(input) {
            Ok(httparse::Status::Partial) if input.len() > MAX_CHUNK_LINE => {
                Err(Error::ChunkLineTooLong)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Ok(httparse::Status::Complete((used, _))) if used > MAX_CHUNK_LINE => {
                Err(Error::ChunkLineTooLong)
            }
            Ok(httparse::Status::Complete((used, 0))) => {
                self.state = State::Trailer {
                    seen: 0,
                    empty: true,
                };
                Ok(Some(used))
            }
            Ok(httparse::Status::Complete((used, size))) => {
                let got = self.body.len();
                let fits = usize::try_from(size)
                    .ok()
                    .filter(|s| got.checked_add(*s).is_some_and(|t| t <= self.limit));
                let Some(left) = fits else {
                    return Err(Error::ChunkTooLarge {
                        size,
                        got,
                        limit: self.limit,
                    });
                };
                self.state = State::ChunkData { left };
                Ok(Some(used))
            }
            Err(httparse::InvalidChunkSize) => Err(Error::BadChunkSize(quote_line(input))),
        }
    }

    /// Trailer lines, skipped as they come (each byte is looked at once); the empty line
    /// ends the answer.
    fn trailer(&mut self, input: &[u8], seen: usize, empty: bool) -> Result<Option<usize>, Error> {
        let line_end = input.windows(2).position(|w| w == b"\r\n");
        let used = match line_end {
            Some(end) => end.saturating_add(2),
            // A CR at the end may begin the line's CRLF: kept for later.
            None => input
                .len()
                .saturating_sub(usize::from(input.ends_with(b"\r"))),
        };
        if used == 0 {
            return Ok(None);
        }
        let seen = seen.saturating_add(used);
        if seen > MAX_HEAD {
            return Err(Error::TrailerTooLarge);
        }
        self.state = match line_end {
            Some(0) if empty => State::Done,
            Some(_) => State::Trailer { seen, empty: true },
            None => State::Trailer { seen, empty: false },
        };
        Ok(Some(used))
    }
}

/// How the body is framed, from the headers (RFC 9112 section 6.3): chunked when
/// `Transfer-Encoding` says so (it wins over `Content-Length`), else `Content-Length`,
/// else until the connection closes.
fn framing(headers: &[httparse::Header<'_>], limit: usize) -> Result<State, Error> {
    let mut chunked = false;
    let mut length: Option<u64> = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in header.value.split(|b| *b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(Error::UnsupportedCoding(quote(header.value)));
                }
                chunked = true;
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            for value in header.value.split(|b| *b == b',') {
                let value = value.trim_ascii();
                let number = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok());
                match (number, length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(before)) if n == before => {}
                    _ => return Err(Error::BadContentLength(quote(header.value))),
                }
            }
        }
    }
    if chunked {
        return Ok(State::ChunkSize);
    }
    let Some(declared) = length else {
        return Ok(State::UntilClose);
    };
    let fits = usize::try_from(declared).ok().filter(|d| *d <= limit);
    match fits {
        None => Err(Error::DeclaredTooLarge { declared, limit }),
        Some(0) => Ok(State::Done),
        Some(left) => Ok(State::Length {
            left,
            declared: left,
        }),
    }
}

/// Up to [`QUOTE`] bytes of `bytes`, escaped for the console.
fn quote(bytes: &[u8]) -> String {
    let shown = bytes.get(..QUOTE).unwrap_or(bytes);
    let mut text = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        text.push_str("...");
    }
    text
}

/// The line at the start of `input` (up to its CR or LF), quoted.
fn quote_line(input: &[u8]) -> String {
    let end = input
        .iter()
        .position(|b| matches!(b, b'\r' | b'\n'))
        .unwrap_or(input.len());
    quote(input.get(..end).unwrap_or_default())
}

#[cfg(test)]
mod tests;
