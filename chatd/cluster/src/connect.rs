//! Connecting to NATS: options, credentials and TLS, and what a start
//! does when NATS refuses or does not answer.

use std::sync::Arc;
use std::time::Duration;

use async_nats::ConnectOptions;
use tokio::sync::watch as tokio_watch;
use tracing::{debug, info, warn};

use crate::nats_options;
use chatd_config::{ClusterConfig, OnUnreachable};
use chatd_hub::rate_log::RateLimitedLog;

use super::link::WARN_EVERY;
use super::subjects;

/// Messages NATS may queue for one room's subscription before it drops
/// them (and reports a slow consumer) instead of growing.
pub(super) const SUBSCRIPTION_CAPACITY: usize = 4096;

/// How long a start waits for NATS before `cluster.on_unreachable` decides.
pub(super) const START_WAIT: Duration = Duration::from_secs(3);

/// How often the client pings NATS: a connection that went silent (a
/// partition rather than a closed socket) is noticed after two missed
/// pongs, so within about twice this.
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Why the node does not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach NATS at {urls} within {secs} s and cluster.on_unreachable = \"refuse\": start nats-server, fix cluster.nats_urls, or set cluster.on_unreachable = \"local\""
    )]
    Unreachable { urls: String, secs: u64 },
    #[error("NATS at {urls} refused this node ({source}): check {keys}")]
    Refused {
        urls: String,
        keys: &'static str,
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Creds(#[from] nats_options::CredsError),
    #[error("cannot use cluster.nats_urls {urls}: {source}")]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
}

/// A NATS connection made for [`start`](super::start), before this node serves anyone
/// through it. Made apart so that a new process taking over from a running
/// one (seamless upgrade) connects while the clients are still served; only
/// [`start`](super::start) subscribes and publishes.
pub struct Connected {
    pub(super) client: async_nats::Client,
    pub(super) connected: bool,
    pub(super) state_rx: tokio_watch::Receiver<bool>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

/// Connects to NATS as `config` says: fails closed on a refusal (credentials,
/// TLS), and on a NATS that does not answer within a few seconds as
/// `cluster.on_unreachable` says.
pub async fn connect(config: &ClusterConfig) -> Result<Connected, ClusterError> {
    let urls = config.nats_urls.join(" ");
    let (state_tx, mut state_rx) = tokio_watch::channel(false);
    let state_tx = Arc::new(state_tx);
    let slow_warned = Arc::new(RateLimitedLog::new(WARN_EVERY));
    let options = || async {
        let options = connect_options(config, state_tx.clone(), slow_warned.clone());
        nats_options::secure(options, config).await
    };
    // One attempt first, to tell a refusal (credentials, TLS: fail closed)
    // from a NATS that is not there (`on_unreachable` decides).
    let first = tokio::time::timeout(
        START_WAIT,
        options().await?.connect(config.nats_urls.clone()),
    )
    .await;
    let (client, connected) = match first {
        Ok(Ok(client)) => (client, true),
        Ok(Err(source)) if nats_options::refusal(&source).is_some() => {
            let keys = nats_options::refusal(&source).map_or("", |r| r.keys(config));
            return Err(ClusterError::Refused { urls, keys, source });
        }
        Ok(Err(_)) | Err(_) => {
            let client = options()
                .await?
                .retry_on_initial_connect()
                .connect(config.nats_urls.clone())
                .await
                .map_err(|source| ClusterError::Connect {
                    urls: urls.clone(),
                    source,
                })?;
            // The retrying client may have got through in the meantime.
            let connected = tokio::time::timeout(START_WAIT, state_rx.wait_for(|c| *c))
                .await
                .is_ok_and(|r| r.is_ok());
            (client, connected)
        }
    };
    if connected {
        info!(node = %config.node_id, nats = %urls, subjects = %format!("{}*.*", subjects::room_prefix(&config.name)), "cluster mode: connected to NATS");
    } else if config.on_unreachable == OnUnreachable::Refuse {
        return Err(ClusterError::Unreachable {
            urls,
            secs: START_WAIT.as_secs(),
        });
    } else {
        warn!(
            node = %config.node_id,
            nats = %urls,
            "cluster mode: NATS unreachable at start; serving this node's users alone \
             (cluster.on_unreachable = \"local\") and joining the cluster when NATS answers"
        );
    }
    Ok(Connected {
        client,
        connected,
        state_rx,
    })
}

/// The connection's options, credentials and TLS aside: its name, timeouts,
/// and the events that drive `state` (connected or not) and warnings.
pub(super) fn connect_options(
    config: &ClusterConfig,
    events: Arc<tokio_watch::Sender<bool>>,
    slow_warned: Arc<RateLimitedLog>,
) -> ConnectOptions {
    let refused_warned = Arc::new(RateLimitedLog::new(WARN_EVERY));
    ConnectOptions::new()
        .name(format!("chatd {}", config.node_id))
        .connection_timeout(START_WAIT)
        .ping_interval(PING_INTERVAL)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let events = events.clone();
            let slow_warned = slow_warned.clone();
            let refused_warned = refused_warned.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        events.send_replace(true);
                    }
                    async_nats::Event::Disconnected => {
                        events.send_replace(false);
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        // NATS drops what a subscription cannot hold.
                        if slow_warned.allow().is_some() {
                            warn!("cluster: messages from other nodes (room lines, or events for a watcher that reads slowly) arrive faster than this node hands them out; some are dropped");
                        }
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                        // Only after a start that found NATS away: a start
                        // that reached it stops on a refusal instead.
                        if refused_warned.allow().is_some() {
                            warn!("cluster: NATS refuses this node's credentials (cluster.creds_file, cluster.user/password, cluster.token); still serving this node's users alone");
                        }
                    }
                    other => debug!(event = %other, "cluster: NATS event"),
                }
            }
        })
}
