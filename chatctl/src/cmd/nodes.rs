//! `nodes`.

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::{Align, Table, clean};

#[derive(Serialize)]
struct NodeView {
    /// Empty in single-node mode.
    id: String,
    clients: u64,
    uptime_seconds: u64,
    version: String,
}

#[derive(Serialize)]
struct NodeList {
    nodes: Vec<NodeView>,
}

pub async fn list(ctx: &mut Ctx<'_>) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::ListNodesRequest {});
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.list_nodes(request)).await?;
    if !reply.missing_nodes.is_empty() {
        let answered: Vec<String> = reply.nodes.iter().map(|n| n.id.clone()).collect();
        super::note_partial(&answered, &reply.missing_nodes);
    }
    let nodes: Vec<NodeView> = reply
        .nodes
        .into_iter()
        .map(|n| NodeView {
            id: n.id,
            clients: n.clients,
            uptime_seconds: n
                .uptime
                .map_or(0, |d| u64::try_from(d.seconds).unwrap_or(0)),
            version: n.version,
        })
        .collect();
    if ctx.output == Output::Json {
        return ctx.json(&NodeList { nodes });
    }
    let mut table = Table::new(&[
        ("NODE", Align::Left),
        ("CLIENTS", Align::Right),
        ("UPTIME", Align::Right),
        ("VERSION", Align::Left),
    ]);
    for n in &nodes {
        let id = if n.id.is_empty() { "-" } else { &n.id };
        table.row(vec![
            clean(id).into_owned(),
            n.clients.to_string(),
            crate::format::duration(std::time::Duration::from_secs(n.uptime_seconds)),
            clean(&n.version).into_owned(),
        ]);
    }
    written(table.write(ctx.out))
}
