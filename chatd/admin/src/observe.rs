//! One span and one counted outcome per admin RPC.
//!
//! A tower layer outside authentication, so refused calls are seen too. The
//! gRPC status is read from the response headers, where tonic puts it for
//! every error (a "trailers-only" response); a response without it is a
//! success whose status travels in the trailers.
//!
//! The path a peer sends is not trusted before authentication: the metric
//! label and the span name are a known method or `"unknown"`, so made-up
//! paths cannot grow the label set (and the memory behind it) without bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::codegen::http;
use tracing::Instrument;
use tracing::field::Empty;

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = known(request.uri().path());
        let span = tracing::info_span!(
            "admin_rpc",
            otel.name = %format_args!("/{service}/{method}"),
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status = Empty,
        );
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let recorded = span.clone();
        Box::pin(
            async move {
                let result = call.await;
                let status = match &result {
                    Ok(response) => status_name(response.headers()),
                    Err(_) => "UNKNOWN",
                };
                recorded.record("rpc.grpc.status", status);
                admin_rpc(method, status);
                result
            }
            .instrument(span),
        )
    }
}

/// The methods served, by service; anything else is `("unknown", "unknown")`.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "chatd.admin.v1.Admin",
        &[
            "ListClients",
            "GetClient",
            "KickClient",
            "Broadcast",
            "ListRooms",
            "GetStats",
            "Ban",
            "Unban",
            "ListBans",
            "WatchEvents",
            "Reload",
            "ListNodes",
            "Upgrade",
        ],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

/// The service and method of `path` when chatd serves it, else "unknown".
fn known(path: &str) -> (&'static str, &'static str) {
    const UNKNOWN: (&str, &str) = ("unknown", "unknown");
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return UNKNOWN;
    };
    KNOWN
        .iter()
        .find(|(s, _)| *s == service)
        .and_then(|(s, methods)| methods.iter().find(|m| **m == method).map(|m| (*s, *m)))
        .unwrap_or(UNKNOWN)
}

/// The gRPC status of a response, by its canonical name.
fn status_name(headers: &http::HeaderMap) -> &'static str {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return "OK";
    };
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    method: String,
    status: String,
}

/// Admin API calls by method and status, registered by the metrics
/// endpoint (`admin_rpcs`).
pub static ADMIN_RPCS: LazyLock<Family<RpcLabels, Counter>> = LazyLock::new(Family::default);

/// Counts one admin RPC by method (e.g. `"Kick"`) and status code name
/// (e.g. `"OK"`, `"NOT_FOUND"`).
pub fn admin_rpc(method: &str, status: &str) {
    ADMIN_RPCS
        .get_or_create(&RpcLabels {
            method: method.to_string(),
            status: status.to_string(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn only_served_methods_are_named() {
        assert_eq!(
            known("/chatd.admin.v1.Admin/Ban"),
            ("chatd.admin.v1.Admin", "Ban")
        );
        assert_eq!(known("/chatd.admin.v1.Admin/x9f3"), ("unknown", "unknown"));
        assert_eq!(known("/evil/Ban"), ("unknown", "unknown"));
        assert_eq!(known("/"), ("unknown", "unknown"));
    }

    #[test]
    fn every_method_of_the_admin_service_is_known() {
        let set = prost_types::FileDescriptorSet::decode(chatd_proto::FILE_DESCRIPTOR_SET)
            .expect("valid descriptor set");
        for file in set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{name}/{}", method.name());
                    assert_ne!(known(&path).1, "unknown", "{path} is not in KNOWN");
                }
            }
        }
    }
}
