//! PROXY protocol (v1 text and v2 binary) headers from trusted load
//! balancers: the client's real address.
//!
//! The header is read without reading past it, so what follows (chat
//! lines, or a TLS handshake) stays in the socket for the code that serves
//! it. [`header_len`] finds where a header ends from a prefix; `ppp` parses
//! it. Only connections from `chat.trusted_proxies` are read this way; from
//! anyone else a PROXY line is chat text like any other.
//!
//! A header that names no client (v2 `LOCAL`, as load balancers send for
//! health checks, v1 `UNKNOWN`, or a UNIX-socket source) leaves the
//! connection with the proxy's own address, as the specification asks.

use std::net::SocketAddr;

use ppp::{HeaderResult, v1, v2};
use tokio::net::TcpStream;

/// The longest v1 header, `\r\n` included (from the specification).
pub const MAX_V1: usize = 107;
/// The longest v2 header accepted: the 16 fixed bytes, the addresses and
/// room for the TLVs load balancers add. The format allows 64 KiB; nobody
/// needs that for a chat connection.
pub const MAX_V2: usize = 16 + 2048;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("the PROXY protocol header is longer than {0} bytes")]
    TooLong(usize),
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("the connection closed before the end of the PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// The length of the header that `prefix` starts, `None` when more bytes
/// are needed to tell.
pub fn header_len(prefix: &[u8]) -> Result<Option<usize>, ProxyError> {
    let starts = |sig: &[u8]| {
        let n = prefix.len().min(sig.len());
        prefix[..n] == sig[..n]
    };
    if starts(V2_SIGNATURE) {
        let Some(fixed) = prefix.get(..16) else {
            return Ok(None);
        };
        let total = 16 + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        return if total > MAX_V2 {
            Err(ProxyError::TooLong(MAX_V2))
        } else {
            Ok(Some(total))
        };
    }
    if starts(V1_PREFIX) {
        return match memchr::memchr(b'\n', prefix) {
            Some(end) if end < MAX_V1 => Ok(Some(end + 1)),
            Some(_) => Err(ProxyError::TooLong(MAX_V1)),
            None if prefix.len() >= MAX_V1 => Err(ProxyError::TooLong(MAX_V1)),
            None => Ok(None),
        };
    }
    Err(ProxyError::Missing)
}

/// The client's address from a complete header; `None` when the header
/// names none (health checks, `UNKNOWN`).
pub fn client_addr(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => None,
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (v2::Command::Proxy, _) => None,
        }),
        HeaderResult::V1(Err(e)) => Err(ProxyError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(ProxyError::Invalid(e.to_string())),
    }
}

/// Reads exactly one header from `stream` and returns the client's address
/// (`None`: keep the proxy's). Peeks first, so that not one byte after the
/// header is consumed. The caller bounds the time it may take.
///
/// `header` holds the bytes of the header read so far: cancelling this
/// future (it waits only in `peek`) loses nothing, and a read may go on
/// from them, in this process after a freeze or in the next one after an
/// upgrade.
pub async fn read(
    stream: &mut TcpStream,
    header: &mut Vec<u8>,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = [0u8; MAX_V1 + 1];
    loop {
        if let Some(total) = header_len(header)?
            && header.len() >= total
        {
            return client_addr(&header[..total]);
        }
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        let mut seen = header.clone();
        seen.extend_from_slice(&buf[..n]);
        // Every byte peeked belongs to the header, up to its end if it is
        // in sight: take them without waiting (they are in the socket).
        let take = match header_len(&seen)? {
            Some(total) => total.saturating_sub(header.len()).min(n),
            None => n,
        };
        match stream.try_read(&mut buf[..take]) {
            Ok(0) => return Err(ProxyError::Closed),
            Ok(got) => header.extend_from_slice(&buf[..got]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ProxyError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a freeze does to a header still arriving: the read is dropped
    /// while it waits, and goes on later (after a rollback, or in the next
    /// process) from the bytes it took, consuming nothing after the header.
    #[tokio::test]
    async fn a_read_cut_short_goes_on_from_what_it_took() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let first = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 8080";
        client.write_all(first).await.expect("write");
        let mut header = Vec::new();
        let cut =
            tokio::time::timeout(Duration::from_millis(200), read(&mut server, &mut header)).await;
        assert!(cut.is_err(), "no end of header yet: {cut:?}");
        assert!(first.starts_with(&header), "{header:?}");
        client.write_all(b"\r\nhello\r\n").await.expect("write");
        let got = tokio::time::timeout(Duration::from_secs(5), read(&mut server, &mut header))
            .await
            .expect("in time")
            .expect("a header");
        assert_eq!(got, Some("192.0.2.7:51000".parse().expect("addr")));
        let mut rest = [0u8; 7];
        server.read_exact(&mut rest).await.expect("the rest");
        assert_eq!(&rest, b"hello\r\n");
    }

    #[test]
    fn v1_ends_at_its_newline_and_no_later() {
        let h = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 8080\r\nhello\r\n";
        let len = header_len(h).expect("valid").expect("complete");
        assert_eq!(&h[len..], b"hello\r\n");
        assert_eq!(
            client_addr(&h[..len]).expect("parses"),
            Some("192.0.2.7:51000".parse().expect("addr"))
        );
        assert_eq!(header_len(b"PRO").expect("maybe"), None);
        assert_eq!(header_len(b"PROXY TCP4 1.2").expect("partial"), None);
        assert!(matches!(header_len(b"hello\r\n"), Err(ProxyError::Missing)));
        assert!(matches!(
            header_len(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)),
            Err(ProxyError::TooLong(MAX_V1))
        ));
        assert_eq!(client_addr(b"PROXY UNKNOWN\r\n").expect("parses"), None);
        assert!(matches!(
            client_addr(b"PROXY TCP4 nowhere 127.0.0.1 1 2\r\n"),
            Err(ProxyError::Invalid(_))
        ));
    }

    #[test]
    fn v2_length_comes_from_its_fixed_part() {
        let client: SocketAddr = "[2001:db8::7]:4000".parse().expect("addr");
        let server: SocketAddr = "[::1]:8080".parse().expect("addr");
        let mut h = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, server),
        )
        .build()
        .expect("builds");
        let len = h.len();
        h.extend_from_slice(b"after");
        assert_eq!(header_len(&h[..10]).expect("maybe"), None);
        assert_eq!(header_len(&h).expect("valid"), Some(len));
        assert_eq!(client_addr(&h[..len]).expect("parses"), Some(client));

        let local = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .expect("builds");
        assert_eq!(client_addr(&local).expect("parses"), None);

        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(header_len(&huge), Err(ProxyError::TooLong(_))));
    }
}
