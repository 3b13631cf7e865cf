//! Chat commands: each `/command` one function, reached from one dispatch.

use tracing::{info, info_span};

use super::session::{Batch, Pending, Session};
use chatd_hub::disconnect::Disconnect;
use chatd_hub::hub::{JoinRequest, NickRequest, PrivateError};
use chatd_text::protocol::{self, Command};
use chatd_text::sanitize;

const HELP: &[&str] = &[
    "Commands:",
    "  /nick NAME       change your nick",
    "  /join ROOM       leave this room and join (or create) ROOM",
    "  /rooms           list rooms",
    "  /who             list who is in this room",
    "  /msg NICK TEXT   send a private message",
    "  /me ACTION       send an action: * you ACTION",
    "  /quit [REASON]   leave",
    "  /help            this list",
    "Any other line is sent to everyone in your room. Start it with // to send a leading /.",
];

/// Rooms listed by `/rooms` at most.
const ROOMS_LISTED: usize = 100;

impl Session {
    /// A line starting with `/` (not `//`): a command, in a span of its own.
    pub(super) fn on_command(&mut self, line: &[u8], batch: &mut Batch) -> Option<Disconnect> {
        // Commands change state or answer this client: anything batched so
        // far must reach the room first.
        self.publish(batch);
        let text = String::from_utf8_lossy(line);
        // One span per command (never per chat line), so a trace shows what
        // each client did and how long it took.
        let span = info_span!(
            "command",
            otel.name = command_name(&text),
            command = command_name(&text),
            room = %self.room.name,
        );
        let _entered = span.enter();
        self.command(&text, batch)
    }

    /// Parses a command line and runs the command; `Some` when the client
    /// is to go.
    fn command(&mut self, text: &str, batch: &mut Batch) -> Option<Disconnect> {
        let command = match protocol::parse(text) {
            Ok(c) => c,
            Err(e) => {
                self.error(&e.to_string());
                return None;
            }
        };
        match command {
            Command::Say(text) => self.say(batch, b"<", b"> ", text.as_bytes()),
            Command::Me(action) => self.act(action, batch),
            Command::Help => self.help(),
            Command::Nick(wanted) => self.change_nick(wanted),
            Command::Join(room) => self.join(room),
            Command::Rooms => self.list_rooms(),
            Command::Who => self.who(),
            Command::Msg { to, text } => self.message(to, text),
            Command::Quit(reason) => return Some(quit(reason)),
        }
        None
    }

    /// `/me ACTION`: `* nick ACTION` to the room, at once.
    fn act(&mut self, action: &str, batch: &mut Batch) {
        self.say(batch, b"* ", b" ", action.as_bytes());
        self.publish(batch);
    }

    /// `/help`: the list of commands.
    fn help(&self) {
        for line in HELP {
            self.notice(line);
        }
    }

    /// `/nick NAME`: asks the hub for the nick; in cluster mode the answer
    /// may have to wait for the cluster.
    fn change_nick(&mut self, wanted: &str) {
        // Same spelling: nothing changes, so the room hears nothing.
        if wanted == &*self.nick {
            self.notice(&format!("You are already known as {wanted}."));
            return;
        }
        match self.hub.request_nick(&self.client, wanted) {
            NickRequest::Done(Ok(new)) => self.renamed(new),
            NickRequest::Done(Err(why)) => self.error(&why),
            NickRequest::Wait(answer) => self.wait_for(Pending::Nick {
                nick: wanted.into(),
                answer,
            }),
        }
    }

    /// `/join ROOM`: leaves this room for `room`; in cluster mode, a room
    /// new to this node first waits for its history.
    fn join(&mut self, room: &str) {
        let name = match protocol::normalize_room(room) {
            Ok(name) => name,
            Err(e) => {
                self.error(&e.describe("room", room));
                return;
            }
        };
        match self.hub.request_join(&self.client, &name) {
            JoinRequest::Done(room) => {
                self.room = room;
                info!(room = %self.room.name, "joined");
            }
            JoinRequest::Wait { room, done } => self.wait_for(Pending::Join { room, done }),
        }
    }

    /// `/rooms`: every room and how many are in it.
    fn list_rooms(&self) {
        let rooms = self.hub.all_rooms();
        self.notice(&format!(
            "{}:",
            protocol::count(rooms.len() as u64, "room", "rooms")
        ));
        for r in rooms.iter().take(ROOMS_LISTED) {
            self.notice(&format!("  {} ({})", r.name, protocol::users(r.members)));
        }
    }

    /// `/who`: who is in this room.
    fn who(&self) {
        let who = self.hub.who(&self.room);
        self.notice(&who);
    }

    /// `/msg NICK TEXT`: a private message. A target that is behind pauses
    /// this sender for a moment, as a room's member behind does.
    fn message(&mut self, to: &str, text: &str) {
        match self.hub.private(&self.client, to, text) {
            Ok(Some(congested)) => self.pause_for_private(congested),
            Ok(None) => {}
            Err(PrivateError::Busy(target)) => {
                self.error(&format!(
                    "{} is behind on reading; message not delivered, try again in a moment",
                    target.nick()
                ));
                self.pause_for_private(target);
            }
            Err(PrivateError::Failed(why)) => self.error(&why),
        }
    }
}

/// `/quit [REASON]`: the client goes, with its reason cleaned (none if
/// blank).
fn quit(reason: Option<&str>) -> Disconnect {
    let reason = reason.map(sanitize::clean).filter(|r| !r.trim().is_empty());
    Disconnect::Quit(reason)
}

/// The command word of a `/command` line, for span names: one of a fixed
/// set, so a client cannot create unbounded span names.
fn command_name(line: &str) -> &'static str {
    let word = line.split_whitespace().next().unwrap_or("/");
    match word.to_ascii_lowercase().as_str() {
        "/nick" => "/nick",
        "/join" => "/join",
        "/rooms" => "/rooms",
        "/who" => "/who",
        "/msg" => "/msg",
        "/me" => "/me",
        "/quit" => "/quit",
        "/help" => "/help",
        _ => "/unknown",
    }
}
