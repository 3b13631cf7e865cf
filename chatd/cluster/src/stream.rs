//! Making JetStream streams and key-value buckets, with the replicas a
//! NATS cluster can hold.

use std::time::Duration;

use tracing::{debug, info, warn};

use chatd_config::ClusterConfig;

use async_nats::jetstream::{self, kv};

/// How long making a replicated stream waits for a JetStream that is still
/// electing its leader; within the callers' own 2 s limits.
pub(super) const REPLICAS_WAIT: Duration = Duration::from_millis(1500);

/// Replicas for the history stream and the nick and ban buckets: 3 when
/// the node is given three NATS servers or more (a NATS cluster, whose
/// JetStream then keeps nicks, history and bans through the loss of one
/// server), else 1. A node given one URL for a cluster gets one replica
/// (raise it with the `nats` CLI, docs/OPERATIONS.md).
pub fn replicas(config: &ClusterConfig) -> usize {
    if config.nats_urls.len() >= 3 { 3 } else { 1 }
}

/// Creates a JetStream stream. With more than one replica asked, a
/// JetStream still electing its leader (a NATS cluster just started) is
/// asked again for up to [`REPLICAS_WAIT`], and one that cannot place them
/// (not clustered, too few servers with JetStream) gets the stream with
/// one replica, so that nicks, history and bans work on any JetStream.
pub async fn create_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<async_nats::jetstream::stream::Stream, async_nats::jetstream::context::CreateStreamError>
{
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    let replicas = config.num_replicas;
    let deadline = tokio::time::Instant::now() + REPLICAS_WAIT;
    loop {
        let e = match js.create_stream(config.clone()).await {
            Err(e) if replicas > 1 => e,
            made => return made,
        };
        let code = match e.kind() {
            K::JetStream(err) => Some(err.error_code()),
            _ => None,
        };
        let cannot = code.is_some_and(|c| {
            c == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED || c == ErrorCode::INSUFFICIENT_RESOURCES
        });
        let not_ready = matches!(e.kind(), K::JetStreamUnavailable | K::TimedOut)
            || code.is_some_and(|c| {
                [
                    ErrorCode::CLUSTER_NOT_AVAILABLE,
                    ErrorCode::CLUSTER_NOT_ACTIVE,
                    ErrorCode::CLUSTER_NOT_LEADER,
                    ErrorCode::CLUSTER_NOT_ASSIGNED,
                ]
                .contains(&c)
            });
        if cannot {
            debug!(error = %e, stream = %config.name, replicas, "cluster: JetStream cannot place the stream's replicas; making it with one");
            return js
                .create_stream(async_nats::jetstream::stream::Config {
                    num_replicas: 1,
                    ..config
                })
                .await;
        }
        if !not_ready || tokio::time::Instant::now() >= deadline {
            return Err(e);
        }
        debug!(error = %e, stream = %config.name, "cluster: JetStream not ready; asking again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes (or opens) the key-value bucket `bucket` whose keys expire
/// `max_age` after their last write. The stream is made here, as
/// `create_key_value` would make it, because that call first reads the
/// account's JetStream info in a form nats-server 2.9 does not send.
/// With `replicas` > 1 and a JetStream that cannot place them (not
/// clustered), it is made with one.
pub async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, String> {
    let stream = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    };
    let name = stream.name.clone();
    if let Err(e) = create_stream(js, stream).await {
        // Made already by another node, perhaps with other settings: it is
        // opened as it is, but with this node's expiry (the configured
        // `cluster.nick_expiry_secs`, which every node should share).
        debug!(error = %e, bucket, "cluster: cannot create the bucket's stream");
        if let Ok(made) = js.get_stream(&name).await {
            let config = &made.cached_info().config;
            if config.max_age != max_age {
                info!(
                    bucket,
                    was_secs = config.max_age.as_secs(),
                    now_secs = max_age.as_secs(),
                    "cluster: setting the bucket's expiry to this node's"
                );
                let config = jetstream::stream::Config {
                    max_age,
                    ..config.clone()
                };
                if let Err(e) = js.update_stream(config).await {
                    warn!(error = %e, bucket, "cluster: cannot change the bucket's expiry");
                }
            }
        }
    }
    js.get_key_value(bucket).await.map_err(|e| e.to_string())
}
