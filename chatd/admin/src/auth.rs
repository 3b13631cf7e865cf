//! Who may call what: bearer tokens with a role, checked by a tower layer in
//! front of every service on the admin listener.
//!
//! The layer sees the gRPC path, so the decision is made in one place and
//! denies by default: health and reflection are public, the read-only
//! methods of `chatd.admin.v1.Admin` need any token, and every other path
//! (including methods added later) needs an `admin` token. Tokens are
//! compared in constant time; the caller's token *name* travels to the
//! service in the request's extensions, for the audit log.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::codegen::http::{self, HeaderMap};
use tracing::info;

use chatd_config::{Role, TokenConfig};
use chatd_hub::rate_log::RateLimitedLog;

/// Who is calling; found in every authorised request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: Role,
}

/// The tokens the admin API accepts.
#[derive(Debug)]
pub struct Tokens {
    entries: Vec<TokenConfig>,
}

const ADMIN_PREFIX: &str = "/chatd.admin.v1.Admin/";
const PUBLIC_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];
const READ_METHODS: &[&str] = &[
    "ListClients",
    "GetClient",
    "ListRooms",
    "GetStats",
    "ListBans",
    "WatchEvents",
    "ListNodes",
];

/// The role a call to `path` needs; `None`: no token needed.
fn required_role(path: &str) -> Option<Role> {
    if PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return None;
    }
    match path.strip_prefix(ADMIN_PREFIX) {
        Some(method) if READ_METHODS.contains(&method) => Some(Role::Read),
        _ => Some(Role::Admin),
    }
}

impl Tokens {
    pub fn new(entries: Vec<TokenConfig>) -> Tokens {
        Tokens { entries }
    }

    /// The token matching `presented`. Every configured token is compared,
    /// each in constant time, so timing tells nothing about which matched.
    fn identify(&self, presented: &[u8]) -> Option<&TokenConfig> {
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.secret.as_bytes().ct_eq(presented)) {
                found = Some(entry);
            }
        }
        found
    }

    /// Decides a call: `Ok(None)` for a public path, the caller when its
    /// token may call `path`, else the status to answer.
    pub fn authorize(&self, path: &str, headers: &HeaderMap) -> Result<Option<Caller>, Status> {
        let Some(needed) = required_role(path) else {
            return Ok(None);
        };
        let Some(presented) = bearer(headers) else {
            log_refusal(path, "admin call without a token refused");
            return Err(Status::unauthenticated(
                "no token: send `authorization: Bearer TOKEN`",
            ));
        };
        let Some(entry) = self.identify(presented) else {
            log_refusal(path, "admin call with an unknown token refused");
            return Err(Status::unauthenticated("unknown token"));
        };
        if entry.role < needed {
            info!(path, token = %entry.name, "admin call refused: role too weak");
            return Err(Status::permission_denied(format!(
                "token {:?} has the {} role; {} needs the {needed} role",
                entry.name,
                entry.role,
                path.trim_start_matches('/'),
            )));
        }
        Ok(Some(Caller {
            name: entry.name.as_str().into(),
            role: entry.role,
        }))
    }
}

/// Refusals of unauthenticated calls logged at most once a second.
static REFUSALS: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(1));
/// Longest part of a refused call's path that is logged, in bytes.
const LOGGED_PATH_BYTES: usize = 96;

/// Logs a refused call with its path cut short and cleaned: it comes from
/// a peer that has not shown a token, and may repeat it at will.
fn log_refusal(path: &str, message: &'static str) {
    let Some(suppressed) = REFUSALS.allow() else {
        return;
    };
    let mut end = path.len().min(LOGGED_PATH_BYTES);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let path = chatd_text::sanitize::clean(&path[..end]);
    info!(path, suppressed, "{message}");
}

/// The token of `authorization: Bearer TOKEN` (scheme matched ignoring case).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The tower layer that applies [`Tokens`] to every request.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    tokens: Arc<Tokens>,
}

impl AuthLayer {
    pub fn new(tokens: Arc<Tokens>) -> AuthLayer {
        AuthLayer { tokens }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<Tokens>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self
            .tokens
            .authorize(request.uri().path(), request.headers())
        {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(vec![
            TokenConfig {
                name: "ops".into(),
                secret: "admin-secret-0123456789".into(),
                role: Role::Admin,
            },
            TokenConfig {
                name: "monitoring".into(),
                secret: "read-secret-0123456789".into(),
                role: Role::Read,
            },
        ])
    }

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(
                http::header::AUTHORIZATION,
                v.parse().expect("header value"),
            );
        }
        h
    }

    #[test]
    fn roles_decide_per_method_and_unknown_paths_need_admin() {
        let t = tokens();
        let read = headers(Some("Bearer read-secret-0123456789"));
        let admin = headers(Some("bearer admin-secret-0123456789"));
        let code = |path: &str, h: &HeaderMap| t.authorize(path, h).err().map(|s| s.code());
        assert_eq!(code("/chatd.admin.v1.Admin/ListClients", &read), None);
        assert_eq!(
            code("/chatd.admin.v1.Admin/KickClient", &read),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code("/chatd.admin.v1.Admin/Future", &read),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(code("/chatd.admin.v1.Admin/KickClient", &admin), None);
        assert_eq!(
            code("/chatd.admin.v1.Admin/ListClients", &headers(None)),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(
                "/chatd.admin.v1.Admin/ListClients",
                &headers(Some("Bearer nope"))
            ),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(code("/grpc.health.v1.Health/Check", &headers(None)), None);
        let caller = t
            .authorize("/chatd.admin.v1.Admin/Ban", &admin)
            .expect("allowed")
            .expect("a caller");
        assert_eq!(&*caller.name, "ops");
    }
}
