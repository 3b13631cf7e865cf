//! One module per group of admin calls. Each command makes its call through
//! [`Ctx`], turns the reply into a serialisable view, and prints that view
//! as a table or as JSON.

pub mod bans;
pub mod broadcast;
pub mod clients;
pub mod health;
pub mod nodes;
pub mod reload;
pub mod rooms;
pub mod stats;
pub mod upgrade;
pub mod watch;

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use crate::cli::Output;
use crate::connect::Admin;
use crate::error::ChatctlError;

/// What every command needs: the client, the output format and the limits.
pub struct Ctx<'a> {
    pub admin: Admin,
    pub endpoint: String,
    pub timeout: Duration,
    pub output: Output,
    /// Where the token came from; `None` when no token was sent.
    pub token_origin: Option<String>,
    pub out: &'a mut dyn Write,
}

impl Ctx<'_> {
    /// A request that tells chatd how long we wait.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Awaits a call within `--timeout` and converts its failure.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ChatctlError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.status(status)),
            Err(_elapsed) => Err(ChatctlError::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: self.timeout,
            }),
        }
    }

    pub fn status(&self, status: tonic::Status) -> ChatctlError {
        let mut err = ChatctlError::from_status(status, &self.endpoint, self.timeout);
        if let ChatctlError::Unauthorised { message, .. } = &mut err {
            match &self.token_origin {
                Some(origin) => message.push_str(&format!(" (token from {origin})")),
                None => {
                    message.push_str(" (no token was sent: none given and no token file found)")
                }
            }
        }
        err
    }

    /// Prints `view` as one JSON document.
    pub fn json(&mut self, view: &impl Serialize) -> Result<(), ChatctlError> {
        serde_json::to_writer_pretty(&mut *self.out, view)
            .map_err(|e| ChatctlError::Output(e.into()))?;
        writeln!(self.out).map_err(ChatctlError::Output)
    }
}

/// Maps a write error of the table printers.
pub fn written(result: std::io::Result<()>) -> Result<(), ChatctlError> {
    result.map_err(ChatctlError::Output)
}

/// In cluster mode, one line on stderr naming the nodes whose data a reply
/// holds: a node that did not answer in time is simply not among them, so
/// the operator sees a partial answer for what it is. Silent in
/// single-node mode (no nodes named).
pub fn note_answered(nodes: &[String]) {
    note_partial(nodes, &[]);
}

/// As [`note_answered`], naming also the nodes known to be there that did
/// not answer in time (`missing`).
pub fn note_partial(nodes: &[String], missing: &[String]) {
    if nodes.is_empty() && missing.is_empty() {
        return;
    }
    let names = |list: &[String]| {
        list.iter()
            .map(|n| crate::format::clean(n).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tail = if missing.is_empty() {
        "a node that did not answer in time is left out".to_owned()
    } else {
        format!("PARTIAL: no answer in time from {}", names(missing))
    };
    eprintln!(
        "note: answered by {} node{}: {} ({tail})",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        names(nodes),
    );
}
