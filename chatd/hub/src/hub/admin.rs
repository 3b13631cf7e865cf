//! The operations the admin API exposes: listing clients and rooms, kick,
//! broadcast, bans and stats; and `/who`.

use super::*;

impl Hub {
    /// `/who`: the nicks in `room` (on every node, in cluster mode), sorted,
    /// at most [`WHO_MAX`] of them.
    pub fn who(&self, room: &Room) -> String {
        let members = read(&room.members);
        let mut total = members.len();
        let mut nicks: Vec<Arc<str>> = members.iter().take(WHO_MAX).map(|m| m.nick()).collect();
        drop(members);
        let max = WHO_MAX.saturating_sub(nicks.len());
        let (remote, count) = self.cluster().remote_nicks(&room.name, max);
        nicks.extend(remote);
        total += count;
        nicks.sort();
        let mut text = format!("{} ({}): {}", room.name, users(total), nicks.join(", "));
        if total > WHO_MAX {
            text.push_str(&format!(", and {} more", total - WHO_MAX));
        }
        text
    }

    /// The rooms of this node (admin), with this node's members.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let rooms: Vec<Arc<Room>> = self.state().rooms.values().cloned().collect();
        let mut infos: Vec<RoomInfo> = rooms.iter().map(|r| r.info()).collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// `/rooms`: the rooms with their members on every node (cluster mode;
    /// on one node, [`Hub::rooms`]).
    pub fn all_rooms(&self) -> Vec<RoomInfo> {
        let mut infos = self.rooms();
        let mut remote = self.cluster().remote_rooms();
        for info in &mut infos {
            info.members += remote.remove(info.name.as_str()).unwrap_or(0);
        }
        infos.extend(remote.into_iter().map(|(name, members)| RoomInfo {
            name: name.to_string(),
            members,
            messages: 0,
        }));
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    pub(super) fn find(&self, target: &Target) -> Option<Arc<Client>> {
        let state = self.state();
        let id = match target {
            Target::Id(id) => *id,
            Target::Nick(n) => *state.nicks.get(&protocol::fold(n))?,
        };
        state.clients.get(&id).cloned()
    }

    /// Every client, optionally only those in `room` and those whose nick or
    /// address contains `filter`; sorted by id.
    pub fn clients(&self, room: Option<&str>, filter: Option<&str>) -> Vec<ClientInfo> {
        let clients: Vec<Arc<Client>> = self.state().clients.values().cloned().collect();
        let filter = filter.map(|f| f.to_ascii_lowercase());
        let mut infos: Vec<ClientInfo> = clients
            .iter()
            .map(|c| c.info())
            .filter(|i| {
                room.is_none_or(|r| i.room == r.trim_start_matches('#').to_ascii_lowercase())
            })
            .filter(|i| {
                filter.as_deref().is_none_or(|f| {
                    i.nick.to_ascii_lowercase().contains(f) || i.peer.to_string().contains(f)
                })
            })
            .collect();
        infos.sort_by_key(|i| i.id);
        infos
    }

    pub fn client(&self, target: &Target) -> Result<ClientInfo, HubError> {
        self.find(target)
            .map(|c| c.info())
            .ok_or_else(|| HubError::NoSuchClient(target.clone()))
    }

    /// Disconnects a client: it reads `*** You were kicked: REASON`, its room
    /// sees it leave with the reason.
    pub fn kick(&self, target: &Target, reason: &str) -> Result<ClientInfo, HubError> {
        let client = self
            .find(target)
            .ok_or_else(|| HubError::NoSuchClient(target.clone()))?;
        let reason = sanitize::clean(reason);
        let reason = if reason.trim().is_empty() {
            "no reason given".to_string()
        } else {
            reason
        };
        let info = client.info();
        if client.outbox.close(Disconnect::Kicked(reason.clone())) {
            self.shared.stats.kicks.fetch_add(1, Relaxed);
            tracing::info!(client = client.id, nick = %info.nick, %reason, "kicked");
            self.emit(Event::Kick {
                id: client.id,
                nick: info.nick.as_str().into(),
                reason,
            });
        }
        Ok(info)
    }

    /// Sends a system notice to everyone, or to one room. Returns how many
    /// clients it reached.
    pub fn broadcast(&self, room: Option<&str>, text: &str) -> Result<usize, HubError> {
        let clean = sanitize::clean(text);
        if clean.trim().is_empty() {
            return Err(HubError::Invalid("the message is empty".into()));
        }
        let limit = self.queue_limit();
        let line = server_line(&format!("NOTICE: {clean}"));
        // A notice larger than a queue would cut every client it reaches.
        if line.len() > limit {
            return Err(HubError::Invalid(format!(
                "the notice is {} bytes; it must fit limits.outbound_queue_bytes ({limit})",
                line.len()
            )));
        }
        let (targets, room_name) = {
            let state = self.state();
            match room {
                None => (state.clients.values().cloned().collect::<Vec<_>>(), None),
                Some(name) => {
                    let name = protocol::normalize_room(name)
                        .map_err(|_| HubError::NoSuchRoom(name.to_string()))?;
                    let room = state
                        .rooms
                        .get(name.as_str())
                        .ok_or_else(|| HubError::NoSuchRoom(name.clone()))?;
                    (read(&room.members).clone(), Some(name))
                }
            }
        };
        let reached = targets
            .iter()
            .filter(|c| c.outbox.push(line.clone(), limit).queued())
            .count();
        self.emit(Event::Broadcast {
            room: room_name,
            text: clean,
            reached,
        });
        Ok(reached)
    }

    /// Bans in force.
    pub fn bans(&self) -> Vec<Ban> {
        self.shared.bans.active()
    }

    /// Bans an address or network: saves it, then disconnects the matching
    /// clients (each reads `*** You are banned: REASON`; its room sees it
    /// leave). Returns the ban and how many clients it disconnected. Blocks
    /// on file I/O.
    pub fn ban(&self, ban: Ban) -> Result<(Ban, usize), BanError> {
        let ban = self.shared.bans.add(ban)?;
        let now = SystemTime::now();
        let matching: Vec<Arc<Client>> = self
            .state()
            .clients
            .values()
            .filter(|c| ban.matches(c.peer.ip(), now))
            .cloned()
            .collect();
        let reason = ban.reason_text().to_string();
        let kicked = matching
            .iter()
            .filter(|c| c.outbox.close(Disconnect::Banned(reason.clone())))
            .count();
        tracing::info!(ban = %ban.target(), %reason, kicked, "banned");
        self.emit(Event::Ban {
            ban: ban.clone(),
            kicked,
        });
        Ok((ban, kicked))
    }

    /// Lifts the ban of `net`. Blocks on file I/O.
    pub fn unban(&self, net: ipnet::IpNet) -> Result<(), BanError> {
        self.shared.bans.remove(net)?;
        let target = crate::bans::format_target(&net);
        tracing::info!(ban = %target, "unbanned");
        self.emit(Event::Unban { target });
        Ok(())
    }

    /// Re-reads the bans file from `state_dir`; returns the bans in force.
    /// Blocks on file I/O.
    pub fn reload_bans(&self, state_dir: &std::path::Path) -> Result<usize, BanError> {
        self.shared.bans.reload(state_dir)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (clients, rooms) = {
            let state = self.state();
            (state.clients.len(), state.rooms.len())
        };
        self.shared
            .stats
            .snapshot(clients, rooms, self.shared.started.elapsed())
    }
}
