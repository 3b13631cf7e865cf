//! chatd: a line-based chat daemon for `nc` and `telnet` users.
//!
//! # Layout
//!
//! - [`server`]: binds sockets, runs the accept loop and the shutdown;
//!   [`listen`]: the bound listeners and opening a TCP listener, shared
//!   with admin, metrics and the upgrade handoff;
//!   [`activation`]: the sockets systemd passes instead.
//! - [`front`]: between accept and chat: the real address ([`proxy`], PROXY
//!   protocol from trusted load balancers) and TLS ([`tls`]).
//! - [`connection`]: one client's task, the only owner of its socket.
//! - [`framing`]: bytes → lines, with the line-length limit and telnet
//!   filtering.
//! - [`protocol`]: a line → a command; nick and room rules.
//! - [`sanitize`]: cleaning user text for other people's terminals.
//! - [`hub`]: clients, rooms and every fan-out; the operations the admin API
//!   exposes.
//! - [`outbox`]: one client's bounded outgoing queue; [`disconnect`]: why a
//!   client leaves; [`grid`]: when a room's busy members are written to.
//! - [`cluster_state`]: the seam between this node and the service: the
//!   state all nodes share (nicks, members elsewhere, history, admin
//!   across nodes), one interface with two implementations: in process
//!   (one node) and NATS.
//! - [`cluster`]: cluster mode, the NATS implementation; the NATS
//!   connection and rooms that span nodes (the only code that talks to
//!   NATS); [`nats_options`]: its credentials and TLS; [`cluster_seq`]:
//!   stream positions, so a failover loses no line.
//! - [`udp_echo`]: the UDP echo port.
//! - [`admin`]: the gRPC admin API (tokens, service, health, reflection).
//! - [`bans`]: banned addresses and their file; [`files`]: private files
//!   written atomically.
//! - [`reload`]: re-reading the config at run time (admin `Reload`, SIGHUP).
//! - [`netgroup`]: what one address is for the per-address limits.
//! - [`config`], [`telemetry`] (with [`log_fields`]), [`stats`], [`rate`],
//!   [`clock`]: what they say.
//! - [`notify`], [`journal`], [`metrics`]: running under systemd and being
//!   watched (sd_notify, the journal, Prometheus).
//! - [`handoff`]: seamless upgrade, handing every socket and client state to
//!   a new process.
//!
//! See `ARCHITECTURE.md` at the repository root for the path of a message.

pub mod activation;
pub mod clients;
pub mod connection;
pub mod control;
pub mod front;
pub mod handoff;
pub mod journal;
pub mod listen;
pub mod log_fields;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod sockopt;
pub mod stall;
pub mod telemetry;
pub mod tls;
pub mod udp_echo;

pub use chatd_admin as admin;
pub use chatd_cluster as cluster;
pub use chatd_cluster::{nats_options, seq as cluster_seq};
pub use chatd_config as config;
pub use chatd_hub::{
    bans, clock, cluster_state, disconnect, files, grid, hub, lock, netgroup, outbox, rate_log,
    stats,
};
pub use chatd_text::{framing, protocol, rate, sanitize};

pub use config::Config;
pub use listen::Listeners;
pub use server::{Daemon, bind};
