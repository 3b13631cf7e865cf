//! `upgrade`.

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;

#[derive(Serialize)]
struct Upgraded {
    new_pid: u32,
    duration_ms: u64,
    clients: u64,
    tls_clients_closed: u64,
}

pub async fn run(ctx: &mut Ctx<'_>) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::UpgradeRequest {});
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.upgrade(request)).await?;
    let upgraded = Upgraded {
        new_pid: reply.new_pid,
        duration_ms: reply.duration_ms,
        clients: reply.clients,
        tls_clients_closed: reply.tls_clients_closed,
    };
    if ctx.output == Output::Json {
        return ctx.json(&upgraded);
    }
    written((|| {
        writeln!(
            ctx.out,
            "upgraded in {} ms: pid {} serves {} clients",
            upgraded.duration_ms, upgraded.new_pid, upgraded.clients
        )?;
        if upgraded.tls_clients_closed > 0 {
            writeln!(
                ctx.out,
                "{} TLS clients could not be handed over and were asked to reconnect",
                upgraded.tls_clients_closed
            )?;
        }
        Ok(())
    })())
}
