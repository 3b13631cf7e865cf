//! The admin API's errors, and the one place they become a `tonic::Status`.

use tonic::Status;

use super::control::ControlError;
use chatd_hub::bans::BanError;
use chatd_hub::hub::HubError;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Ban(#[from] BanError),
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A client addressed on a node, on a chatd that is not in a cluster.
    #[error("no node {0:?}: this chatd is not part of a cluster; name the client without a node")]
    NoSuchNode(String),
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The caller's deadline is near and the upgrade it started goes on.
    #[error(
        "the upgrade is still running ({0} ms so far) and goes on without this call; its \
         outcome is logged (`upgrade: handed over` or `upgrade failed`)"
    )]
    UpgradeRunning(u64),
    /// A blocking task died (a bug); the operator sees a plain internal error.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let message = e.to_string();
        match e {
            AdminError::Hub(HubError::NoSuchClient(_) | HubError::NoSuchRoom(_))
            | AdminError::NoSuchNode(_)
            | AdminError::Ban(BanError::NotFound(_)) => Status::not_found(message),
            AdminError::Hub(HubError::Invalid(_))
            | AdminError::Ban(BanError::BadTarget(_) | BanError::AlreadyExpired)
            | AdminError::Control(ControlError::Config(_))
            | AdminError::BadRequest(_) => Status::invalid_argument(message),
            AdminError::Ban(
                BanError::Read { .. }
                | BanError::Invalid { .. }
                | BanError::Write { .. }
                | BanError::UnsafeDir { .. },
            )
            | AdminError::Internal(_) => Status::internal(message),
            AdminError::Control(ControlError::Busy(_)) | AdminError::UpgradeRunning(_) => {
                Status::aborted(message)
            }
            AdminError::Control(ControlError::Upgrade(_)) => Status::failed_precondition(message),
        }
    }
}
