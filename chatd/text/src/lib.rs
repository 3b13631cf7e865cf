//! chatd's text layer: everything between bytes and meaning that needs no
//! socket, no clock of its own and no shared state, so it can be unit-tested
//! and fuzzed alone.
//!
//! - [`framing`]: bytes → lines, with the line-length limit and telnet
//!   filtering.
//! - [`protocol`]: a line → a command; nick and room rules.
//! - [`sanitize`]: cleaning user text for other people's terminals.
//! - [`rate`]: the token bucket behind flood control and per-address limits.
//!
//! Architecture invariant: this crate depends on no other chatd crate and
//! does no I/O.

pub mod framing;
pub mod protocol;
pub mod rate;
pub mod sanitize;
