//! End-to-end tests: the real `chatd` binary on port 0, spoken to over real
//! sockets the way `nc` would.

mod abuse;
mod abuse_admin;
mod admin;
mod chat;
mod cluster;
mod crash;
mod flow;
mod frontdoor;
mod lifecycle;
mod limits;
mod safety;
mod service;
mod support;
mod telnet;
mod udp;
mod upgrade;
