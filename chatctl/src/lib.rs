//! `chatctl`, the command-line client of chatd's admin API.
//!
//! Layout:
//! - [`cli`]: the clap definitions, nothing else;
//! - [`token`]: which admin token to send;
//! - [`connect`]: endpoints (TCP, TLS, UNIX socket) and the bearer-token
//!   interceptor;
//! - [`cmd`]: one module per group of calls, each printing a table or JSON;
//! - [`format`]: durations, sizes, times and tables for people;
//! - [`error`]: [`ChatctlError`], its exit codes, and the one conversion from
//!   a gRPC status.
//!
//! `main.rs` only parses arguments, runs [`run`] and maps its error to an exit
//! code, so the tests drive the same code as the binary.

pub mod cli;
pub mod cmd;
pub mod connect;
pub mod error;
pub mod format;
pub mod token;

use std::io::Write;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::cmd::Ctx;
use crate::connect::BearerAuth;
pub use crate::error::ChatctlError;

/// Runs one command, printing its result to `out`. When the call fails in
/// a way a wrong port explains, the endpoint is probed: if it answers like
/// chatd's chat port, the error says so (exit 4) instead of quoting HTTP/2.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), ChatctlError> {
    let endpoint = cli.conn.endpoint.clone();
    let timeout = cli.conn.timeout;
    let started = std::time::Instant::now();
    let heard = Arc::new(AtomicBool::new(false));
    match execute(cli, out, &heard).await {
        Err(err) if err.is_waiting() && !heard.load(Ordering::Relaxed) => {
            Err(ChatctlError::Unreachable {
                endpoint: endpoint.to_string(),
                cause: format!(
                    "nothing answered within {} (the connection was made, but no HTTP/2 \
                     server spoke)",
                    humantime::format_duration(timeout)
                ),
            })
        }
        Err(err) if err.may_be_wrong_endpoint() => {
            // Within what is left of `--timeout`: a listener that never
            // answered has used it all, and gets no second wait.
            let left = timeout.saturating_sub(started.elapsed());
            if !left.is_zero() && connect::is_chat_port(&endpoint, left).await {
                Err(ChatctlError::NotAdmin {
                    endpoint: endpoint.to_string(),
                })
            } else if let ChatctlError::Status { message, .. } = &err
                && (message == "transport error" || message.starts_with("h2 protocol error"))
            {
                // The connection itself failed, or spoke no HTTP/2 (e.g. an
                // HTTP/1 server): the admin API was not reached, the same
                // class as no listener.
                Err(ChatctlError::Unreachable {
                    endpoint: endpoint.to_string(),
                    cause: "the connection failed (transport error), so it may not be chatd's \
                            admin endpoint"
                        .to_owned(),
                })
            } else {
                Err(err)
            }
        }
        result => result,
    }
}

async fn execute(
    cli: Cli,
    out: &mut dyn Write,
    heard: &Arc<AtomicBool>,
) -> Result<(), ChatctlError> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "chatctl", out);
        return Ok(());
    }

    let conn = &cli.conn;
    let token = token::resolve(
        conn.token.as_deref(),
        conn.token_file.as_deref(),
        &chatd_proto::default_token_dirs(),
        &conn.endpoint,
    )?;
    let auth = match &token {
        Some(token) => BearerAuth::new(Some(&token.secret), &token.origin)?,
        None => BearerAuth::default(),
    };
    let channel =
        connect::channel(&conn.endpoint, conn.ca_cert.as_deref(), conn.timeout, heard).await?;
    let admin = chatd_proto::admin::v1::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        auth.clone(),
    );
    let mut ctx = Ctx {
        admin,
        endpoint: conn.endpoint.to_string(),
        timeout: conn.timeout,
        output: cli.output,
        token_origin: token.map(|t| t.origin),
        out,
    };
    let ctx = &mut ctx;
    match cli.command {
        Command::ListClients { room, filter } => cmd::clients::list(ctx, room, filter).await,
        Command::Client { id_or_nick } => cmd::clients::get(ctx, id_or_nick).await,
        Command::Kick { id_or_nick, reason } => cmd::clients::kick(ctx, id_or_nick, reason).await,
        Command::Broadcast { text, room } => cmd::broadcast::run(ctx, text, room).await,
        Command::Rooms => cmd::rooms::list(ctx).await,
        Command::Stats => cmd::stats::show(ctx).await,
        Command::Ban {
            ip_or_cidr,
            duration,
            reason,
        } => cmd::bans::ban(ctx, ip_or_cidr, duration, reason).await,
        Command::Unban { ip_or_cidr } => cmd::bans::unban(ctx, ip_or_cidr).await,
        Command::Bans => cmd::bans::list(ctx).await,
        Command::Watch { messages } => cmd::watch::run(ctx, messages).await,
        Command::Reload => cmd::reload::run(ctx).await,
        Command::Upgrade => cmd::upgrade::run(ctx).await,
        Command::Nodes => cmd::nodes::list(ctx).await,
        Command::Health { service } => cmd::health::check(ctx, channel, auth, service).await,
        Command::Completions { .. } => Ok(()),
    }
}
