//! `list-clients`, `client` and `kick`.

use std::time::SystemTime;

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::{ClientRef, Output};
use crate::error::ChatctlError;
use crate::format::{self, Align, Table, clean};

/// A client as chatctl prints it in JSON; times are RFC 3339.
#[derive(Debug, Serialize)]
pub struct ClientView {
    pub id: u64,
    /// The node the client is on; empty in single-node mode.
    pub node: String,
    pub nick: String,
    pub addr: String,
    /// Whether the client came through the TLS chat listener.
    pub tls: bool,
    pub room: String,
    pub connected_at: Option<String>,
    pub last_active_at: Option<String>,
    pub lines_in: u64,
    pub lines_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub queue_bytes: u64,
    #[serde(skip)]
    connected: Option<SystemTime>,
    #[serde(skip)]
    last_active: Option<SystemTime>,
}

impl From<pb::Client> for ClientView {
    fn from(c: pb::Client) -> Self {
        let connected = format::system_time(c.connected_at.as_ref());
        let last_active = format::system_time(c.last_active_at.as_ref());
        Self {
            id: c.id,
            node: c.node,
            nick: c.nick,
            addr: c.peer_addr,
            tls: c.tls,
            room: c.room,
            connected_at: connected.map(format::rfc3339),
            last_active_at: last_active.map(format::rfc3339),
            lines_in: c.lines_in,
            lines_out: c.lines_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            queue_bytes: c.queue_bytes,
            connected,
            last_active,
        }
    }
}

impl From<ClientRef> for pb::ClientSelector {
    fn from(client: ClientRef) -> Self {
        let selector = match client {
            ClientRef::Id(id) | ClientRef::NodeId(_, id) => pb::client_selector::Selector::Id(id),
            ClientRef::Nick(nick) => pb::client_selector::Selector::Nick(nick),
        };
        Self {
            selector: Some(selector),
        }
    }
}

#[derive(Serialize)]
struct ClientList {
    clients: Vec<ClientView>,
    /// In cluster mode, the nodes whose clients are listed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    answered_nodes: Vec<String>,
    /// Nodes known to be there that did not answer in time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing_nodes: Vec<String>,
}

pub async fn list(
    ctx: &mut Ctx<'_>,
    room: Option<String>,
    filter: Option<String>,
) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::ListClientsRequest {
        room: room.unwrap_or_default(),
        filter: filter.unwrap_or_default(),
    });
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.list_clients(request)).await?;
    let clients: Vec<ClientView> = reply.clients.into_iter().map(ClientView::from).collect();
    super::note_partial(&reply.answered_nodes, &reply.missing_nodes);
    if ctx.output == Output::Json {
        return ctx.json(&ClientList {
            clients,
            answered_nodes: reply.answered_nodes,
            missing_nodes: reply.missing_nodes,
        });
    }
    let now = SystemTime::now();
    // The NODE column only in cluster mode, where ids are per node.
    let with_node = clients.iter().any(|c| !c.node.is_empty());
    let mut columns = Vec::new();
    if with_node {
        columns.push(("NODE", Align::Left));
    }
    columns.extend_from_slice(&[
        ("ID", Align::Right),
        ("NICK", Align::Left),
        ("ADDRESS", Align::Left),
        ("TLS", Align::Left),
        ("ROOM", Align::Left),
        ("CONNECTED", Align::Right),
        ("IDLE", Align::Right),
        ("LINES IN", Align::Right),
        ("LINES OUT", Align::Right),
        ("BYTES IN", Align::Right),
        ("BYTES OUT", Align::Right),
        ("QUEUE", Align::Right),
    ]);
    let mut table = Table::new(&columns);
    for c in &clients {
        let mut row = Vec::new();
        if with_node {
            row.push(clean(&c.node).into_owned());
        }
        row.extend([
            c.id.to_string(),
            clean(&c.nick).into_owned(),
            clean(&c.addr).into_owned(),
            yes_no(c.tls),
            clean(&c.room).into_owned(),
            format::ago(c.connected, now),
            format::ago(c.last_active, now),
            c.lines_in.to_string(),
            c.lines_out.to_string(),
            format::bytes(c.bytes_in),
            format::bytes(c.bytes_out),
            format::bytes(c.queue_bytes),
        ]);
        table.row(row);
    }
    written(table.write(ctx.out))
}

pub async fn get(ctx: &mut Ctx<'_>, client: ClientRef) -> Result<(), ChatctlError> {
    let node = match &client {
        ClientRef::NodeId(node, _) => node.clone(),
        _ => String::new(),
    };
    let request = ctx.request(pb::GetClientRequest {
        client: Some(client.into()),
        node,
    });
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.get_client(request)).await?;
    let client = ClientView::from(reply.client.unwrap_or_default());
    if ctx.output == Output::Json {
        return ctx.json(&client);
    }
    written(write_client(ctx.out, &client))
}

#[derive(Serialize)]
struct Kicked {
    kicked: ClientView,
}

pub async fn kick(
    ctx: &mut Ctx<'_>,
    client: ClientRef,
    reason: Option<String>,
) -> Result<(), ChatctlError> {
    let node = match &client {
        ClientRef::NodeId(node, _) => node.clone(),
        _ => String::new(),
    };
    let request = ctx.request(pb::KickClientRequest {
        client: Some(client.into()),
        reason: reason.unwrap_or_default(),
        node,
    });
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.kick_client(request)).await?;
    let kicked = ClientView::from(reply.client.unwrap_or_default());
    if ctx.output == Output::Json {
        return ctx.json(&Kicked { kicked });
    }
    let node = if kicked.node.is_empty() {
        String::new()
    } else {
        format!(" on node {}", clean(&kicked.node))
    };
    written(writeln!(
        ctx.out,
        "kicked {} (id {}, {}){node}",
        clean(&kicked.nick),
        kicked.id,
        clean(&kicked.addr)
    ))
}

fn write_client(out: &mut dyn std::io::Write, c: &ClientView) -> std::io::Result<()> {
    let now = SystemTime::now();
    let when = |at: &Option<String>, time: Option<SystemTime>| match at {
        Some(at) => format!("{at} ({} ago)", format::ago(time, now)),
        None => "-".to_owned(),
    };
    let mut fields = Vec::new();
    // The node only in cluster mode, where ids are per node.
    if !c.node.is_empty() {
        fields.push(("node", clean(&c.node).into_owned()));
    }
    fields.extend([
        ("id", c.id.to_string()),
        ("nick", clean(&c.nick).into_owned()),
        ("address", clean(&c.addr).into_owned()),
        ("tls", yes_no(c.tls)),
        ("room", clean(&c.room).into_owned()),
        ("connected", when(&c.connected_at, c.connected)),
        ("last active", when(&c.last_active_at, c.last_active)),
        ("lines", format::in_out(c.lines_in, c.lines_out)),
        (
            "bytes",
            format::in_out(format::bytes(c.bytes_in), format::bytes(c.bytes_out)),
        ),
        ("queue", format::bytes(c.queue_bytes)),
    ]);
    format::write_fields(out, &fields)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}
