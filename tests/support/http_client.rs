//! A small HTTP/1.1 client over `std::net::TcpStream`, for talking to the daemon the way
//! its clients do — and the ways they should not (raw bytes, pipelining, idling).
//! Integration tests cannot use the crate's own dependencies (ureq), only dev-dependencies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// How long any single read may block before the test fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
}

/// One client connection, kept open for keep-alive and pipelining.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read but not yet consumed by a response.
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes a request `METHOD path` with `Host` and the extra header lines given
    /// (each `Name: value`).
    pub fn send_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[&str],
    ) -> std::io::Result<()> {
        self.send(request(method, path, headers).as_bytes())
    }

    /// A chunked body (RFC 9112 §7.1), decoded; trailers are skipped.
    fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let eof = || {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed in a chunked body",
            )
        };
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if self.fill()? == 0 {
                    return Err(eof());
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("chunk size {line:?}: {e}"),
                    )
                })?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    while !self.buf.windows(2).any(|w| w == b"\r\n") {
                        if self.fill()? == 0 {
                            return Err(eof());
                        }
                    }
                    let i = self.buf.windows(2).position(|w| w == b"\r\n").unwrap();
                    self.buf.drain(..i + 2);
                    if i == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(eof());
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads the next response. `head_only` for the answer to a HEAD (no body follows,
    /// whatever Content-Length says).
    pub fn read_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        let (status, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut slots);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (r.code.unwrap_or(0), headers, n);
                }
                Ok(httparse::Status::Partial) => {
                    if self.fill()? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed before a complete response head ({} bytes: {:?})",
                                self.buf.len(),
                                String::from_utf8_lossy(&self.buf)
                            ),
                        ));
                    }
                }
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "bad response head ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ));
                }
            }
        };
        self.buf.drain(..head_len);
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse::<usize>().expect("numeric Content-Length"));
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let body = if head_only {
            Vec::new()
        } else if chunked {
            self.read_chunked()?
        } else if let Some(len) = length {
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed inside the body",
                    ));
                }
            }
            self.buf.drain(..len).collect()
        } else {
            // No length: the body runs to the end of the connection.
            while self.fill()? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[&str],
    ) -> std::io::Result<Response> {
        self.send_request(method, path, headers)?;
        self.read_response(method == "HEAD")
    }

    /// Whether the server closes the connection within `wait` (EOF or reset). Bytes that
    /// arrive instead are kept for the next response.
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).ok();
        let closed = match self.fill() {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
        };
        self.stream.set_read_timeout(Some(READ_TIMEOUT)).ok();
        closed
    }

    /// Bytes buffered but not consumed.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

/// The text of a request with `Host` and the given header lines.
pub fn request(method: &str, path: &str, headers: &[&str]) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// One request on a fresh connection (`Connection: close`).
pub fn fetch(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Response> {
    let mut c = Conn::connect(addr)?;
    c.request(method, path, &["Connection: close"])
}
