//! A connected client: its identity (id and nick), room, counters and
//! deadlines; and the nick changes the hub decides.

use super::*;

pub use crate::cluster_state::ClientId;

/// A connected client as the rest of the daemon sees it. Its connection task
/// owns the socket; everyone else reaches it through its [`Outbox`].
#[derive(Debug)]
pub struct Client {
    pub id: ClientId,
    pub peer: SocketAddr,
    /// Whether the client came through the TLS listener.
    pub tls: bool,
    pub connected_at: SystemTime,
    pub outbox: Outbox,
    pub(super) names: Mutex<Names>,
    pub lines_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// When the client last sent a complete line ([`clock::now_ms`]): bytes
    /// that never make a line do not keep a connection alive.
    pub(super) last_line_ms: AtomicU64,
    /// Since when the client has been in the middle of a line
    /// ([`clock::now_ms`]), 0 when it is not: a partial line has its own
    /// deadline, so a byte a minute cannot hold a connection forever.
    pub(super) partial_since_ms: AtomicU64,
    /// Set when the hub renamed the client behind its connection's back
    /// (cluster mode: its nick was held by another node); the connection
    /// then re-reads its nick.
    pub(super) renamed: AtomicBool,
    /// The per-address group its seat counts under, as counted when it
    /// arrived (a reload that changes `limits.ipv6_prefix_len` frees it
    /// from the same group).
    pub(super) group: IpAddr,
    /// Descriptors its seat counts.
    pub(super) files: usize,
}

#[derive(Debug)]
pub(super) struct Names {
    pub(super) nick: Arc<str>,
    pub(super) room: Option<Arc<Room>>,
}

impl Client {
    pub fn nick(&self) -> Arc<str> {
        lock(&self.names).nick.clone()
    }

    pub fn room(&self) -> Option<Arc<Room>> {
        lock(&self.names).room.clone()
    }

    /// Whether the hub renamed this client since the last call; the
    /// connection then re-reads [`Client::nick`].
    pub fn take_renamed(&self) -> bool {
        self.renamed.load(Relaxed) && self.renamed.swap(false, Relaxed)
    }

    /// Records input: called once per read, not per line. Only complete
    /// lines count as activity.
    pub fn record_input(&self, lines: u64, bytes: u64) {
        self.lines_in.fetch_add(lines, Relaxed);
        self.bytes_in.fetch_add(bytes, Relaxed);
        if lines > 0 {
            self.last_line_ms.store(clock::now_ms(), Relaxed);
        }
    }

    /// Records whether the client is in the middle of a line, since now;
    /// called when that changes, or when a line began after others ended.
    pub fn set_mid_line(&self, mid_line: bool) {
        let since = if mid_line { clock::now_ms() } else { 0 };
        self.partial_since_ms.store(since, Relaxed);
    }

    /// Queues a server line for this client alone.
    pub fn notice(&self, text: &str, limit: usize) -> Push {
        self.outbox.push(server_line(text), limit)
    }

    pub fn info(&self) -> ClientInfo {
        let names = lock(&self.names);
        let (lines_out, bytes_out) = self.outbox.totals();
        ClientInfo {
            id: self.id,
            nick: names.nick.to_string(),
            peer: self.peer,
            tls: self.tls,
            room: names
                .room
                .as_ref()
                .map(|r| r.name.to_string())
                .unwrap_or_default(),
            connected_at_ms: unix_ms(self.connected_at),
            last_active_ms: clock::to_unix_ms(self.last_line_ms.load(Relaxed)),
            lines_in: self.lines_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            lines_out,
            bytes_out,
            queued_bytes: self.outbox.owed() as u64,
        }
    }
}

/// A snapshot of one client, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub id: ClientId,
    pub nick: String,
    pub peer: SocketAddr,
    pub tls: bool,
    pub room: String,
    pub connected_at_ms: u64,
    pub last_active_ms: u64,
    pub lines_in: u64,
    pub bytes_in: u64,
    pub lines_out: u64,
    pub bytes_out: u64,
    pub queued_bytes: u64,
}

/// How a nick change goes on: decided, or waiting for the cluster.
#[derive(Debug)]
pub enum NickRequest {
    /// The new nick, or why not (the text follows `*** error: `).
    Done(Result<Arc<str>, String>),
    /// The cluster decides; then call [`Hub::rename`] if granted.
    Wait(tokio::sync::oneshot::Receiver<Claim>),
}

impl Hub {
    /// Starts a nick change: once the nick passes this node's checks, the
    /// cluster state is asked. On one node it grants it at once and the
    /// nick changes (as by [`Hub::rename`]); in cluster mode the caller
    /// waits for the answer, then calls [`Hub::rename`] (or
    /// [`Hub::release_nick`] when it no longer wants it).
    pub fn request_nick(&self, client: &Arc<Client>, wanted: &str) -> NickRequest {
        if let Err(why) = self.check_nick(client, wanted) {
            return NickRequest::Done(Err(why));
        }
        match self.cluster().claim_nick(wanted, client.id) {
            Reply::Now(claim) => NickRequest::Done(self.nick_claimed(client, wanted, claim)),
            Reply::Later(answer) => NickRequest::Wait(answer),
        }
    }

    /// Ends a nick change with the cluster state's answer: the new nick
    /// (freeing the claim again if the nick was taken on this node in the
    /// meantime), or why not (the text follows `*** error: `).
    pub fn nick_claimed(
        &self,
        client: &Arc<Client>,
        wanted: &str,
        claim: Claim,
    ) -> Result<Arc<str>, String> {
        match claim {
            Claim::Granted => {
                let renamed = self.rename(client, wanted);
                if renamed.is_err() {
                    self.release_nick(client, wanted);
                }
                renamed
            }
            Claim::Taken => Err(format!("nick \"{wanted}\" is taken")),
            Claim::Unavailable(why) => Err(why),
        }
    }

    /// Whether `client` may take `wanted` as far as this node knows.
    pub(super) fn check_nick(&self, client: &Client, wanted: &str) -> Result<(), String> {
        protocol::validate_nick(wanted).map_err(|e| e.describe("nick", wanted))?;
        let taken = self
            .state()
            .nicks
            .get(&protocol::fold(wanted))
            .is_some_and(|&owner| owner != client.id);
        if taken {
            return Err(format!("nick \"{wanted}\" is taken"));
        }
        Ok(())
    }

    /// Frees `client`'s cluster-wide claim on `nick`, if any (cluster mode;
    /// guest nicks are never claimed). Never waits.
    pub fn release_nick(&self, client: &Client, nick: &str) {
        if !nick.starts_with(protocol::GUEST_PREFIX) {
            self.cluster().release_nick(nick, client.id);
        }
    }

    /// Cluster mode: another node holds the nick folded to `key`, which
    /// this node's client `id` had taken while NATS was away. The client
    /// goes back to its guest nick and is told why; its room hears the
    /// change as any other.
    pub fn nick_lost(&self, id: ClientId, key: &str) {
        let mut state = self.state();
        let Some(client) = state.clients.get(&id).cloned() else {
            return;
        };
        let old = client.nick();
        if protocol::fold(&old) != key {
            return;
        }
        let mut guest = self.cluster().guest_nick(id);
        while state.nicks.contains_key(&protocol::fold(&guest)) {
            guest.push('_');
        }
        state.nicks.remove(key);
        state.nicks.insert(protocol::fold(&guest), id);
        let new: Arc<str> = guest.into();
        let room = {
            let mut names = lock(&client.names);
            names.nick = new.clone();
            names.room.clone()
        };
        client.renamed.store(true, Relaxed);
        if let Some(room) = &room {
            self.cluster().member_set(id, &new, &room.name);
        }
        drop(state);
        client.notice(
            &format!(
                "Your nick {old} was taken on another chat node while this one was cut off; you are now {new}."
            ),
            self.queue_limit(),
        );
        if let Some(room) = room {
            let text = format!("{old} is now known as {new}");
            self.room_notice(&room, client.id, NoticeKind::Rename, &text);
        }
        self.emit(Event::Nick { id, old, new });
    }

    /// Changes a nick, or says why not (the text follows `*** error: `).
    pub fn rename(&self, client: &Arc<Client>, wanted: &str) -> Result<Arc<str>, String> {
        protocol::validate_nick(wanted).map_err(|e| e.describe("nick", wanted))?;
        let folded = protocol::fold(wanted);
        let mut state = self.state();
        let old = client.nick();
        if state
            .nicks
            .get(&folded)
            .is_some_and(|&owner| owner != client.id)
        {
            return Err(format!("nick \"{wanted}\" is taken"));
        }
        state.nicks.remove(&protocol::fold(&old));
        if protocol::fold(&old) != folded {
            self.release_nick(client, &old);
        }
        state.nicks.insert(folded, client.id);
        let new: Arc<str> = wanted.into();
        let room = {
            let mut names = lock(&client.names);
            names.nick = new.clone();
            names.room.clone()
        };
        if let Some(room) = &room {
            self.cluster().member_set(client.id, &new, &room.name);
        }
        drop(state);
        if let Some(room) = room {
            let text = format!("{old} is now known as {new}");
            self.room_notice(&room, client.id, NoticeKind::Rename, &text);
        }
        self.emit(Event::Nick {
            id: client.id,
            old,
            new: new.clone(),
        });
        Ok(new)
    }
}
