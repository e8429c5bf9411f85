//! A minimal AMQP 0-9-1 publisher over a plain TCP socket, for messages no client library would
//! send: a header table nested as deep as the broker's frame allows (every client serializes
//! tables recursively and would overflow its own stack first). Connects with PLAIN, opens
//! channel 1 in confirm mode, publishes one message whose header table is given already
//! encoded, waits for the broker's ack and closes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 8);
    f.push(kind);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(args.len() + 4);
    p.extend_from_slice(&class.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// Reads frames until a method frame arrives; returns (class, method, arguments).
fn read_method(s: &mut TcpStream) -> std::io::Result<(u16, u16, Vec<u8>)> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head)?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload)?;
        if head[0] == 1 && size >= 4 {
            let class = u16::from_be_bytes([payload[0], payload[1]]);
            let id = u16::from_be_bytes([payload[2], payload[3]]);
            if (class, id) == (10, 50) || (class, id) == (20, 40) {
                let text_len = payload[6] as usize;
                let text = String::from_utf8_lossy(&payload[7..7 + text_len]).into_owned();
                return Err(std::io::Error::other(format!("the broker closed: {text}")));
            }
            return Ok((class, id, payload[4..size].to_vec()));
        }
    }
}

fn expect(s: &mut TcpStream, class: u16, id: u16) -> std::io::Result<Vec<u8>> {
    let (c, m, args) = read_method(s)?;
    if (c, m) != (class, id) {
        return Err(std::io::Error::other(format!(
            "expected method {class}.{id}, got {c}.{m}"
        )));
    }
    Ok(args)
}

/// An encoded header table `{"a": {"a": … {}}}` nested `depth` deep (depth 1 = `{}`), built
/// without recursion: 7 bytes per level around a 4-byte empty table.
pub fn nested_table(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 * depth);
    for level in 1..depth {
        out.extend_from_slice(&((7 * (depth - level)) as u32).to_be_bytes());
        out.extend_from_slice(&[1, b'a', b'F']);
    }
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// The deepest [`nested_table`] whose content header fits a frame of `frame_max` bytes along
/// with a content type of `content_type_len` bytes.
pub fn deepest_for_frame(frame_max: usize, content_type_len: usize) -> usize {
    // Frame: 7 header + 1 end; content header: class, weight, body size, flags = 14;
    // content type: 1 + len; table: 4 + 7 per level beyond the first.
    let room = frame_max - 8 - 14 - (1 + content_type_len) - 4;
    room / 7 + 1
}

/// Connects to `host:port` as `user`/`password` on vhost `/`, publishes `body` with
/// `content_type` and the encoded header table `headers` to `exchange`, and waits for the
/// broker's confirm. Returns the negotiated frame size.
///
/// # Errors
/// The connection failed, the broker refused the message or closed the connection.
#[allow(clippy::too_many_arguments)]
pub fn publish(
    addr: &str,
    user: &str,
    password: &str,
    exchange: &str,
    routing_key: &str,
    content_type: &str,
    headers: &[u8],
    body: &[u8],
) -> std::io::Result<u32> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    expect(&mut s, 10, 10)?; // connection.start
    let mut a = Vec::new();
    a.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty table
    shortstr(&mut a, "PLAIN");
    let response = format!("\0{user}\0{password}");
    a.extend_from_slice(&(response.len() as u32).to_be_bytes());
    a.extend_from_slice(response.as_bytes());
    shortstr(&mut a, "en_US");
    s.write_all(&frame(1, 0, &method(10, 11, &a)))?;
    let tune = expect(&mut s, 10, 30)?;
    let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
    let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
    let mut a = Vec::new();
    a.extend_from_slice(&channel_max.to_be_bytes());
    a.extend_from_slice(&frame_max.to_be_bytes());
    a.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    s.write_all(&frame(1, 0, &method(10, 31, &a)))?;
    let mut a = Vec::new();
    shortstr(&mut a, "/");
    shortstr(&mut a, "");
    a.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &a)))?;
    expect(&mut s, 10, 41)?;
    s.write_all(&frame(1, 1, &method(20, 10, &[0])))?;
    expect(&mut s, 20, 11)?;
    s.write_all(&frame(1, 1, &method(85, 10, &[0])))?;
    expect(&mut s, 85, 11)?;

    let mut a = Vec::new();
    a.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut a, exchange);
    shortstr(&mut a, routing_key);
    a.push(0);
    s.write_all(&frame(1, 1, &method(60, 40, &a)))?;
    let mut h = Vec::with_capacity(headers.len() + 32);
    h.extend_from_slice(&60u16.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&(0x8000u16 | 0x2000).to_be_bytes()); // content-type, headers
    shortstr(&mut h, content_type);
    h.extend_from_slice(headers);
    s.write_all(&frame(2, 1, &h))?;
    let chunk = frame_max as usize - 8;
    for part in body.chunks(chunk.max(1)) {
        s.write_all(&frame(3, 1, part))?;
    }
    let (c, m, _) = read_method(&mut s)?;
    if (c, m) != (60, 80) {
        return Err(std::io::Error::other(format!(
            "the broker did not confirm the message (method {c}.{m})"
        )));
    }
    let mut a = Vec::new();
    a.extend_from_slice(&200u16.to_be_bytes());
    shortstr(&mut a, "");
    a.extend_from_slice(&0u16.to_be_bytes());
    a.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&frame(1, 0, &method(10, 50, &a)))?;
    let _ = expect(&mut s, 10, 51);
    Ok(frame_max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nested_tables_encode_their_lengths() {
        assert_eq!(super::nested_table(1), vec![0, 0, 0, 0]);
        assert_eq!(
            super::nested_table(2),
            vec![0, 0, 0, 7, 1, b'a', b'F', 0, 0, 0, 0]
        );
        assert_eq!(super::nested_table(18_000).len(), 4 + 7 * 17_999);
    }
}
