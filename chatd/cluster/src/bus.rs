//! Cluster-wide admin: the scatter-gather [`Bus`], presence on
//! `NAME.nodes`, and this node's answers to the other nodes' requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use chatd_hub::cluster_state::{ADMIN_DEADLINE, AdminHandler, Answer, GatherError, Gathered};

use super::receive::next_or_stop;
use super::subjects::{ERROR_HEADER, NODE_HEADER};

/// The gRPC code `INTERNAL`, for an error answer whose code is not a
/// number.
pub(super) const GRPC_INTERNAL: i32 = 13;

/// How often a node says on `NAME.nodes` that it is there.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(2);

/// A node not heard for this long is no longer expected to answer (nor
/// named missing).
pub const PRESENCE_TTL: Duration = Duration::from_secs(10);

/// Cluster-wide admin: scatters a request to every node's
/// `NAME.admin.OP` and gathers the answers.
#[derive(Debug, Clone)]
pub struct Bus {
    pub(super) client: async_nats::Client,
    pub(super) node_id: Arc<str>,
    /// `NAME.admin.`
    pub(super) prefix: String,
    /// When each other node was last heard on `NAME.nodes` (presence).
    pub(super) peers: Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>,
}

impl Bus {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The NATS connection, for admin streams that are not one request
    /// (`WatchEvents`, [`super::watch`]).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The admin subject `NAME.admin.REST`.
    pub fn subject(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Sends `payload` to every node's `NAME.admin.OP` (this one included)
    /// and gathers answers until [`ADMIN_DEADLINE`], or sooner once `done`
    /// says the answers so far settle the request (a kick found its
    /// client). Never waits longer than the deadline.
    pub async fn gather(
        &self,
        op: &str,
        payload: Bytes,
        done: impl Fn(&Answer) -> bool,
    ) -> Result<Gathered, GatherError> {
        if self.client.connection_state() != State::Connected {
            return Err(GatherError::Unreachable);
        }
        let nats = |e: &dyn std::fmt::Display| GatherError::Nats(e.to_string());
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats(&e))?;
        self.client
            .publish_with_reply(format!("{}{op}", self.prefix), inbox, payload)
            .await
            .map_err(|e| nats(&e))?;
        let deadline = tokio::time::Instant::now() + ADMIN_DEADLINE;
        let mut expected = self.live_peers();
        expected.push(self.node_id.to_string());
        let mut waiting: std::collections::BTreeSet<String> = expected.into_iter().collect();
        let mut answers = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
            let Some(headers) = &msg.headers else {
                continue;
            };
            let Some(node) = headers.get(NODE_HEADER) else {
                continue;
            };
            let result = match headers.get(ERROR_HEADER) {
                None => Ok(msg.payload),
                Some(code) => Err((
                    code.as_str().parse().unwrap_or(GRPC_INTERNAL),
                    String::from_utf8_lossy(&msg.payload).into_owned(),
                )),
            };
            let answer = Answer {
                node: node.as_str().to_string(),
                result,
            };
            let enough = done(&answer);
            waiting.remove(&answer.node);
            answers.push(answer);
            // Every node known to be there has answered: no need to wait
            // out the deadline.
            if enough || waiting.is_empty() {
                break;
            }
        }
        Ok(Gathered {
            answers,
            missing: waiting.into_iter().collect(),
        })
    }

    /// Other nodes heard within `ttl` (at most [`PRESENCE_TTL`]).
    pub fn peers_within(&self, ttl: Duration) -> Vec<String> {
        let now = std::time::Instant::now();
        let peers = chatd_hub::lock::lock(&self.peers);
        peers
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) < ttl)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Other nodes heard within [`PRESENCE_TTL`].
    pub fn live_peers(&self) -> Vec<String> {
        let now = std::time::Instant::now();
        let mut peers = chatd_hub::lock::lock(&self.peers);
        peers.retain(|_, seen| now.duration_since(*seen) < PRESENCE_TTL);
        peers.keys().cloned().collect()
    }
}

/// Presence: says on `NAME.nodes` that this node is there, at start and
/// every [`HEARTBEAT`], and records the other nodes heard there; a node
/// heard for the first time is greeted back at once, so two nodes know of
/// each other within a round trip of the later one starting.
pub(super) async fn presence(bus: Bus, subject: String, stop: CancellationToken) {
    let mut sub = match bus.client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; admin calls wait out their deadline");
            return;
        }
    };
    let say = |bus: &Bus| {
        let client = bus.client.clone();
        let subject = subject.clone();
        let payload = Bytes::from(bus.node_id.to_string());
        async move {
            if let Err(e) = client.publish(subject, payload).await {
                debug!(error = %e, "cluster: cannot send presence");
            }
        }
    };
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => say(&bus).await,
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                let Ok(node) = std::str::from_utf8(&msg.payload) else { continue };
                if node == &*bus.node_id || node.is_empty() {
                    continue;
                }
                let new = chatd_hub::lock::lock(&bus.peers)
                    .insert(node.to_string(), std::time::Instant::now())
                    .is_none();
                if new {
                    debug!(node, "cluster: a node is there");
                    say(&bus).await;
                }
            }
        }
    }
}

/// Answers every admin request on `NAME.admin.*` through `handler` (this
/// node alone) until `stop`; each in its own task, as a ban writes a file.
pub(super) async fn serve_admin(
    client: async_nats::Client,
    handler: Arc<dyn AdminHandler>,
    node_id: Arc<str>,
    prefix: String,
    stop: CancellationToken,
) {
    let subject = format!("{prefix}*");
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; admin calls through other nodes will miss this node");
            return;
        }
    };
    while let Some(msg) = next_or_stop(&mut sub, &stop).await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Some(op) = msg
            .subject
            .strip_prefix(prefix.as_str())
            .map(str::to_string)
        else {
            continue;
        };
        let (client, handler, node_id) = (client.clone(), handler.clone(), node_id.clone());
        tokio::spawn(async move {
            let mut headers = HeaderMap::new();
            headers.insert(NODE_HEADER, &*node_id);
            let payload = match handler.answer(&node_id, &op, msg.payload).await {
                Ok(payload) => payload,
                Err((code, message)) => {
                    headers.insert(ERROR_HEADER, code.to_string().as_str());
                    Bytes::from(message)
                }
            };
            if let Err(e) = client.publish_with_headers(reply, headers, payload).await {
                debug!(error = %e, %op, "cluster: cannot answer an admin request");
            }
        });
    }
}
