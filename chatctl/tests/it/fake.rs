//! chatctl against a stand-in admin server: real gRPC, fixed answers. It
//! checks what chatctl sends (the bearer token, the selectors) and how it
//! prints what comes back, without needing chatd.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use chatd_proto::admin::v1 as pb;
use pb::admin_server::{Admin, AdminServer};
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::{stderr, stdout};

const TOKEN: &str = "s3cret";

struct Fake;

fn authorise<T>(request: &Request<T>) -> Result<(), Status> {
    let expected = format!("Bearer {TOKEN}");
    match request.metadata().get("authorization") {
        Some(value) if value.as_bytes() == expected.as_bytes() => Ok(()),
        _ => Err(Status::unauthenticated("unknown token")),
    }
}

fn alice() -> pb::Client {
    let connected = SystemTime::now() - Duration::from_secs(192);
    pb::Client {
        id: 1,
        nick: "alice".into(),
        peer_addr: "127.0.0.1:50312".into(),
        room: "lobby".into(),
        connected_at: Some(connected.into()),
        last_active_at: Some(connected.into()),
        lines_in: 14,
        lines_out: 40,
        bytes_in: 612,
        bytes_out: 2150,
        queue_bytes: 0,
        tls: false,
        node: String::new(),
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Admin for Fake {
    async fn list_clients(
        &self,
        request: Request<pb::ListClientsRequest>,
    ) -> Reply<pb::ListClientsResponse> {
        authorise(&request)?;
        let clients = match request.get_ref().room.as_str() {
            "" | "lobby" => vec![alice()],
            _ => vec![],
        };
        Ok(Response::new(pb::ListClientsResponse {
            clients,
            ..Default::default()
        }))
    }

    async fn get_client(
        &self,
        request: Request<pb::GetClientRequest>,
    ) -> Reply<pb::GetClientResponse> {
        authorise(&request)?;
        use pb::client_selector::Selector;
        let selector = request.into_inner().client.and_then(|c| c.selector);
        match selector {
            Some(Selector::Id(1)) => {}
            Some(Selector::Nick(nick)) if nick.eq_ignore_ascii_case("alice") => {}
            _ => return Err(Status::not_found("no such client")),
        }
        Ok(Response::new(pb::GetClientResponse {
            client: Some(alice()),
            ..Default::default()
        }))
    }

    async fn kick_client(
        &self,
        request: Request<pb::KickClientRequest>,
    ) -> Reply<pb::KickClientResponse> {
        authorise(&request)?;
        Err(Status::permission_denied("the read role cannot kick"))
    }

    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Reply<pb::BroadcastResponse> {
        authorise(&request)?;
        Ok(Response::new(pb::BroadcastResponse {
            delivered: 1,
            answered_nodes: Vec::new(),
        }))
    }

    async fn list_rooms(
        &self,
        request: Request<pb::ListRoomsRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        authorise(&request)?;
        Ok(Response::new(pb::ListRoomsResponse::default()))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Reply<pb::GetStatsResponse> {
        authorise(&request)?;
        Ok(Response::new(pb::GetStatsResponse {
            version: "0.1.0".into(),
            uptime: Some(prost_types::Duration {
                seconds: 3 * 86_400 + 4 * 3600,
                nanos: 0,
            }),
            clients: 1,
            peak_clients: 2,
            ..Default::default()
        }))
    }

    async fn ban(&self, request: Request<pb::BanRequest>) -> Reply<pb::BanResponse> {
        authorise(&request)?;
        let request = request.into_inner();
        let expires_at = match request.expiry {
            Some(pb::ban_request::Expiry::Duration(d)) => {
                let span =
                    Duration::try_from(d).map_err(|_| Status::invalid_argument("bad duration"))?;
                Some((SystemTime::now() + span).into())
            }
            _ => None,
        };
        Ok(Response::new(pb::BanResponse {
            ban: Some(pb::BanEntry {
                target: request.target,
                reason: request.reason,
                created_at: Some(SystemTime::now().into()),
                expires_at,
            }),
            kicked: 2,
            answered_nodes: Vec::new(),
        }))
    }

    async fn unban(&self, request: Request<pb::UnbanRequest>) -> Reply<pb::UnbanResponse> {
        authorise(&request)?;
        Err(Status::not_found("no ban on that target"))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Reply<pb::ListNodesResponse> {
        authorise(&request)?;
        // The same uptime as `stats` gives, so that the two can be compared.
        let node = pb::Node {
            id: "node-a".into(),
            clients: 1,
            uptime: Some(prost_types::Duration {
                seconds: 3 * 86_400 + 4 * 3600 + 5,
                nanos: 0,
            }),
            version: "0.1.0".into(),
        };
        Ok(Response::new(pb::ListNodesResponse {
            nodes: vec![node],
            ..Default::default()
        }))
    }

    async fn list_bans(
        &self,
        request: Request<pb::ListBansRequest>,
    ) -> Reply<pb::ListBansResponse> {
        authorise(&request)?;
        Ok(Response::new(pb::ListBansResponse::default()))
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Reply<Self::WatchEventsStream> {
        authorise(&request)?;
        let at = Some(SystemTime::now().into());
        let events = vec![
            Ok(pb::Event {
                at,
                kind: Some(pb::event::Kind::Connected(pb::Connected {
                    client_id: 7,
                    nick: "guest-7".into(),
                    peer_addr: "127.0.0.1:4000".into(),
                })),
                node: String::new(),
            }),
            Ok(pb::Event {
                at,
                kind: Some(pb::event::Kind::Lagged(pb::Lagged { missed: 12 })),
                // As a node of a cluster sends another node's event.
                node: "node-b".into(),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn reload(&self, request: Request<pb::ReloadRequest>) -> Reply<pb::ReloadResponse> {
        authorise(&request)?;
        Err(Status::invalid_argument(
            "limits.max_clients: must be at least 1, got 0",
        ))
    }

    async fn upgrade(&self, request: Request<pb::UpgradeRequest>) -> Reply<pb::UpgradeResponse> {
        authorise(&request)?;
        Err(Status::failed_precondition(
            "the new process failed: chatd: invalid configuration",
        ))
    }
}

/// Serves the stand-in on a fresh port; returns its endpoint.
async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding port 0 works");
    let endpoint = format!("http://{}", listener.local_addr().expect("bound"));
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(AdminServer::new(Fake))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    endpoint
}

/// Runs the binary against `endpoint` off the async threads.
async fn chatctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--endpoint".to_owned(), endpoint.to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        crate::chatctl(&args)
    })
    .await
    .expect("the chatctl task does not panic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_clients_as_json_and_as_a_table() {
    let endpoint = serve().await;
    let output = chatctl(&endpoint, &["ls", "-o", "json", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let doc: serde_json::Value =
        serde_json::from_str(&stdout(&output)).expect("stdout is one JSON document");
    assert_eq!(doc["clients"][0]["nick"], "alice");
    assert_eq!(doc["clients"][0]["bytes_out"], 2150);
    assert!(
        doc["clients"][0]["connected_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let output = chatctl(&endpoint, &["ls", "--token", TOKEN]).await;
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID  NICK"), "{text}");
    assert!(
        lines[1].contains("alice") && lines[1].contains("3m12s"),
        "{text}"
    );

    let output = chatctl(&endpoint, &["ls", "--room", "empty", "--token", TOKEN]).await;
    assert_eq!(
        stdout(&output).lines().count(),
        1,
        "an empty list prints its header only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_become_exit_codes() {
    let endpoint = serve().await;

    let output = chatctl(&endpoint, &["client", "bob", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("no such client"));

    let output = chatctl(&endpoint, &["client", "ALICE", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let output = chatctl(&endpoint, &["stats", "--token", "wrong"]).await;
    assert_eq!(output.status.code(), Some(5));
    assert!(
        stderr(&output).contains("hint: pass the admin token with --token"),
        "{}",
        stderr(&output)
    );

    let output = chatctl(&endpoint, &["kick", "alice", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(5));
    assert!(
        stderr(&output).contains("admin role"),
        "{}",
        stderr(&output)
    );

    let output = chatctl(&endpoint, &["unban", "10.0.0.1", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(3));

    let output = chatctl(&endpoint, &["reload", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("limits.max_clients"),
        "{}",
        stderr(&output)
    );
    assert_eq!(stdout(&output), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_stats_watch_and_health() {
    let endpoint = serve().await;

    let output = chatctl(
        &endpoint,
        &["ban", "203.0.113.0/24", "--for", "1h", "--token", TOKEN],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("banned 203.0.113.0/24 (expires in 59m") && text.contains("kicked 2"),
        "{text}"
    );

    let output = chatctl(&endpoint, &["stats", "--token", TOKEN]).await;
    assert!(
        stdout(&output).contains("uptime:         3d04h"),
        "{}",
        stdout(&output)
    );
    // Deliveries, not a client's "lines out": named apart.
    assert!(
        stdout(&output).contains(" delivered\n"),
        "{}",
        stdout(&output)
    );
    // Uptime is written one way everywhere.
    let output = chatctl(&endpoint, &["nodes", "--token", TOKEN]).await;
    assert!(
        stdout(&output).contains("node-a        1   3d04h  0.1.0"),
        "{}",
        stdout(&output)
    );

    let output = chatctl(&endpoint, &["watch", "-o", "json", "--token", TOKEN]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let types: Vec<(String, Option<String>)> = stdout(&output)
        .lines()
        .map(|line| {
            let event: serde_json::Value =
                serde_json::from_str(line).expect("one JSON document per line");
            (
                event["type"].as_str().unwrap_or_default().to_owned(),
                event["node"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("connect".into(), None),
            ("lagged".into(), Some("node-b".into()))
        ],
        "the node only when there is one"
    );
    let output = chatctl(&endpoint, &["watch", "--token", TOKEN]).await;
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("Z  connect     #7 guest-7 from 127.0.0.1:4000"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("Z  node-b  lagged      missed 12 events"),
        "{lines:?}"
    );

    let output = chatctl(&endpoint, &["health"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "SERVING\n");
}
