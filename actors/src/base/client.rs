//! The admin client: requests to a running daemon's HTTP listener, for the commands, the
//! benchmarks and the demo.

use crate::base::error::{Error, Result};
use std::time::Duration;

/// A request to a running daemon's listener: the body of a 200 answer, the error message of
/// any other; `None` when nothing listens there.
pub fn request(addr: &str, method: &str, path: &str) -> Option<Result<Vec<u8>>> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Some(Err(Error::Admin(format!("{addr}{path}: {e}"))));
    }
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        return Some(Err(Error::Admin(format!("{addr}{path}: {e}"))));
    }
    let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Some(Err(Error::Admin(format!("bad answer from {addr}"))));
    };
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let body = out[split + 4..].to_vec();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0);
    if code == 200 {
        return Some(Ok(body));
    }
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Some(Err(Error::Admin(format!("{addr}{path}: {code}: {msg}"))))
}

/// A `GET` of a JSON document from a running daemon; `None` when nothing listens there.
pub fn get(addr: &str, path: &str) -> Option<Result<serde_json::Value>> {
    request(addr, "GET", path).map(|r| {
        r.and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| Error::Admin(format!("bad answer from {addr}: {e}")))
        })
    })
}
