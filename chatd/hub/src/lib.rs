//! chatd's domain: who is connected, in which room, under which nick, and
//! every delivery between them.
//!
//! - [`outbox`]: one client's bounded outgoing queue; [`disconnect`]: why a
//!   client leaves; [`grid`]: when a room's busy members are written to.
//! - [`hub`]: clients, nicks, rooms, history and every fan-out; the
//!   operations the admin API exposes.
//! - [`cluster_state`]: the seam between this node and the service, in the
//!   hub's own terms: what it asks of the other nodes, with [`SingleNode`]
//!   (cluster_state::SingleNode) for one node alone; and the seams the
//!   cluster and the admin API meet at without knowing each other.
//! - [`stats`]: the counters behind the admin API and the metrics.
//! - [`bans`]: banned addresses and their file; [`files`]: private files
//!   written atomically.
//! - [`netgroup`]: what one address is for the per-address limits.
//! - [`clock`], [`lock`], [`rate_log`]: the time, the poison-tolerant lock
//!   and the rate-limited log every layer above shares.
//!
//! Architecture invariant: this crate knows nothing of NATS, gRPC, TLS or
//! the upgrade.

pub mod bans;
pub mod clock;
pub mod cluster_state;
pub mod disconnect;
pub mod files;
pub mod grid;
pub mod hub;
pub mod lock;
mod netgroup;
pub mod outbox;
pub mod rate_log;
pub mod stats;
