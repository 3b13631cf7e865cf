//! chatd, the daemon: the front door, each client's connection, the
//! upgrade, running under systemd and being watched, and the wiring of the
//! layers below it.
//!
//! # Layers (crates, lowest first)
//!
//! - `chatd-text`: framing, telnet, commands, cleaning user text, rates.
//!   Pure.
//! - `chatd-config`: raw layers → one validated `Config`.
//! - `chatd-hub`: clients, rooms, nicks, history, fan-out, bans, and the
//!   seams to the cluster (`cluster_state`) in the hub's own terms.
//! - `chatd-cluster` (NATS) and `chatd-admin` (gRPC), beside each other:
//!   neither depends on the other.
//! - this crate, which gives each of them what it needs at start.
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
//! - [`clients`]: the client thread that serves every chat connection.
//! - [`udp_echo`]: the UDP echo port.
//! - [`reload`]: re-reading the config at run time (admin `Reload`, SIGHUP);
//!   [`control`]: reload and upgrade as the admin API asks for them.
//! - [`telemetry`] (with [`log_fields`]), [`stall`], [`sockopt`]: what they
//!   say.
//! - [`notify`], [`journal`], [`metrics`]: running under systemd and being
//!   watched (sd_notify, the journal, Prometheus).
//! - [`handoff`]: seamless upgrade, handing every socket and client state to
//!   a new process.
//!
//! See `ARCHITECTURE.md` at the repository root for the path of a message.

pub mod activation;
mod clients;
mod connection;
mod control;
mod front;
pub mod handoff;
mod journal;
mod listen;
mod log_fields;
pub mod metrics;
pub mod notify;
mod proxy;
pub mod reload;
pub mod server;
mod sockopt;
mod stall;
pub mod telemetry;
mod tls;
mod udp_echo;

pub use listen::Listeners;
pub use server::{Daemon, bind};
