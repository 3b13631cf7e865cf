//! `[chat]`: the chat listeners and what a room keeps.

use std::net::SocketAddr;
use std::time::Duration;

use super::error::{ConfigError, invalid, range};
use super::listen::{TlsFiles, addrs, nets, tls_files};
use super::raw::RawChat;
use chatd_text::protocol;

#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// At least one address.
    pub listen: Vec<SocketAddr>,
    /// The TLS listeners; empty: none.
    pub tls_listen: Vec<SocketAddr>,
    /// Required when `tls_listen` is set; re-read on every reload.
    pub tls: Option<TlsFiles>,
    /// Peers whose connections must begin with a PROXY protocol header.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub default_room: String,
    pub history: usize,
    pub backlog: u32,
    /// Shortest time between two writes to one client while lines keep
    /// coming; zero writes every line as soon as it is queued.
    pub write_coalesce: Duration,
}

pub(super) fn validate_chat(c: &RawChat) -> Result<ChatConfig, ConfigError> {
    let default_room = protocol::normalize_room(&c.default_room).map_err(|why| {
        invalid(
            "chat.default_room",
            format!("{:?}", c.default_room),
            why.to_string(),
        )
    })?;
    let listen = addrs("chat.listen", &c.listen)?;
    if listen.is_empty() {
        return Err(invalid(
            "chat.listen",
            "[]",
            "at least one IP:PORT, e.g. \"0.0.0.0:8080\" or [\"0.0.0.0:8080\", \"[::]:8080\"]",
        ));
    }
    let tls_listen = addrs("chat.tls_listen", &c.tls_listen)?;
    let tls = tls_files(("chat.tls_cert", &c.tls_cert), ("chat.tls_key", &c.tls_key))?;
    if !tls_listen.is_empty() && tls.is_none() {
        return Err(invalid(
            "chat.tls_cert",
            "\"\"",
            "a PEM certificate file (and chat.tls_key), required when chat.tls_listen is set",
        ));
    }
    let chat = ChatConfig {
        listen,
        tls_listen,
        tls,
        trusted_proxies: nets("chat.trusted_proxies", &c.trusted_proxies)?,
        default_room,
        history: range("chat.history", c.history, 0, 1000, " lines")? as usize,
        backlog: range("chat.backlog", c.backlog, 1, 65535, "")? as u32,
        write_coalesce: Duration::from_millis(range(
            "chat.write_coalesce_ms",
            c.write_coalesce_ms,
            0,
            100,
            " milliseconds, 0 turns it off",
        )? as u64),
    };
    Ok(chat)
}
