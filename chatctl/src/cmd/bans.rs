//! `ban`, `unban` and `bans`.

use std::time::{Duration, SystemTime};

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::{self, Align, Table, clean};

#[derive(Serialize)]
pub struct BanView {
    pub target: String,
    pub reason: String,
    pub created_at: Option<String>,
    /// `null`: never expires.
    pub expires_at: Option<String>,
    #[serde(skip)]
    expires: Option<SystemTime>,
}

impl From<pb::BanEntry> for BanView {
    fn from(b: pb::BanEntry) -> Self {
        let expires = format::system_time(b.expires_at.as_ref());
        Self {
            target: b.target,
            reason: b.reason,
            created_at: format::system_time(b.created_at.as_ref()).map(format::rfc3339),
            expires_at: expires.map(format::rfc3339),
            expires,
        }
    }
}

impl BanView {
    /// `never`, or how long until it expires.
    pub fn expiry(&self, now: SystemTime) -> String {
        match self.expires {
            Some(at) => format!(
                "in {}",
                format::duration(at.duration_since(now).unwrap_or_default())
            ),
            None => "never".to_owned(),
        }
    }
}

#[derive(Serialize)]
struct Banned {
    ban: BanView,
    kicked: u64,
}

pub async fn ban(
    ctx: &mut Ctx<'_>,
    target: String,
    duration: Option<Duration>,
    reason: Option<String>,
) -> Result<(), ChatctlError> {
    let expiry = match duration {
        Some(span) => Some(pb::ban_request::Expiry::Duration(
            prost_types::Duration::try_from(span)
                .map_err(|_| ChatctlError::Usage(format!("--for {span:?} is too long")))?,
        )),
        None => None,
    };
    let request = ctx.request(pb::BanRequest {
        target,
        expiry,
        reason: reason.unwrap_or_default(),
    });
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.ban(request)).await?;
    super::note_answered(&reply.answered_nodes);
    let banned = Banned {
        ban: reply.ban.unwrap_or_default().into(),
        kicked: reply.kicked,
    };
    if ctx.output == Output::Json {
        return ctx.json(&banned);
    }
    let expiry = match banned.ban.expires {
        Some(_) => format!("expires {}", banned.ban.expiry(SystemTime::now())),
        None => "never expires".to_owned(),
    };
    written(writeln!(
        ctx.out,
        "banned {} ({expiry}); kicked {} connected {}",
        clean(&banned.ban.target),
        banned.kicked,
        if banned.kicked == 1 {
            "client"
        } else {
            "clients"
        },
    ))
}

#[derive(Serialize)]
struct Unbanned {
    unbanned: String,
}

pub async fn unban(ctx: &mut Ctx<'_>, target: String) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::UnbanRequest {
        target: target.clone(),
    });
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.unban(request)).await?;
    super::note_answered(&reply.answered_nodes);
    if ctx.output == Output::Json {
        return ctx.json(&Unbanned { unbanned: target });
    }
    written(writeln!(ctx.out, "unbanned {}", clean(&target)))
}

#[derive(Serialize)]
struct BanList {
    bans: Vec<BanView>,
    /// In cluster mode, the nodes whose bans are listed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    answered_nodes: Vec<String>,
    /// Nodes known to be there that did not answer in time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing_nodes: Vec<String>,
}

pub async fn list(ctx: &mut Ctx<'_>) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::ListBansRequest {});
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.list_bans(request)).await?;
    let bans: Vec<BanView> = reply.bans.into_iter().map(BanView::from).collect();
    super::note_partial(&reply.answered_nodes, &reply.missing_nodes);
    if ctx.output == Output::Json {
        return ctx.json(&BanList {
            bans,
            answered_nodes: reply.answered_nodes,
            missing_nodes: reply.missing_nodes,
        });
    }
    let now = SystemTime::now();
    let mut table = Table::new(&[
        ("TARGET", Align::Left),
        ("EXPIRES", Align::Left),
        ("CREATED", Align::Left),
        ("REASON", Align::Left),
    ]);
    for b in &bans {
        table.row(vec![
            clean(&b.target).into_owned(),
            b.expiry(now),
            b.created_at.clone().unwrap_or_else(|| "-".into()),
            clean(&b.reason).into_owned(),
        ]);
    }
    written(table.write(ctx.out))
}
