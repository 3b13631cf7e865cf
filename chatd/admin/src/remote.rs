//! The admin API's side of the cluster's seams: how this node answers the
//! other nodes' admin requests ([`RemoteAnswers`]) and how its events look
//! to their watches ([`EventCodec`]). The cluster carries both as bytes.

use bytes::Bytes;
use chatd_proto::admin::v1 as pb;
use prost::Message;

use super::convert;
use super::service::answer_remote;
use chatd_hub::cluster_state::{AdminHandler, BoxFuture, WatchCodec, WatchItem};
use chatd_hub::hub::{Event, Hub};

/// Answers other nodes' admin requests from this node's hub.
#[derive(Debug, Clone)]
pub struct RemoteAnswers {
    hub: Hub,
}

impl RemoteAnswers {
    pub fn new(hub: Hub) -> RemoteAnswers {
        RemoteAnswers { hub }
    }
}

impl AdminHandler for RemoteAnswers {
    fn answer<'a>(
        &'a self,
        node: &'a str,
        op: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Bytes, (i32, String)>> {
        Box::pin(async move {
            answer_remote(&self.hub, node, op, payload)
                .await
                .map_err(|status| (status.code() as i32, status.message().to_string()))
        })
    }
}

/// Relayed events are the `Event`s the watches receive, encoded, with
/// their node set.
#[derive(Debug, Default, Clone, Copy)]
pub struct EventCodec;

impl WatchCodec<Event> for EventCodec {
    fn encode(&self, item: WatchItem<Event>, node: &str) -> Bytes {
        let event = match item {
            WatchItem::Event(event) => convert::event(event),
            WatchItem::Lagged(missed) => convert::lagged(missed),
        };
        pb::Event {
            node: node.to_string(),
            ..event
        }
        .encode_to_vec()
        .into()
    }

    fn node(&self, payload: &Bytes) -> Option<String> {
        pb::Event::decode(payload.clone()).ok().map(|e| e.node)
    }
}
