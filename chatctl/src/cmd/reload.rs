//! `reload`.

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::clean;

#[derive(Serialize)]
struct Reloaded {
    config_path: String,
    applied: Vec<String>,
    restart_required: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<Certificate>,
}

#[derive(Serialize)]
struct Certificate {
    subject: String,
    not_after: String,
    serial: String,
    changed: bool,
}

pub async fn run(ctx: &mut Ctx<'_>) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::ReloadRequest {});
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.reload(request)).await?;
    let reloaded = Reloaded {
        config_path: reply.config_path,
        applied: reply.applied,
        restart_required: reply.restart_required,
        certificate: reply.certificate.map(|c| Certificate {
            subject: c.subject,
            not_after: c.not_after,
            serial: c.serial,
            changed: c.changed,
        }),
    };
    if ctx.output == Output::Json {
        return ctx.json(&reloaded);
    }
    let list = |keys: &[String]| match keys {
        [] => "none".to_owned(),
        keys => keys
            .iter()
            .map(|k| clean(k).into_owned())
            .collect::<Vec<_>>()
            .join(", "),
    };
    written((|| {
        writeln!(ctx.out, "reloaded {}", clean(&reloaded.config_path))?;
        writeln!(ctx.out, "applied: {}", list(&reloaded.applied))?;
        writeln!(
            ctx.out,
            "need a restart: {}",
            list(&reloaded.restart_required)
        )?;
        if let Some(c) = &reloaded.certificate {
            let what = if c.changed { "renewed" } else { "unchanged" };
            writeln!(
                ctx.out,
                "certificate: {what}: {}, expires {} (serial {})",
                clean(&c.subject),
                clean(&c.not_after),
                clean(&c.serial)
            )?;
        }
        Ok(())
    })())
}
