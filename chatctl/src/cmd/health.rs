//! `health`: the standard `grpc.health.v1.Health/Check`, as load balancers
//! and `grpc_health_probe` ask it.

use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{Ctx, written};
use crate::cli::Output;
use crate::connect::BearerAuth;
use crate::error::ChatctlError;

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

pub async fn check(
    ctx: &mut Ctx<'_>,
    channel: tonic::transport::Channel,
    auth: BearerAuth,
    service: String,
) -> Result<(), ChatctlError> {
    let mut health = HealthClient::with_interceptor(channel, auth);
    let request = ctx.request(HealthCheckRequest { service });
    let reply = ctx.call(health.check(request)).await?;
    let status = ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown);
    let name = status.as_str_name();
    if ctx.output == Output::Json {
        ctx.json(&Health { status: name })?;
    } else {
        written(writeln!(ctx.out, "{name}"))?;
    }
    match status {
        ServingStatus::Serving => Ok(()),
        _ => Err(ChatctlError::NotServing(name.to_owned())),
    }
}
