//! The real `telnet` (Debian's, inetutils), typed into in a pseudo-terminal
//! held by `tmux`, talking to the real daemon while an `nc`-style client in
//! the same room reads what arrives.
//!
//! The tests skip, with one line, where `telnet` or `tmux` is missing; with
//! `REQUIRE_TEST_TOOLS=1` (as `.ci/run` sets) they fail instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::frontdoor::tool;
use crate::support::*;

/// A `telnet HOST PORT` running in a terminal of a `tmux` server of its
/// own (its own socket), so that neither a developer's tmux nor another
/// test sees it. The server is ended on drop.
struct Terminal {
    tmux: PathBuf,
    socket: String,
}

impl Terminal {
    /// Starts `telnet` against `server` in a UTF-8 terminal.
    fn telnet(tmux: &Path, telnet: &Path, server: &TestServer) -> Terminal {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let socket = format!(
            "chatd-it-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let term = Terminal {
            tmux: tmux.to_path_buf(),
            socket,
        };
        let program = format!(
            "{} {} {}",
            telnet.display(),
            server.chat.ip(),
            server.chat.port()
        );
        term.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "40",
            &program,
        ]);
        term
    }

    /// Runs one tmux command on this terminal's server, in a UTF-8 locale
    /// (tmux and telnet read the locale to know what a typed character is).
    fn run(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.tmux);
        cmd.env_remove("TMUX")
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("TERM", "xterm")
            .args(["-u", "-L", &self.socket])
            .args(args);
        let out = output_within(cmd);
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` as it is, each character a key, like a user would.
    fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-l", text]);
    }

    /// Presses one key, by tmux's name for it (`Enter`, `C-c`).
    fn press(&self, key: &str) {
        self.run(&["send-keys", key]);
    }

    /// Waits until the screen shows `needle`. A terminal has nothing to
    /// read with a timeout, so its screen is looked at until then.
    fn wait_for_screen(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.run(&["capture-pane", "-p"]);
            if screen.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the telnet screen shows no {needle:?} within {WAIT:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new(&self.tmux)
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The nick in a `*** NICK joined ROOM (…)` notice.
fn joined_nick(notice: &str) -> String {
    notice
        .strip_prefix("*** ")
        .and_then(|r| r.split_once(" joined "))
        .map(|(nick, _)| nick.to_string())
        .unwrap_or_else(|| panic!("not a join notice: {notice:?}"))
}

/// Starts the daemon, a reader in the lobby and telnet; returns them with
/// telnet's nick once the reader has seen it join.
async fn telnet_in_the_lobby() -> Option<(TestServer, Client, Terminal, String)> {
    let telnet = tool("telnet")?;
    let tmux = tool("tmux")?;
    let server = TestServer::start();
    let (mut reader, _) = server.join().await;
    let term = Terminal::telnet(&tmux, &telnet, &server);
    let nick = joined_nick(&reader.expect(" joined ").await);
    term.wait_for_screen("You are now in lobby");
    Some((server, reader, term, nick))
}

#[tokio::test]
async fn non_latin_text_typed_in_telnet_arrives_intact() {
    let Some((_server, mut reader, term, nick)) = telnet_in_the_lobby().await else {
        return;
    };
    // Each holds bytes telnet sends as commands (0x83 IP, 0x8F AO, 0x9A
    // SUSP, 0x9C BRK): ✓ is e2 9c 93. Telnet itself keeps 0x85 (its echo
    // toggle) and 0x9D (its escape) from the wire; no line here has them.
    let texts = [
        "Привет всем, у нас тест",
        "Καλημέρα σας",
        "中文测试：你好世界",
        "これは日本語のテストです",
        "😀 🙃 🚀 👋 💬 ✓",
        "Привет, Καλημέρα, 我们, テスト ✓ 😀 ok",
    ];
    for text in texts {
        term.type_text(text);
        term.press("Enter");
        assert_eq!(reader.line().await, format!("<{nick}> {text}"));
    }
}

#[tokio::test]
async fn ctrl_c_in_telnet_drops_the_half_typed_line_and_chat_goes_on() {
    let Some((_server, mut reader, term, nick)) = telnet_in_the_lobby().await else {
        return;
    };
    term.type_text("Привет, half a li");
    term.press("C-c");
    term.type_text("тест after Ctrl-C ✓");
    term.press("Enter");
    assert_eq!(
        reader.line().await,
        format!("<{nick}> тест after Ctrl-C ✓"),
        "the interrupted line is gone, the next arrives alone"
    );
    // Telnet shows nothing after Ctrl-C until its timing mark is answered.
    reader.send("still here\n").await;
    term.wait_for_screen("> still here");
}

#[tokio::test]
async fn after_its_first_such_line_telnet_sends_every_byte_as_typed() {
    let Some((_server, mut reader, term, nick)) = telnet_in_the_lobby().await else {
        return;
    };
    term.type_text("✓ ok");
    term.press("Enter");
    assert_eq!(reader.line().await, format!("<{nick}> ✓ ok"));
    // chatd asked telnet for binary before it passed that line on; once
    // telnet shows a later line, it has read the request.
    reader.send("go on\n").await;
    term.wait_for_screen("> go on");
    // х is d1 85 and Н d0 9d: outside binary mode telnet keeps 0x85 (its
    // echo toggle) and 0x9D (its escape to its own prompt) from the wire.
    let texts = [
        "Съешь же ещё этих мягких французских булок, да выпей чаю",
        "Нет, хорошо",
        "Γειά σου κόσμε, Νίκη",
        "全公司的关系很好",
        "日本語：兄弟と先生",
    ];
    for text in texts {
        term.type_text(text);
        term.press("Enter");
        assert_eq!(reader.line().await, format!("<{nick}> {text}"));
    }
}

#[tokio::test]
async fn telnet_switched_to_binary_by_its_user_sends_every_byte_from_the_first_line() {
    let Some((_server, mut reader, term, nick)) = telnet_in_the_lobby().await else {
        return;
    };
    // Ctrl-] opens telnet's own prompt; `toggle outbinary` offers binary.
    term.press("C-]");
    term.wait_for_screen("telnet>");
    term.type_text("toggle outbinary");
    term.press("Enter");
    term.type_text("ok");
    term.press("Enter");
    assert_eq!(reader.line().await, format!("<{nick}> ok"));
    // chatd answered the offer before it passed that line on; once telnet
    // shows a later line, it has read the answer.
    reader.send("go on\n").await;
    term.wait_for_screen("> go on");
    let text = "Нет, хорошо: Γειά σου, 全公司 ✓";
    term.type_text(text);
    term.press("Enter");
    assert_eq!(reader.line().await, format!("<{nick}> {text}"));
}
