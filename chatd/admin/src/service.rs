//! The `chatd.admin.v1.Admin` service: each method is a thin translation of
//! a hub operation. Authorisation happened before (see `auth`); mutating
//! methods log the caller's token name and what they did.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chatd_proto::admin::v1 as pb;
use futures_util::Stream;
use pb::admin_server::Admin;
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::auth::Caller;
use super::control::Control;
use super::convert;
use super::error::AdminError;
use chatd_hub::bans::{self, Ban};
use chatd_hub::cluster_state::ADMIN_DEADLINE;
use chatd_hub::cluster_state::{AdminBus, Answer, Gathered, RemoteEvents};
use chatd_hub::hub::{Hub, HubError, Target};

/// Longest broadcast text accepted, in bytes: one server line to everyone.
pub const MAX_BROADCAST_BYTES: usize = 1024;

pub struct AdminService {
    hub: Hub,
    control: Arc<dyn Control>,
    /// The way to the other nodes' admin; `None` on one node, where admin
    /// calls answer for this node alone.
    bus: Option<Arc<dyn AdminBus>>,
    /// Cancelled when shutdown begins: open watch streams end then.
    shutdown: CancellationToken,
}

impl AdminService {
    pub fn new(
        hub: Hub,
        control: Arc<dyn Control>,
        bus: Option<Arc<dyn AdminBus>>,
        shutdown: CancellationToken,
    ) -> AdminService {
        AdminService {
            hub,
            control,
            bus,
            shutdown,
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// The token name of an authorised request, for the audit log.
/// How long this call may take: the caller's `grpc-timeout`, less a margin
/// for the answer to reach it. `None` when the caller set no deadline.
fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let total = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    Some(total.saturating_sub((total / 5).min(std::time::Duration::from_millis(500))))
}

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
    chatd_text::sanitize::clean(text)
}

/// The node a client request names: none when empty; otherwise it must be
/// a node id as `cluster.node_id` allows, so that a made-up one is refused
/// here (and never echoed whole) rather than asked of every node.
fn named_node(node: &str) -> Result<Option<&str>, AdminError> {
    if node.is_empty() {
        return Ok(None);
    }
    let is_id = node.len() <= 63
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !is_id {
        return Err(AdminError::BadRequest(
            "`node` is not a node id: 1 to 63 letters, digits, '-' or '_'".into(),
        ));
    }
    Ok(Some(node))
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

/// Runs one admin request from another node (`NAME.admin.OP`) on this
/// node alone and encodes the answer. Never scatters again, so a request
/// cannot loop.
pub async fn answer_remote(
    hub: &Hub,
    node: &str,
    op: &str,
    payload: Bytes,
) -> Result<Bytes, Status> {
    fn decode<M: Message + Default>(payload: Bytes) -> Result<M, Status> {
        M::decode(payload).map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
    }
    let reply = match op {
        OP_LIST_CLIENTS => local_clients(hub, node, &decode(payload)?).encode_to_vec(),
        OP_ROOMS => local_rooms(hub).encode_to_vec(),
        OP_STATS => convert::stats(hub.snapshot()).encode_to_vec(),
        OP_NODES => local_node(hub, node).encode_to_vec(),
        OP_BANS => local_bans(hub).encode_to_vec(),
        OP_CLIENT => remote_client(hub, node, decode(payload)?)?.encode_to_vec(),
        OP_KICK => {
            let r: pb::KickClientRequest = decode(payload)?;
            if !r.node.is_empty() && r.node != node {
                return Err(AdminError::Hub(HubError::NoSuchClient(target(r.client)?)).into());
            }
            let client = local_kick(hub, node, &r)?;
            pb::KickClientResponse {
                client: Some(client),
            }
            .encode_to_vec()
        }
        OP_BROADCAST => {
            let r: pb::BroadcastRequest = decode(payload)?;
            let delivered = hub
                .broadcast(non_empty(&r.room), &r.text)
                .map_err(AdminError::from)?;
            pb::BroadcastResponse {
                delivered: delivered as u64,
                answered_nodes: Vec::new(),
            }
            .encode_to_vec()
        }
        OP_BAN => remote_ban(hub, decode(payload)?).await?.encode_to_vec(),
        OP_UNBAN => {
            let r: pb::UnbanRequest = decode(payload)?;
            let net = bans::parse_target(&r.target).map_err(AdminError::from)?;
            let hub = hub.clone();
            blocking(move || hub.unban(net).map_err(AdminError::from)).await?;
            info!(ban = %bans::format_target(&net), "admin: unban from another node");
            pb::UnbanResponse::default().encode_to_vec()
        }
        other => {
            return Err(Status::unimplemented(format!(
                "no admin operation {other:?}"
            )));
        }
    };
    Ok(Bytes::from(reply))
}

/// `GetClient` on this node, for another node.
fn remote_client(
    hub: &Hub,
    node: &str,
    r: pb::GetClientRequest,
) -> Result<pb::GetClientResponse, Status> {
    let target = target(r.client)?;
    if !r.node.is_empty() && r.node != node {
        return Err(AdminError::Hub(HubError::NoSuchClient(target)).into());
    }
    let client = hub.client(&target).map_err(AdminError::from)?;
    Ok(pb::GetClientResponse {
        client: Some(pb::Client {
            node: node.to_string(),
            ..convert::client(client)
        }),
        answered_nodes: Vec::new(),
    })
}

/// A ban made on another node, applied here.
async fn remote_ban(hub: &Hub, entry: pb::BanEntry) -> Result<pb::BanResponse, Status> {
    let ban = Ban {
        net: bans::parse_target(&entry.target).map_err(AdminError::from)?,
        reason: chatd_text::sanitize::clean(&entry.reason),
        created_at: entry
            .created_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or_else(SystemTime::now),
        expires_at: entry.expires_at.and_then(|t| SystemTime::try_from(t).ok()),
    };
    let hub = hub.clone();
    let (ban, kicked) = blocking(move || hub.ban(ban).map_err(AdminError::from)).await?;
    info!(ban = %ban.target(), kicked, "admin: ban from another node");
    Ok(pb::BanResponse {
        ban: Some(convert::ban(&ban)),
        kicked: kicked as u64,
        answered_nodes: Vec::new(),
    })
}

const OP_LIST_CLIENTS: &str = "list-clients";
const OP_ROOMS: &str = "rooms";
const OP_STATS: &str = "stats";
const OP_NODES: &str = "nodes";
const OP_KICK: &str = "kick";
const OP_BROADCAST: &str = "broadcast";
const OP_BAN: &str = "ban";
const OP_UNBAN: &str = "unban";
const OP_CLIENT: &str = "client";
const OP_BANS: &str = "bans";

fn local_bans(hub: &Hub) -> pb::ListBansResponse {
    pb::ListBansResponse {
        bans: hub.bans().iter().map(convert::ban).collect(),
        ..Default::default()
    }
}

/// Every node's bans as one list, by target: where nodes differ on a
/// target (one missed a change while cut off, until it settles with the
/// bucket), the latest made wins.
fn merge_bans(lists: impl IntoIterator<Item = pb::ListBansResponse>) -> Vec<pb::BanEntry> {
    let made = |b: &pb::BanEntry| b.created_at.map(|t| (t.seconds, t.nanos));
    let mut by_target: std::collections::BTreeMap<String, pb::BanEntry> = Default::default();
    for ban in lists.into_iter().flat_map(|l| l.bans) {
        match by_target.get(&ban.target) {
            Some(kept) if made(kept) >= made(&ban) => {}
            _ => {
                by_target.insert(ban.target.clone(), ban);
            }
        }
    }
    by_target.into_values().collect()
}

/// `status`, naming also the nodes that did not answer in time: a
/// NOT_FOUND may be theirs to answer.
fn naming_missing(status: Status, missing: &[String]) -> Status {
    if missing.is_empty() {
        return status;
    }
    Status::new(
        status.code(),
        format!(
            "{}; no answer within {} ms from {}",
            status.message(),
            ADMIN_DEADLINE.as_millis(),
            missing.join(", ")
        ),
    )
}

fn local_clients(hub: &Hub, node: &str, r: &pb::ListClientsRequest) -> pb::ListClientsResponse {
    let clients = hub
        .clients(non_empty(&r.room), non_empty(&r.filter))
        .into_iter()
        .map(|c| pb::Client {
            node: node.to_string(),
            ..convert::client(c)
        })
        .collect();
    pb::ListClientsResponse {
        clients,
        ..Default::default()
    }
}

fn local_rooms(hub: &Hub) -> pb::ListRoomsResponse {
    pb::ListRoomsResponse {
        rooms: hub.rooms().into_iter().map(convert::room).collect(),
        ..Default::default()
    }
}

fn local_node(hub: &Hub, node: &str) -> pb::Node {
    let s = hub.snapshot();
    pb::Node {
        id: node.to_string(),
        clients: s.clients,
        uptime: prost_types::Duration::try_from(s.uptime).ok(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn local_kick(hub: &Hub, node: &str, r: &pb::KickClientRequest) -> Result<pb::Client, AdminError> {
    let target = target(r.client.clone())?;
    let client = hub.kick(&target, &r.reason)?;
    Ok(pb::Client {
        node: node.to_string(),
        ..convert::client(client)
    })
}

/// The answers that are not errors, decoded, with the nodes that gave
/// them (sorted); a malformed answer counts as no answer.
fn decoded<M: Message + Default>(answers: Vec<Answer>) -> (ByNode<M>, Vec<String>) {
    let mut ok: Vec<(String, M)> = answers
        .into_iter()
        .filter_map(|a| {
            let payload = a.result.ok()?;
            Some((a.node, M::decode(payload).ok()?))
        })
        .collect();
    ok.sort_by(|a, b| a.0.cmp(&b.0));
    let nodes = ok.iter().map(|(n, _)| n.clone()).collect();
    (ok, nodes)
}

/// Values by the node that gave them.
type ByNode<T> = Vec<(String, T)>;

/// Splits answers into successes and errors (as statuses), each sorted by
/// node.
fn split<M: Message + Default>(answers: Vec<Answer>) -> (ByNode<M>, ByNode<Status>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for a in answers {
        match a.result {
            Ok(payload) => match M::decode(payload) {
                Ok(m) => ok.push((a.node, m)),
                Err(e) => failed.push((a.node, Status::internal(format!("malformed answer: {e}")))),
            },
            Err((code, message)) => {
                failed.push((a.node, Status::new(tonic::Code::from(code), message)))
            }
        }
    }
    ok.sort_by(|a, b| a.0.cmp(&b.0));
    failed.sort_by(|a, b| a.0.cmp(&b.0));
    (ok, failed)
}

/// The status when no node succeeded: a not-found names the nodes that
/// answered; any other error wins over not-found.
fn none_succeeded(failed: Vec<(String, Status)>, what: &str) -> Status {
    let nodes: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
    let listed = nodes.join(", ");
    if let Some((node, status)) = failed
        .iter()
        .find(|(_, s)| s.code() != tonic::Code::NotFound)
    {
        return Status::new(status.code(), format!("node {node}: {}", status.message()));
    }
    if failed.is_empty() {
        return Status::unavailable(format!(
            "no node answered {what} within {} ms",
            ADMIN_DEADLINE.as_millis()
        ));
    }
    let message = failed.first().map_or("", |(_, s)| s.message());
    Status::not_found(format!("{message} on the nodes that answered ({listed})"))
}

impl AdminService {
    /// The way to the other nodes, in cluster mode.
    fn bus(&self) -> Option<&dyn AdminBus> {
        self.bus.as_deref()
    }

    /// Scatters `request` to every node and gathers the answers; `None`
    /// when NATS is unreachable (the caller answers for this node alone,
    /// and says so through the answered nodes).
    async fn gather(
        &self,
        op: &str,
        request: &impl Message,
        done: impl Fn(&Answer) -> bool + Send + Sync,
    ) -> Option<Gathered> {
        let bus = self.bus()?;
        match bus
            .gather(op, Bytes::from(request.encode_to_vec()), &done)
            .await
        {
            Ok(answers) => Some(answers),
            Err(e) => {
                warn!(error = %e, op, "admin: cannot reach the other nodes; answering for this node alone");
                None
            }
        }
    }

    /// Refuses a malformed node, and any node on a chatd outside a cluster
    /// (whose clients belong to no named node): a client addressed on
    /// another node is never this node's client of the same id.
    fn check_node(&self, node: &str) -> Result<(), AdminError> {
        match named_node(node)? {
            Some(node) if self.bus().is_none() => Err(AdminError::NoSuchNode(node.to_string())),
            _ => Ok(()),
        }
    }

    fn node_id(&self) -> String {
        self.bus()
            .map_or_else(String::new, |b| b.node_id().to_string())
    }

    /// This node's answer to a scattered request, when NATS is away.
    async fn alone(&self, op: &str, request: &impl Message) -> Gathered {
        let node = self.node_id();
        let result = answer_remote(&self.hub, &node, op, Bytes::from(request.encode_to_vec()))
            .await
            .map_err(|s| (s.code() as i32, s.message().to_string()));
        Gathered {
            answers: vec![Answer { node, result }],
            missing: Vec::new(),
        }
    }

    /// In cluster mode, the other nodes' events for a watch, and which
    /// nodes answered and which are missing.
    async fn remote_events(
        &self,
        include_messages: bool,
        node: &str,
    ) -> (Option<Box<dyn RemoteEvents>>, Vec<String>, Vec<String>) {
        let Some(bus) = self.bus() else {
            return (None, Vec::new(), Vec::new());
        };
        match bus.watch(include_messages).await {
            Ok((remote, gathered)) => {
                let mut answered: Vec<String> =
                    gathered.answers.into_iter().map(|a| a.node).collect();
                answered.sort();
                (Some(remote), answered, gathered.missing)
            }
            Err(e) => {
                warn!(error = %e, "admin: cannot reach the other nodes; watching this node alone");
                (None, vec![node.to_string()], Vec::new())
            }
        }
    }

    async fn everywhere(&self, op: &str, request: &impl Message) -> Gathered {
        match self.gather(op, request, |_| false).await {
            Some(answers) => answers,
            None => self.alone(op, request).await,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_clients(
        &self,
        request: Request<pb::ListClientsRequest>,
    ) -> Reply<pb::ListClientsResponse> {
        let r = request.into_inner();
        if self.bus().is_none() {
            return Ok(Response::new(local_clients(&self.hub, "", &r)));
        }
        let gathered = self.everywhere(OP_LIST_CLIENTS, &r).await;
        let (ok, answered_nodes) = decoded::<pb::ListClientsResponse>(gathered.answers);
        let clients = ok.into_iter().flat_map(|(_, l)| l.clients).collect();
        Ok(Response::new(pb::ListClientsResponse {
            clients,
            answered_nodes,
            missing_nodes: gathered.missing,
        }))
    }

    async fn get_client(
        &self,
        request: Request<pb::GetClientRequest>,
    ) -> Reply<pb::GetClientResponse> {
        let r = request.into_inner();
        let target = target(r.client.clone())?;
        self.check_node(&r.node)?;
        // An id without a node is this node's client: ids are per node.
        if self.bus().is_none() || (matches!(target, Target::Id(_)) && r.node.is_empty()) {
            let client = self.hub.client(&target).map_err(AdminError::from)?;
            return Ok(Response::new(pb::GetClientResponse {
                client: Some(pb::Client {
                    node: self.node_id(),
                    ..convert::client(client)
                }),
                answered_nodes: Vec::new(),
            }));
        }
        let gathered = match self.gather(OP_CLIENT, &r, |a| a.result.is_ok()).await {
            Some(gathered) => gathered,
            None => self.alone(OP_CLIENT, &r).await,
        };
        let mut answered_nodes: Vec<String> =
            gathered.answers.iter().map(|a| a.node.clone()).collect();
        answered_nodes.sort();
        let (ok, failed) = split::<pb::GetClientResponse>(gathered.answers);
        match ok.into_iter().find_map(|(_, g)| g.client) {
            Some(client) => Ok(Response::new(pb::GetClientResponse {
                client: Some(client),
                answered_nodes,
            })),
            None => Err(naming_missing(
                none_succeeded(failed, "the lookup"),
                &gathered.missing,
            )),
        }
    }

    async fn kick_client(
        &self,
        request: Request<pb::KickClientRequest>,
    ) -> Reply<pb::KickClientResponse> {
        let by = who(&request);
        let r = request.into_inner();
        at_most("reason", &r.reason, chatd_hub::bans::MAX_REASON_BYTES)?;
        self.check_node(&r.node)?;
        let by_id_here = matches!(
            r.client.as_ref().and_then(|c| c.selector.as_ref()),
            Some(pb::client_selector::Selector::Id(_))
        ) && r.node.is_empty();
        // An id without a node is this node's client: ids are per node.
        let client = if self.bus().is_none() || by_id_here {
            local_kick(&self.hub, &self.node_id(), &r)?
        } else {
            let answers = match self.gather(OP_KICK, &r, |a| a.result.is_ok()).await {
                Some(gathered) => gathered.answers,
                None => self.alone(OP_KICK, &r).await.answers,
            };
            let (ok, failed) = split::<pb::KickClientResponse>(answers);
            match ok.into_iter().find_map(|(_, k)| k.client) {
                Some(client) => client,
                None => return Err(none_succeeded(failed, "the kick")),
            }
        };
        info!(by, client = client.id, node = %client.node, nick = %client.nick, reason = %logged(&r.reason), "admin: kick");
        Ok(Response::new(pb::KickClientResponse {
            client: Some(client),
        }))
    }

    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Reply<pb::BroadcastResponse> {
        let by = who(&request);
        let r = request.into_inner();
        at_most("broadcast text", &r.text, MAX_BROADCAST_BYTES)?;
        let (delivered, answered_nodes) = if self.bus().is_none() {
            let delivered = self
                .hub
                .broadcast(non_empty(&r.room), &r.text)
                .map_err(AdminError::from)?;
            (delivered as u64, Vec::new())
        } else {
            let answers = self.everywhere(OP_BROADCAST, &r).await.answers;
            let (ok, failed) = split::<pb::BroadcastResponse>(answers);
            if ok.is_empty() {
                return Err(none_succeeded(failed, "the broadcast"));
            }
            let delivered = ok.iter().map(|(_, b)| b.delivered).sum();
            (delivered, ok.into_iter().map(|(n, _)| n).collect())
        };
        info!(by, room = %logged(&r.room), text = %logged(&r.text), delivered, nodes = ?answered_nodes, "admin: broadcast");
        Ok(Response::new(pb::BroadcastResponse {
            delivered,
            answered_nodes,
        }))
    }

    async fn list_rooms(
        &self,
        _request: Request<pb::ListRoomsRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        if self.bus().is_none() {
            return Ok(Response::new(local_rooms(&self.hub)));
        }
        let gathered = self.everywhere(OP_ROOMS, &pb::ListRoomsRequest {}).await;
        let (ok, answered_nodes) = decoded::<pb::ListRoomsResponse>(gathered.answers);
        let mut rooms: std::collections::BTreeMap<String, pb::Room> = Default::default();
        for room in ok.into_iter().flat_map(|(_, l)| l.rooms) {
            let entry = rooms.entry(room.name.clone()).or_insert(pb::Room {
                name: room.name.clone(),
                members: 0,
                messages: 0,
            });
            // Members are each node's own; every node sees every line of a
            // room it is in, so the busiest node's count is the room's.
            entry.members += room.members;
            entry.messages = entry.messages.max(room.messages);
        }
        Ok(Response::new(pb::ListRoomsResponse {
            rooms: rooms.into_values().collect(),
            answered_nodes,
            missing_nodes: gathered.missing,
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Reply<pb::GetStatsResponse> {
        if self.bus().is_none() {
            return Ok(Response::new(convert::stats(self.hub.snapshot())));
        }
        let gathered = self.everywhere(OP_STATS, &pb::GetStatsRequest {}).await;
        let (ok, answered_nodes) = decoded::<pb::GetStatsResponse>(gathered.answers);
        let rooms = self.everywhere(OP_ROOMS, &pb::ListRoomsRequest {}).await;
        let (rooms, _) = decoded::<pb::ListRoomsResponse>(rooms.answers);
        let distinct: std::collections::BTreeSet<String> = rooms
            .into_iter()
            .flat_map(|(_, l)| l.rooms.into_iter().map(|r| r.name))
            .collect();
        Ok(Response::new(pb::GetStatsResponse {
            missing_nodes: gathered.missing,
            ..convert::sum_stats(
                ok.into_iter().map(|(_, s)| s).collect(),
                distinct.len() as u64,
                answered_nodes,
            )
        }))
    }

    async fn ban(&self, request: Request<pb::BanRequest>) -> Reply<pb::BanResponse> {
        let by = who(&request);
        let r = request.into_inner();
        at_most("reason", &r.reason, chatd_hub::bans::MAX_REASON_BYTES)?;
        let now = SystemTime::now();
        let ban = Ban {
            net: bans::parse_target(&r.target).map_err(AdminError::from)?,
            reason: chatd_text::sanitize::clean(&r.reason),
            created_at: now,
            expires_at: expiry(r.expiry, now)?,
        };
        let expires_at = ban.expires_at;
        let (entry, kicked, answered_nodes) = if self.bus().is_none() {
            let hub = self.hub.clone();
            let (ban, kicked) = blocking(move || hub.ban(ban).map_err(AdminError::from)).await?;
            (convert::ban(&ban), kicked as u64, Vec::new())
        } else {
            // Every node applies it and keeps it in its own bans file.
            let answers = self.everywhere(OP_BAN, &convert::ban(&ban)).await.answers;
            let (ok, failed) = split::<pb::BanResponse>(answers);
            let Some(entry) = ok.iter().find_map(|(_, b)| b.ban.clone()) else {
                return Err(none_succeeded(failed, "the ban"));
            };
            for (node, status) in &failed {
                warn!(node, error = %status.message(), "admin: a node could not apply the ban");
            }
            let kicked = ok.iter().map(|(_, b)| b.kicked).sum();
            (entry, kicked, ok.into_iter().map(|(n, _)| n).collect())
        };
        info!(
            by,
            ban = %entry.target,
            reason = %entry.reason,
            expires = %expires_at.map_or("never".to_string(), |t| humantime::format_rfc3339_seconds(t).to_string()),
            kicked,
            nodes = ?answered_nodes,
            "admin: ban"
        );
        Ok(Response::new(pb::BanResponse {
            ban: Some(entry),
            kicked,
            answered_nodes,
        }))
    }

    async fn unban(&self, request: Request<pb::UnbanRequest>) -> Reply<pb::UnbanResponse> {
        let by = who(&request);
        let r = request.into_inner();
        let net = bans::parse_target(&r.target).map_err(AdminError::from)?;
        let answered_nodes = if self.bus().is_none() {
            let hub = self.hub.clone();
            blocking(move || hub.unban(net).map_err(AdminError::from)).await?;
            Vec::new()
        } else {
            let answers = self.everywhere(OP_UNBAN, &r).await.answers;
            let (ok, failed) = split::<pb::UnbanResponse>(answers);
            if ok.is_empty() {
                return Err(none_succeeded(failed, "the unban"));
            }
            ok.into_iter().map(|(n, _)| n).collect()
        };
        info!(by, ban = %bans::format_target(&net), nodes = ?answered_nodes, "admin: unban");
        Ok(Response::new(pb::UnbanResponse { answered_nodes }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Reply<pb::ListNodesResponse> {
        if self.bus().is_none() {
            return Ok(Response::new(pb::ListNodesResponse {
                nodes: vec![local_node(&self.hub, "")],
                missing_nodes: Vec::new(),
            }));
        }
        let gathered = self.everywhere(OP_NODES, &pb::ListNodesRequest {}).await;
        let (ok, _) = decoded::<pb::Node>(gathered.answers);
        Ok(Response::new(pb::ListNodesResponse {
            nodes: ok.into_iter().map(|(_, n)| n).collect(),
            missing_nodes: gathered.missing,
        }))
    }

    async fn list_bans(
        &self,
        _request: Request<pb::ListBansRequest>,
    ) -> Reply<pb::ListBansResponse> {
        if self.bus().is_none() {
            return Ok(Response::new(local_bans(&self.hub)));
        }
        let gathered = self.everywhere(OP_BANS, &pb::ListBansRequest {}).await;
        let (ok, answered_nodes) = decoded::<pb::ListBansResponse>(gathered.answers);
        Ok(Response::new(pb::ListBansResponse {
            bans: merge_bans(ok.into_iter().map(|(_, l)| l)),
            answered_nodes,
            missing_nodes: gathered.missing,
        }))
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
        let node = self.node_id();
        // In cluster mode, the other nodes' events too: subscribed to and
        // asked for before the stream starts, so that everything after
        // this call returns is in it.
        let (remote, answered, missing) = self.remote_events(include_messages, &node).await;
        info!(
            by = who(&request),
            messages = include_messages,
            nodes = ?answered,
            missing = ?missing,
            "admin: watch started"
        );
        let shutdown = self.shutdown.clone();
        // The state carries the message guard and the other nodes' feed
        // (whose lease is renewed while it lives): both flow exactly as long
        // as the stream lives.
        let stream = futures_util::stream::unfold(
            (events, guard, shutdown, remote),
            move |(mut events, guard, shutdown, mut remote)| {
                let node = node.clone();
                async move {
                    loop {
                        let from_remote = async {
                            match remote.as_mut() {
                                Some(r) => r.next().await,
                                None => std::future::pending().await,
                            }
                        };
                        let next = tokio::select! {
                            () = shutdown.cancelled() => return None,
                            next = events.recv() => next,
                            event = from_remote => match event.map(convert::relayed) {
                                Some(Some(event)) => {
                                    return Some((Ok(event), (events, guard, shutdown, remote)));
                                }
                                Some(None) => continue,
                                None => {
                                    remote = None;
                                    continue;
                                }
                            },
                        };
                        let event = match next {
                            Ok(chatd_hub::hub::Event::Message { .. }) if !include_messages => {
                                continue;
                            }
                            Ok(event) => convert::event(event),
                            Err(RecvError::Lagged(missed)) => convert::lagged(missed),
                            Err(RecvError::Closed) => return None,
                        };
                        let event = pb::Event {
                            node: node.clone(),
                            ..event
                        };
                        return Some((Ok(event), (events, guard, shutdown, remote)));
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reload(&self, request: Request<pb::ReloadRequest>) -> Reply<pb::ReloadResponse> {
        let by = who(&request);
        let control = self.control.clone();
        let report = blocking(move || control.reload().map_err(AdminError::from)).await;
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
            certificate: report.certificate.map(|c| pb::Certificate {
                subject: c.subject,
                not_after_unix: c.not_after,
                not_after: c.expires,
                serial: c.serial,
                changed: c.changed,
            }),
        }))
    }

    async fn upgrade(&self, request: Request<pb::UpgradeRequest>) -> Reply<pb::UpgradeResponse> {
        let by = who(&request);
        info!(by, "admin: upgrade");
        let wait = caller_deadline(request.metadata());
        let started = std::time::Instant::now();
        let running = self.control.upgrade().map_err(AdminError::from)?;
        // The upgrade runs in its own task: this call only waits for it,
        // and answers before the caller gives up.
        let done = match wait {
            Some(wait) => tokio::time::timeout(wait, running)
                .await
                .map_err(|_| AdminError::UpgradeRunning(started.elapsed().as_millis() as u64))?,
            None => running.await,
        }
        .map_err(AdminError::from)?;
        Ok(Response::new(pb::UpgradeResponse {
            new_pid: done.pid,
            duration_ms: done.duration.as_millis() as u64,
            clients: done.clients as u64,
            tls_clients_closed: done.dropped_tls as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::control::{ControlError, ReloadReport, UpgradeReport};
    use chatd_config::RawConfig;

    /// A process that can neither reload nor upgrade: these tests ask for
    /// neither.
    #[derive(Debug)]
    struct Fixed;

    impl Control for Fixed {
        fn reload(&self) -> Result<ReloadReport, ControlError> {
            Err(ControlError::Config("no reload here".into()))
        }

        fn upgrade(
            &self,
        ) -> Result<
            chatd_hub::cluster_state::BoxFuture<'static, Result<UpgradeReport, ControlError>>,
            ControlError,
        > {
            Err(ControlError::Upgrade("no upgrade here".into()))
        }

        fn handed_over(&self) -> bool {
            false
        }
    }

    fn service() -> (Hub, AdminService) {
        let config = RawConfig::default().validate().expect("defaults validate");
        let hub = Hub::new(config);
        let service =
            AdminService::new(hub.clone(), Arc::new(Fixed), None, CancellationToken::new());
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
                text: "x".repeat(MAX_BROADCAST_BYTES + 1),
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
