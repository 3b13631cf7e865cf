//! Everything that can go wrong, each with the exit code and the hint an
//! operator needs. The one place a `tonic::Status` becomes a [`ChatctlError`].

use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;

/// Process exit codes; documented in `--help` and docs/ADMIN.md.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const UNAUTHORISED: u8 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum ChatctlError {
    #[error("{0}")]
    Usage(String),

    #[error("cannot reach chatd at {endpoint}: {cause}; is chatd running?")]
    Unreachable { endpoint: String, cause: String },

    #[error("{endpoint} is not a chatd admin endpoint: it answered like chatd's chat port")]
    NotAdmin { endpoint: String },

    #[error(
        "{endpoint} does not speak TLS: the admin API listens in plain HTTP/2 unless \
         `admin.tls_cert` is set; use http:// instead of https://"
    )]
    NotTls { endpoint: String },

    #[error("chatd at {endpoint} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout { endpoint: String, timeout: Duration },

    #[error("not found: {0}")]
    NotFound(String),

    #[error("not authorised: {message}")]
    Unauthorised {
        message: String,
        role_too_weak: bool,
    },

    #[error("{}: {message}", in_words(*.code))]
    Status { code: Code, message: String },

    #[error("cannot read the token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("the token from {origin} is not usable: {reason}")]
    BadToken { origin: String, reason: String },

    #[error("cannot read the CA certificate {}: {source}", path.display())]
    CaCert {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("chatd reports {0}")]
    NotServing(String),

    /// chatd did not do it now, and says why (`ABORTED`): an upgrade
    /// already running, or one still running when the call had to end.
    #[error("{0}")]
    NotNow(String),

    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

/// What a gRPC status code means to an operator, without the code's name.
fn in_words(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument | Code::OutOfRange => "chatd refused the request",
        Code::FailedPrecondition => "chatd cannot do that now",
        Code::AlreadyExists => "that exists already",
        Code::ResourceExhausted => "chatd is at one of its limits",
        Code::Unimplemented => "chatd does not know this call (is it an older version?)",
        Code::Cancelled => "the call was cancelled",
        Code::Internal | Code::DataLoss => "chatd failed",
        _ => "chatd answered with an error",
    }
}

impl ChatctlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::NotFound(_) => exit::NOT_FOUND,
            Self::Unreachable { .. } | Self::NotAdmin { .. } | Self::NotTls { .. } => {
                exit::UNREACHABLE
            }
            Self::Unauthorised { .. } => exit::UNAUTHORISED,
            Self::Timeout { .. }
            | Self::Status { .. }
            | Self::TokenFile { .. }
            | Self::BadToken { .. }
            | Self::CaCert { .. }
            | Self::NotServing(_)
            | Self::NotNow(_)
            | Self::Output(_) => exit::ERROR,
        }
    }

    /// What to try next, when there is more to say than the message.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Unauthorised {
                role_too_weak: true,
                ..
            } => Some("this token's role cannot make that change; use a token with the admin role"),
            Self::Unauthorised { .. } => Some(
                "pass the admin token with --token or --token-file (or CHATCTL_TOKEN / \
                 CHATCTL_TOKEN_FILE); without them chatctl sends the token chatd generated \
                 for this --endpoint only, see `chatctl --help`",
            ),
            Self::Timeout { .. } => Some("chatd may be overloaded; try a longer --timeout"),
            Self::NotAdmin { .. } => Some(
                "point --endpoint (or CHATCTL_ENDPOINT) at the admin API: `admin.listen` in \
                 chatd.toml, http://127.0.0.1:50051 by default",
            ),
            _ => None,
        }
    }

    /// Whether the call waited in vain: `--timeout` passed, or the call was
    /// cancelled for it.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::Status {
                    code: Code::Cancelled | Code::DeadlineExceeded,
                    ..
                }
        )
    }

    /// Whether a wrong `--endpoint` (another service's port) could explain
    /// this error: worth a look at what answers there.
    pub fn may_be_wrong_endpoint(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Status { code, .. } => matches!(
                code,
                Code::Unknown
                    | Code::Internal
                    | Code::Unavailable
                    | Code::Unimplemented
                    | Code::Cancelled
            ),
            _ => false,
        }
    }

    /// The one conversion from a gRPC status.
    pub fn from_status(status: tonic::Status, endpoint: &str, timeout: Duration) -> Self {
        let message = match status.message() {
            "" => "chatd gave no details".to_owned(),
            text => text.to_owned(),
        };
        match status.code() {
            Code::NotFound => Self::NotFound(message),
            Code::Unauthenticated => Self::Unauthorised {
                message,
                role_too_weak: false,
            },
            Code::PermissionDenied => Self::Unauthorised {
                message,
                role_too_weak: true,
            },
            Code::Unavailable => Self::Unreachable {
                endpoint: endpoint.to_owned(),
                cause: message,
            },
            Code::Aborted => Self::NotNow(message),
            Code::DeadlineExceeded => Self::Timeout {
                endpoint: endpoint.to_owned(),
                timeout,
            },
            code => Self::Status { code, message },
        }
    }
}
