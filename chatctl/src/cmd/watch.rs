//! `watch`: follows `WatchEvents` until interrupted or until chatd ends the
//! stream. Table output is one line per event; JSON output is one document
//! per line.

use chatd_proto::admin::v1 as pb;
use pb::event::Kind;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::{self, clean};

#[derive(Debug, Serialize)]
pub struct EventView {
    pub at: Option<String>,
    /// The node where it happened; absent in single-node mode.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(flatten)]
    pub kind: KindView,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KindView {
    Connect {
        client_id: u64,
        nick: String,
        addr: String,
    },
    Disconnect {
        client_id: u64,
        nick: String,
        reason: String,
        detail: String,
    },
    Nick {
        client_id: u64,
        old_nick: String,
        new_nick: String,
    },
    Join {
        client_id: u64,
        nick: String,
        room: String,
    },
    Part {
        client_id: u64,
        nick: String,
        room: String,
    },
    Kick {
        client_id: u64,
        nick: String,
        reason: String,
    },
    Ban {
        target: String,
        reason: String,
        expires_at: Option<String>,
        kicked: u64,
    },
    Unban {
        target: String,
    },
    Broadcast {
        room: String,
        text: String,
        delivered: u64,
    },
    Message {
        client_id: u64,
        nick: String,
        room: String,
        to_nick: String,
        text: String,
        action: bool,
    },
    Lagged {
        missed: u64,
    },
    /// A kind this chatctl does not know yet (a newer chatd).
    Unknown,
}

impl From<pb::Event> for EventView {
    fn from(event: pb::Event) -> Self {
        let at = format::system_time(event.at.as_ref()).map(format::rfc3339);
        let kind = match event.kind {
            Some(Kind::Connected(e)) => KindView::Connect {
                client_id: e.client_id,
                nick: e.nick,
                addr: e.peer_addr,
            },
            Some(Kind::Disconnected(e)) => KindView::Disconnect {
                client_id: e.client_id,
                nick: e.nick,
                reason: disconnect_reason(e.reason),
                detail: e.detail,
            },
            Some(Kind::NickChanged(e)) => KindView::Nick {
                client_id: e.client_id,
                old_nick: e.old_nick,
                new_nick: e.new_nick,
            },
            Some(Kind::Joined(e)) => KindView::Join {
                client_id: e.client_id,
                nick: e.nick,
                room: e.room,
            },
            Some(Kind::Parted(e)) => KindView::Part {
                client_id: e.client_id,
                nick: e.nick,
                room: e.room,
            },
            Some(Kind::Kicked(e)) => KindView::Kick {
                client_id: e.client_id,
                nick: e.nick,
                reason: e.reason,
            },
            Some(Kind::Banned(e)) => {
                let ban = e.ban.unwrap_or_default();
                KindView::Ban {
                    target: ban.target,
                    reason: ban.reason,
                    expires_at: format::system_time(ban.expires_at.as_ref()).map(format::rfc3339),
                    kicked: e.kicked,
                }
            }
            Some(Kind::Unbanned(e)) => KindView::Unban { target: e.target },
            Some(Kind::Broadcast(e)) => KindView::Broadcast {
                room: e.room,
                text: e.text,
                delivered: e.delivered,
            },
            Some(Kind::Message(e)) => KindView::Message {
                client_id: e.client_id,
                nick: e.nick,
                room: e.room,
                to_nick: e.to_nick,
                text: e.text,
                action: e.action,
            },
            Some(Kind::Lagged(e)) => KindView::Lagged { missed: e.missed },
            None => KindView::Unknown,
        };
        Self {
            at,
            node: event.node,
            kind,
        }
    }
}

/// `flood`, `slow_consumer`, …: the enum name without its prefix.
fn disconnect_reason(value: i32) -> String {
    let reason = pb::DisconnectReason::try_from(value).unwrap_or_default();
    reason
        .as_str_name()
        .trim_start_matches("DISCONNECT_REASON_")
        .to_ascii_lowercase()
}

impl EventView {
    /// One line for people, without the trailing newline.
    pub fn line(&self) -> String {
        let at = self.at.as_deref().unwrap_or("-");
        let (label, text) = self
            .kind
            .session()
            .or_else(|| self.kind.room())
            .or_else(|| self.kind.admin())
            .unwrap_or_else(|| self.kind.other());
        if self.node.is_empty() {
            format!("{at}  {label:<10}  {text}")
        } else {
            format!("{at}  {}  {label:<10}  {text}", clean(&self.node))
        }
    }
}

impl KindView {
    /// A client coming, going or renaming itself.
    fn session(&self) -> Option<(&'static str, String)> {
        Some(match self {
            KindView::Connect {
                client_id,
                nick,
                addr,
            } => (
                "connect",
                format!("#{client_id} {} from {}", clean(nick), clean(addr)),
            ),
            KindView::Disconnect {
                client_id,
                nick,
                reason,
                detail,
            } => {
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", clean(detail))
                };
                (
                    "disconnect",
                    format!("#{client_id} {} ({reason}){detail}", clean(nick)),
                )
            }
            KindView::Nick {
                client_id,
                old_nick,
                new_nick,
            } => (
                "nick",
                format!(
                    "#{client_id} {} is now {}",
                    clean(old_nick),
                    clean(new_nick)
                ),
            ),
            _ => return None,
        })
    }

    /// A client joining, leaving or kicked.
    fn room(&self) -> Option<(&'static str, String)> {
        Some(match self {
            KindView::Join {
                client_id,
                nick,
                room,
            } => (
                "join",
                format!("#{client_id} {} joined {}", clean(nick), clean(room)),
            ),
            KindView::Part {
                client_id,
                nick,
                room,
            } => (
                "part",
                format!("#{client_id} {} left {}", clean(nick), clean(room)),
            ),
            KindView::Kick {
                client_id,
                nick,
                reason,
            } => (
                "kick",
                format!("#{client_id} {}: {}", clean(nick), clean(reason)),
            ),
            _ => return None,
        })
    }

    /// What an operator did to everyone: bans and broadcasts.
    fn admin(&self) -> Option<(&'static str, String)> {
        Some(match self {
            KindView::Ban {
                target,
                reason,
                expires_at,
                kicked,
            } => (
                "ban",
                format!(
                    "{} until {} ({kicked} kicked): {}",
                    clean(target),
                    expires_at.as_deref().unwrap_or("forever"),
                    clean(reason)
                ),
            ),
            KindView::Unban { target } => ("unban", clean(target).into_owned()),
            KindView::Broadcast {
                room,
                text,
                delivered,
            } => {
                let scope = if room.is_empty() {
                    "everyone".into()
                } else {
                    clean(room)
                };
                (
                    "broadcast",
                    format!("to {scope} ({delivered} reached): {}", clean(text)),
                )
            }
            _ => return None,
        })
    }

    /// Chat messages, and what the stream itself says.
    fn other(&self) -> (&'static str, String) {
        match self {
            KindView::Message {
                nick,
                room,
                to_nick,
                text,
                action,
                ..
            } => {
                let whom = if to_nick.is_empty() {
                    format!("[{}]", clean(room))
                } else {
                    format!("[pm -> {}]", clean(to_nick))
                };
                let body = if *action {
                    format!("* {} {}", clean(nick), clean(text))
                } else {
                    format!("<{}> {}", clean(nick), clean(text))
                };
                ("message", format!("{whom} {body}"))
            }
            KindView::Lagged { missed } => (
                "lagged",
                format!(
                    "missed {} (watcher too slow)",
                    format::count(*missed, "event", "events")
                ),
            ),
            KindView::Unknown => ("unknown", "an event this chatctl does not know".to_owned()),

            _ => ("unknown", "an event this chatctl does not know".to_owned()),
        }
    }
}

pub async fn run(ctx: &mut Ctx<'_>, include_messages: bool) -> Result<(), ChatctlError> {
    // No deadline on the request: the stream lasts until we hang up.
    let request = tonic::Request::new(pb::WatchEventsRequest { include_messages });
    let mut admin = ctx.admin.clone();
    let mut stream = ctx.call(admin.watch_events(request)).await?;
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let event = match next {
            Ok(Some(event)) => EventView::from(event),
            Ok(None) => return Ok(()),
            Err(status) => return Err(ctx.status(status)),
        };
        match ctx.output {
            Output::Json => {
                serde_json::to_writer(&mut *ctx.out, &event)
                    .map_err(|e| ChatctlError::Output(e.into()))?;
                written(writeln!(ctx.out))?;
            }
            Output::Table => written(writeln!(ctx.out, "{}", event.line()))?,
        }
        written(ctx.out.flush())?;
    }
}
