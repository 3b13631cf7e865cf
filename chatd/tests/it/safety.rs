//! One user's bytes can never corrupt another's terminal or forge a server
//! line.

use crate::support::*;

#[tokio::test]
async fn control_characters_and_escape_sequences_are_stripped() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice
        .send_raw(
            b"\x1b[2J\x1b[H\x1b]0;owned\x07he\x08llo\x07 \x1b[31mred\x1b[0m \xc2\x9b6n\x00!\n",
        )
        .await;
    assert_eq!(bob.line().await, format!("<{a}> hello red 6n!"));
}

#[tokio::test]
async fn no_line_can_be_forged() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    // A bare CR would return the cursor and overwrite the prefix on screen.
    alice.send("hi\r*** Server: you are banned\n").await;
    assert_eq!(
        bob.line().await,
        format!("<{a}> hi *** Server: you are banned")
    );
    // A CRLF inside the text only ever makes two messages, both prefixed.
    alice.send("x\r\n*** fake notice\n").await;
    assert_eq!(bob.line().await, format!("<{a}> x"));
    assert_eq!(bob.line().await, format!("<{a}> *** fake notice"));
    alice.send("/me \r*** fake\n").await;
    assert_eq!(bob.line().await, format!("* {a} *** fake"));
    // Padding to wrap an 80-column terminal, so that the rest starts a
    // screen line of its own, shrinks to a few spaces, however made.
    let padding = " ".repeat(60) + &"\u{a0}\u{200b}".repeat(20) + "\t\t";
    alice
        .send(&format!("x{padding}*** Server: you are banned\n"))
        .await;
    assert_eq!(
        bob.line().await,
        format!("<{a}> x    *** Server: you are banned")
    );
    alice.send("/nick ***\n").await;
    assert!(alice.expect("error").await.contains("may only contain"));
}

#[tokio::test]
async fn invisible_and_direction_marks_are_stripped() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, b) = server.join().await;
    alice
        .send(
            "ad\u{200b}min\u{200f} \u{202e}says\u{2066} \u{feff}hi\u{2060}\u{ad}\u{61c}\u{180e}!\n",
        )
        .await;
    assert_eq!(bob.line().await, format!("<{a}> admin says hi!"));
    alice.send(&format!("/msg {b} x\u{2028}y\u{2029}z\n")).await;
    assert_eq!(bob.line().await, format!("[pm] <{a}> x y z"));
}

#[tokio::test]
async fn line_breaks_in_operator_text_become_spaces() {
    let server = TestServer::start();
    let (mut alice, _) = server.join().await;
    server
        .chatctl(&["broadcast", "two\nlines\r\nand\ttabs"])
        .await
        .ok();
    assert_eq!(alice.line().await, "*** NOTICE: two lines  and tabs");
}

#[tokio::test]
async fn invalid_utf8_is_replaced_not_fatal() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.send_raw(b"caf\xe9 \xff\xfe ok\n").await;
    assert_eq!(bob.line().await, format!("<{a}> caf\u{fffd} ok"));
    alice.send("still connected\n").await;
    assert_eq!(bob.line().await, format!("<{a}> still connected"));
}

#[tokio::test]
async fn telnet_negotiation_is_ignored() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    // IAC DO ECHO, IAC WILL SGA, IAC SB NAWS … IAC SE, then text.
    alice
        .send_raw(b"\xff\xfd\x01\xff\xfb\x03\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0hi there\r\n")
        .await;
    assert_eq!(bob.line().await, format!("<{a}> hi there"));
}

/// A telnet user, seen as raw bytes: telnet's answers are not lines.
struct Raw(tokio::net::TcpStream, Vec<u8>);

impl Raw {
    async fn connect(server: &TestServer) -> Raw {
        let stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(server.chat))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut raw = Raw(stream, Vec::new());
        raw.until(b"You are now in").await;
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(bytes).await.expect("send");
    }

    /// Reads until `needle` has arrived; returns everything up to and
    /// including it, and keeps the rest for the next call.
    async fn until(&mut self, needle: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(at) = self.1.windows(needle.len()).position(|w| w == needle) {
                return self.1.drain(..at + needle.len()).collect();
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.0.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} in time; got {:?}", self.1))
                .expect("read");
            assert!(n > 0, "EOF before {needle:?}; got {:?}", self.1);
            self.1.extend_from_slice(&buf[..n]);
        }
    }
}

const WILL_TIMING_MARK: &[u8] = b"\xff\xfb\x06";

#[tokio::test]
async fn telnet_ctrl_c_is_answered_and_chat_goes_on() {
    let server = TestServer::start();
    let mut alice = Raw::connect(&server).await;
    let (mut bob, b) = server.join().await;
    alice.until(b" joined ").await;
    // What telnet sends on Ctrl-C after typing half a line; it then shows
    // nothing until its timing mark is answered.
    alice.send(b"half a li\xff\xf4\xff\xfd\x06").await;
    alice.until(WILL_TIMING_MARK).await;
    // The interrupted line is gone; the next one arrives whole.
    alice.send(b"next\r\n").await;
    let said = bob.expect("next").await;
    assert!(
        said.starts_with("<guest-") && said.ends_with("> next"),
        "{said}"
    );
    bob.send("still here\n").await;
    alice
        .until(format!("<{b}> still here\r\n").as_bytes())
        .await;
    // Options chatd does not do are refused once, not echoed back forever.
    alice
        .send(b"\xff\xfd\x01\xff\xfd\x01\xff\xfb\x1f\xff\xfc\x01")
        .await;
    alice.send(b"\xff\xfd\x06").await;
    let answers = alice.until(WILL_TIMING_MARK).await;
    assert_eq!(answers, b"\xff\xfc\x01\xff\xfe\x1f\xff\xfb\x06");
}

#[tokio::test]
async fn a_raw_255_in_text_swallows_nothing() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    // Latin-1 "ÿa": 255 before a byte that is no telnet command.
    alice.send_raw(b"\xffa ok\n").await;
    assert_eq!(bob.line().await, format!("<{a}> \u{fffd}a ok"));
    // Latin-1 "ÿú" reads as IAC SB, which ends after 64 bytes at most.
    let mut line = b"\xff\xfa".to_vec();
    line.extend_from_slice(&[b'y'; 64]);
    line.extend_from_slice(b"tail\nlater\n");
    alice.send_raw(&line).await;
    assert_eq!(bob.line().await, format!("<{a}> tail"));
    assert_eq!(bob.line().await, format!("<{a}> later"));
}
