//! Seats: every accepted chat connection counts against `limits.max_clients`,
//! `limits.max_clients_per_ip` and the descriptors the file limit leaves
//! for clients, from the moment it is accepted, whether it is still in the
//! front door (a PROXY header to read, a TLS handshake) or registered. A
//! connection that has not said a word yet costs a descriptor like any
//! other; counting only registered clients let silent ones pile up to the
//! file limit beside them.
//!
//! The accept loop takes a [`Seat`] before it spends anything else on a
//! connection, and refuses with one line when none is free. The seat
//! becomes the client's when it registers ([`Hub::register`]) and is freed
//! by [`Hub::leave`]; a connection that never registers frees it when the
//! seat is dropped.

use super::*;
use crate::netgroup;

/// One accepted connection's place among those the limits allow.
#[derive(Debug)]
pub struct Seat {
    /// `None` once the registered client holds the seat.
    hub: Option<Hub>,
    /// The per-address group counted, `None` while the address is not
    /// known yet (a trusted proxy's connection before its PROXY header).
    group: Option<IpAddr>,
    /// Descriptors the connection costs: its socket, and a TLS client's
    /// pump pair once it has one.
    files: usize,
}

/// Descriptors a TLS client's pump adds to its socket: a UNIX socket pair.
pub const TLS_PUMP_FILES: usize = 2;

impl State {
    /// The most connections the limits allow now.
    fn capacity(&self, max_clients: usize) -> usize {
        self.fd_capacity
            .map_or(max_clients, |cap| cap.min(max_clients))
    }

    /// Whether `files` more descriptors fit beside those counted.
    fn files_fit(&self, files: usize) -> bool {
        self.fd_capacity
            .is_none_or(|cap| self.files.saturating_add(files) <= cap)
    }

    pub(super) fn occupy(&mut self, group: Option<IpAddr>, files: usize) {
        self.seats += 1;
        self.files += files;
        if let Some(group) = group {
            *self.per_ip.entry(group).or_default() += 1;
        }
    }

    pub(super) fn vacate(&mut self, group: Option<IpAddr>, files: usize) {
        self.seats = self.seats.saturating_sub(1);
        self.files = self.files.saturating_sub(files);
        if let Some(group) = group
            && let Some(n) = self.per_ip.get_mut(&group)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&group);
            }
        }
    }
}

impl Hub {
    /// The group `ip` counts under for every per-address limit
    /// (`limits.ipv6_prefix_len`).
    pub fn address_group(&self, ip: IpAddr) -> IpAddr {
        netgroup::group(ip, self.shared.config.load().limits.ipv6_prefix_len)
    }

    /// A seat for a connection just accepted from `ip` (`None`: a trusted
    /// proxy, whose client's address is still to come), or why not. Counts
    /// a refusal.
    pub fn seat(&self, ip: Option<IpAddr>) -> Result<Seat, Refusal> {
        let config = self.shared.config.load();
        let limits = &config.limits;
        let group = ip.map(|ip| netgroup::group(ip, limits.ipv6_prefix_len));
        let mut state = self.state();
        if state.seats >= limits.max_clients || !state.files_fit(1) {
            let cap = state.capacity(limits.max_clients);
            drop(state);
            return Err(self.refused(Refusal::Full(cap)));
        }
        if let Some(group) = group
            && state.per_ip.get(&group).copied().unwrap_or(0) >= limits.max_clients_per_ip
        {
            drop(state);
            return Err(self.refused(Refusal::PerIp(limits.max_clients_per_ip)));
        }
        state.occupy(group, 1);
        Ok(Seat {
            hub: Some(self.clone()),
            group,
            files: 1,
        })
    }

    /// A seat for a connection the previous process had already admitted
    /// (handed over from its front door): counted, never refused.
    pub fn seat_handed(&self, ip: Option<IpAddr>) -> Seat {
        let group = ip.map(|ip| self.address_group(ip));
        self.state().occupy(group, 1);
        Seat {
            hub: Some(self.clone()),
            group,
            files: 1,
        }
    }

    /// The refusal of a server with no seat left, counted: for a
    /// connection refused before it could take one.
    pub fn full(&self) -> Refusal {
        let max_clients = self.shared.config.load().limits.max_clients;
        let cap = self.state().capacity(max_clients);
        self.refused(Refusal::Full(cap))
    }

    fn refused(&self, refusal: Refusal) -> Refusal {
        self.shared.stats.refused.fetch_add(1, Relaxed);
        refusal
    }
}

impl Seat {
    /// Counts the seat against its client's address, once a trusted
    /// proxy's header named it (or named none: then `ip` is the proxy's
    /// own). Refuses when that address has its share already.
    pub fn settle(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        let Some(hub) = &self.hub else {
            return Ok(());
        };
        if self.group.is_some() {
            return Ok(());
        }
        let group = hub.address_group(ip);
        let max = hub.shared.config.load().limits.max_clients_per_ip;
        let mut state = hub.state();
        if state.per_ip.get(&group).copied().unwrap_or(0) >= max {
            drop(state);
            return Err(hub.refused(Refusal::PerIp(max)));
        }
        *state.per_ip.entry(group).or_default() += 1;
        self.group = Some(group);
        Ok(())
    }

    /// Counts `files` more descriptors for this connection (a TLS client's
    /// pump), or refuses as a full server when the file limit has no room.
    pub fn add_files(&mut self, files: usize) -> Result<(), Refusal> {
        let Some(hub) = &self.hub else {
            return Ok(());
        };
        let max_clients = hub.shared.config.load().limits.max_clients;
        let mut state = hub.state();
        if !state.files_fit(files) {
            let cap = state.capacity(max_clients);
            drop(state);
            return Err(hub.refused(Refusal::Full(cap)));
        }
        state.files += files;
        self.files += files;
        Ok(())
    }

    /// Hands the seat to the client registering under `state`'s lock:
    /// from now on [`Hub::leave`] frees it.
    fn give_to_client(&mut self) -> (IpAddr, usize) {
        self.hub = None;
        (
            self.group
                .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
            self.files,
        )
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.take() {
            hub.state().vacate(self.group, self.files);
        }
    }
}

impl Hub {
    /// Registers a new connection from `peer` (its real address), which
    /// came through TLS or not, in the seat it took at accept; or says why
    /// it is refused. On success the client holds the seat; on a refusal
    /// the seat stays the caller's (freed when dropped, kept to try again
    /// after an upgrade's freeze).
    pub fn register(
        &self,
        seat: &mut Seat,
        peer: SocketAddr,
        tls: bool,
    ) -> Result<Arc<Client>, Refusal> {
        if let Some(ban) = self.shared.bans.check(peer.ip()) {
            return Err(self.refused(Refusal::Banned(ban.reason_text().to_string())));
        }
        seat.settle(peer.ip())?;
        let mut state = self.state();
        // Under the lock the upgrade counts clients with: nobody registers
        // once a freeze began (its state and next id are being taken).
        if self
            .shared
            .upgrading
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Refusal::Upgrading);
        }
        if state.closing {
            return Err(Refusal::ShuttingDown);
        }
        if seat.hub.is_none() {
            // Spent already: a seat registers one client.
            drop(state);
            *seat = self.seat(Some(peer.ip()))?;
            return self.register(seat, peer, tls);
        }
        let (group, files) = seat.give_to_client();
        let client = self.add_client(&mut state, peer, tls, group, files);
        drop(state);
        self.emit(Event::Connect {
            id: client.id,
            nick: client.nick(),
            peer,
        });
        Ok(client)
    }

    /// Takes a seat and registers in it: a plain connection from `peer`.
    pub fn connect(&self, peer: SocketAddr) -> Result<Arc<Client>, Refusal> {
        let mut seat = self.seat(Some(peer.ip()))?;
        self.register(&mut seat, peer, false)
    }
}
