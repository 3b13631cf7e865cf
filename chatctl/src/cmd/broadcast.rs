//! `broadcast`.

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::clean;

#[derive(Serialize)]
struct Delivered {
    delivered: u64,
}

pub async fn run(
    ctx: &mut Ctx<'_>,
    text: String,
    room: Option<String>,
) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::BroadcastRequest {
        text,
        room: room.clone().unwrap_or_default(),
    });
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.broadcast(request)).await?;
    super::note_answered(&reply.answered_nodes);
    if ctx.output == Output::Json {
        return ctx.json(&Delivered {
            delivered: reply.delivered,
        });
    }
    let noun = if reply.delivered == 1 {
        "client"
    } else {
        "clients"
    };
    let scope = match room {
        Some(room) => format!(" in {}", clean(&room)),
        None => String::new(),
    };
    written(writeln!(
        ctx.out,
        "delivered to {} {noun}{scope}",
        reply.delivered
    ))
}
