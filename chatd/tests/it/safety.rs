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
        format!("<{a}> hi*** Server: you are banned")
    );
    // A CRLF inside the text only ever makes two messages, both prefixed.
    alice.send("x\r\n*** fake notice\n").await;
    assert_eq!(bob.line().await, format!("<{a}> x"));
    assert_eq!(bob.line().await, format!("<{a}> *** fake notice"));
    alice.send("/me \r*** fake\n").await;
    assert_eq!(bob.line().await, format!("* {a} *** fake"));
    alice.send("/nick ***\n").await;
    assert!(alice.expect("error").await.contains("may only contain"));
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
