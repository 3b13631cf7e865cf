//! The `chatd.admin.v1.Admin` service: each method is a thin translation of
//! a hub operation. Authorisation happened before (see `auth`); mutating
//! methods log the caller's token name and what they did.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use chatd_proto::admin::v1 as pb;
use futures_util::Stream;
use pb::admin_server::Admin;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use super::auth::Caller;
use super::convert;
use super::error::AdminError;
use crate::bans::{self, Ban};
use crate::hub::{Hub, Target};
use crate::reload::Reloader;

pub struct AdminService {
    hub: Hub,
    reloader: Reloader,
    /// Cancelled when shutdown begins: open watch streams end then.
    shutdown: CancellationToken,
}

impl AdminService {
    pub fn new(hub: Hub, reloader: Reloader, shutdown: CancellationToken) -> AdminService {
        AdminService {
            hub,
            reloader,
            shutdown,
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// The token name of an authorised request, for the audit log.
fn who<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "-".to_string(), |c| c.name.to_string())
}

fn target(selector: Option<pb::ClientSelector>) -> Result<Target, AdminError> {
    match selector.and_then(|s| s.selector) {
        Some(pb::client_selector::Selector::Id(id)) => Ok(Target::Id(id)),
        Some(pb::client_selector::Selector::Nick(nick)) if !nick.is_empty() => {
            Ok(Target::Nick(nick))
        }
        _ => Err(AdminError::BadRequest(
            "no client given: set `client.id` or `client.nick`".into(),
        )),
    }
}

/// Refuses admin text longer than `max` bytes, naming the limit.
fn at_most(what: &str, text: &str, max: usize) -> Result<(), AdminError> {
    if text.len() > max {
        return Err(AdminError::BadRequest(format!(
            "the {what} is {} bytes; the limit is {max} bytes",
            text.len()
        )));
    }
    Ok(())
}

/// Admin-supplied text as the audit log shows it: cleaned like chat text,
/// so line breaks and terminal escapes cannot forge or hide log lines.
fn logged(text: &str) -> String {
    crate::sanitize::clean(text)
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// Runs blocking work (file I/O) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AdminError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?
}

fn expiry(
    expiry: Option<pb::ban_request::Expiry>,
    now: SystemTime,
) -> Result<Option<SystemTime>, AdminError> {
    let bad = |what: &str| AdminError::BadRequest(format!("invalid ban expiry: {what}"));
    match expiry {
        None => Ok(None),
        Some(pb::ban_request::Expiry::Duration(d)) => {
            let d = Duration::try_from(d).map_err(|_| bad("the duration must be positive"))?;
            if d.is_zero() {
                return Err(bad("the duration must be positive"));
            }
            now.checked_add(d)
                .map(Some)
                .ok_or_else(|| bad("the duration is too long"))
        }
        Some(pb::ban_request::Expiry::Until(t)) => SystemTime::try_from(t)
            .map(Some)
            .map_err(|_| bad("the time is out of range")),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_clients(
        &self,
        request: Request<pb::ListClientsRequest>,
    ) -> Reply<pb::ListClientsResponse> {
        let r = request.into_inner();
        let clients = self
            .hub
            .clients(non_empty(&r.room), non_empty(&r.filter))
            .into_iter()
            .map(convert::client)
            .collect();
        Ok(Response::new(pb::ListClientsResponse { clients }))
    }

    async fn get_client(
        &self,
        request: Request<pb::GetClientRequest>,
    ) -> Reply<pb::GetClientResponse> {
        let target = target(request.into_inner().client)?;
        let client = self.hub.client(&target).map_err(AdminError::from)?;
        Ok(Response::new(pb::GetClientResponse {
            client: Some(convert::client(client)),
        }))
    }

    async fn kick_client(
        &self,
        request: Request<pb::KickClientRequest>,
    ) -> Reply<pb::KickClientResponse> {
        let by = who(&request);
        let r = request.into_inner();
        let target = target(r.client)?;
        at_most("reason", &r.reason, super::MAX_REASON_BYTES)?;
        let client = self
            .hub
            .kick(&target, &r.reason)
            .map_err(AdminError::from)?;
        info!(by, client = client.id, nick = %client.nick, reason = %logged(&r.reason), "admin: kick");
        Ok(Response::new(pb::KickClientResponse {
            client: Some(convert::client(client)),
        }))
    }

    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Reply<pb::BroadcastResponse> {
        let by = who(&request);
        let r = request.into_inner();
        at_most("broadcast text", &r.text, super::MAX_BROADCAST_BYTES)?;
        let delivered = self
            .hub
            .broadcast(non_empty(&r.room), &r.text)
            .map_err(AdminError::from)?;
        info!(by, room = %logged(&r.room), text = %logged(&r.text), delivered, "admin: broadcast");
        Ok(Response::new(pb::BroadcastResponse {
            delivered: delivered as u64,
        }))
    }

    async fn list_rooms(
        &self,
        _request: Request<pb::ListRoomsRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        let rooms = self.hub.rooms().into_iter().map(convert::room).collect();
        Ok(Response::new(pb::ListRoomsResponse { rooms }))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Reply<pb::GetStatsResponse> {
        Ok(Response::new(convert::stats(self.hub.snapshot())))
    }

    async fn ban(&self, request: Request<pb::BanRequest>) -> Reply<pb::BanResponse> {
        let by = who(&request);
        let r = request.into_inner();
        at_most("reason", &r.reason, super::MAX_REASON_BYTES)?;
        let now = SystemTime::now();
        let ban = Ban {
            net: bans::parse_target(&r.target).map_err(AdminError::from)?,
            reason: crate::sanitize::clean(&r.reason),
            created_at: now,
            expires_at: expiry(r.expiry, now)?,
        };
        let hub = self.hub.clone();
        let (ban, kicked) = blocking(move || hub.ban(ban).map_err(AdminError::from)).await?;
        info!(
            by,
            ban = %ban.target(),
            reason = %ban.reason,
            expires = %ban.expires_at.map_or("never".to_string(), |t| humantime::format_rfc3339_seconds(t).to_string()),
            kicked,
            "admin: ban"
        );
        Ok(Response::new(pb::BanResponse {
            ban: Some(convert::ban(&ban)),
            kicked: kicked as u64,
        }))
    }

    async fn unban(&self, request: Request<pb::UnbanRequest>) -> Reply<pb::UnbanResponse> {
        let by = who(&request);
        let net = bans::parse_target(&request.into_inner().target).map_err(AdminError::from)?;
        let hub = self.hub.clone();
        blocking(move || hub.unban(net).map_err(AdminError::from)).await?;
        info!(by, ban = %bans::format_target(&net), "admin: unban");
        Ok(Response::new(pb::UnbanResponse {}))
    }

    async fn list_bans(
        &self,
        _request: Request<pb::ListBansRequest>,
    ) -> Reply<pb::ListBansResponse> {
        let bans = self.hub.bans().iter().map(convert::ban).collect();
        Ok(Response::new(pb::ListBansResponse { bans }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(&self, request: Request<pb::WatchEventsRequest>) -> Reply<EventStream> {
        let include_messages = request.get_ref().include_messages;
        let (events, guard) = if include_messages {
            let (rx, guard) = self.hub.subscribe_messages();
            (rx, Some(guard))
        } else {
            (self.hub.subscribe(), None)
        };
        info!(
            by = who(&request),
            messages = include_messages,
            "admin: watch started"
        );
        let shutdown = self.shutdown.clone();
        // The state carries the message guard: message events flow exactly
        // as long as the stream lives.
        let stream = futures_util::stream::unfold(
            (events, guard, shutdown),
            move |(mut events, guard, shutdown)| async move {
                loop {
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return None,
                        next = events.recv() => next,
                    };
                    let event = match next {
                        Ok(crate::hub::Event::Message { .. }) if !include_messages => continue,
                        Ok(event) => convert::event(event),
                        Err(RecvError::Lagged(missed)) => convert::lagged(missed),
                        Err(RecvError::Closed) => return None,
                    };
                    return Some((Ok(event), (events, guard, shutdown)));
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reload(&self, request: Request<pb::ReloadRequest>) -> Reply<pb::ReloadResponse> {
        let by = who(&request);
        let reloader = self.reloader.clone();
        let report = blocking(move || reloader.reload().map_err(AdminError::from)).await;
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                info!(by, error = %e, "admin: reload refused; the running configuration stays");
                return Err(e.into());
            }
        };
        info!(by, config = %report.config_path, applied = ?report.applied, restart_required = ?report.restart_required, "admin: reload");
        Ok(Response::new(pb::ReloadResponse {
            config_path: report.config_path,
            applied: report.applied,
            restart_required: report.restart_required,
        }))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::config::{RawConfig, Source};

    fn service() -> (Hub, AdminService) {
        let config = RawConfig::default().validate().expect("defaults validate");
        let hub = Hub::new(config);
        let reloader = Reloader::new(Source::Default, hub.clone(), None, Default::default());
        let service = AdminService::new(hub.clone(), reloader, CancellationToken::new());
        (hub, service)
    }

    #[tokio::test]
    async fn a_lagging_watcher_is_told_how_much_it_missed_and_goes_on() {
        let (hub, service) = service();
        let mut stream = service
            .watch_events(Request::new(pb::WatchEventsRequest::default()))
            .await
            .expect("watch")
            .into_inner();
        for i in 0..1500 {
            hub.broadcast(None, &format!("notice {i}"))
                .expect("broadcast");
        }
        let first = stream.next().await.expect("an event").expect("ok");
        let Some(pb::event::Kind::Lagged(lagged)) = first.kind else {
            panic!("expected a lagged event, got {first:?}");
        };
        assert_eq!(lagged.missed, 1500 - 1024);
        let next = stream.next().await.expect("an event").expect("ok");
        let Some(pb::event::Kind::Broadcast(b)) = next.kind else {
            panic!("expected the oldest kept event, got {next:?}");
        };
        assert_eq!(b.text, format!("notice {}", 1500 - 1024));
    }

    #[tokio::test]
    async fn message_events_flow_only_while_a_watcher_asks_for_them() {
        let (hub, service) = service();
        assert!(!hub.watching_messages());
        let stream = service
            .watch_events(Request::new(pb::WatchEventsRequest {
                include_messages: true,
            }))
            .await
            .expect("watch")
            .into_inner();
        assert!(hub.watching_messages());
        drop(stream);
        assert!(!hub.watching_messages());
    }

    #[tokio::test]
    async fn admin_text_over_its_limit_is_refused_and_no_notice_exceeds_a_queue() {
        let (hub, service) = service();
        let status = service
            .broadcast(Request::new(pb::BroadcastRequest {
                text: "x".repeat(crate::admin::MAX_BROADCAST_BYTES + 1),
                room: String::new(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("limit is 1024 bytes"),
            "{status:?}"
        );

        // The hub itself refuses a notice larger than a client's queue.
        let mut raw = RawConfig::default();
        raw.limits.outbound_queue_bytes = 4096;
        hub.set_config(raw.validate().expect("valid"));
        let e = hub
            .broadcast(None, &"y".repeat(5000))
            .expect_err("larger than a queue");
        assert!(e.to_string().contains("limits.outbound_queue_bytes"), "{e}");
    }
}
