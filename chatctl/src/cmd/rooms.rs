//! `rooms`.

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::{Align, Table, clean};

#[derive(Serialize)]
struct RoomView {
    name: String,
    members: u64,
    messages: u64,
}

#[derive(Serialize)]
struct RoomList {
    rooms: Vec<RoomView>,
}

pub async fn list(ctx: &mut Ctx<'_>) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::ListRoomsRequest {});
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.list_rooms(request)).await?;
    super::note_partial(&reply.answered_nodes, &reply.missing_nodes);
    let rooms: Vec<RoomView> = reply
        .rooms
        .into_iter()
        .map(|r| RoomView {
            name: r.name,
            members: r.members,
            messages: r.messages,
        })
        .collect();
    if ctx.output == Output::Json {
        return ctx.json(&RoomList { rooms });
    }
    let mut table = Table::new(&[
        ("ROOM", Align::Left),
        ("MEMBERS", Align::Right),
        ("MESSAGES", Align::Right),
    ]);
    for r in &rooms {
        table.row(vec![
            clean(&r.name).into_owned(),
            r.members.to_string(),
            r.messages.to_string(),
        ]);
    }
    written(table.write(ctx.out))
}
