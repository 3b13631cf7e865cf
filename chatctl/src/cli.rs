//! The command line: global connection flags and one subcommand per admin
//! call. Parsing only; [`crate::run`] does the work.

use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::connect::EndpointAddr;

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  error (the message says what went wrong)
  2  usage error
  3  not found (no such client or ban)
  4  cannot reach chatd's admin API (nothing listening, or not an admin
     endpoint, e.g. the chat port)
  5  not authorised (see --token and --token-file)

The token: --token, else --token-file, else the token chatd generated (when
none is configured) for this very endpoint, found in $RUNTIME_DIRECTORY,
/run/chatd, $XDG_RUNTIME_DIR/chatd or /tmp/chatd-$UID as
admin-<IP>-<PORT>.token (admin-unix-<hash>.token for a socket). A generated
token is never sent to any other endpoint.
A flag given on the command line beats one from the environment.";

/// Inspect and steer a running chatd through its admin API.
#[derive(Debug, Parser)]
#[command(name = "chatctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnectionArgs,

    /// Output format; json prints one document (one per line for `watch`).
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments, exiting on a usage error (code 2).
    pub fn parse_args() -> Self {
        let matches = Self::command().get_matches();
        match Self::from_arg_matches(&matches) {
            Ok(cli) => cli.prefer_command_line(&matches),
            Err(err) => err.exit(),
        }
    }

    /// `--token-file` on the command line beats `CHATCTL_TOKEN` from the
    /// environment, as any flag beats the environment.
    fn prefer_command_line(mut self, matches: &ArgMatches) -> Self {
        let source = |id: &str| matches.value_source(id);
        if source("token") == Some(ValueSource::EnvVariable)
            && source("token_file") == Some(ValueSource::CommandLine)
        {
            self.conn.token = None;
        }
        self
    }
}

/// How to reach chatd and prove who we are.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// The admin API: http://HOST:PORT, https://HOST:PORT or unix:/PATH.
    #[arg(
        long,
        global = true,
        env = "CHATCTL_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        value_parser = EndpointAddr::parse,
    )]
    pub endpoint: EndpointAddr,

    /// The admin token (sent as `authorization: Bearer TOKEN`).
    #[arg(long, global = true, env = "CHATCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the admin token from this file.
    #[arg(long, global = true, env = "CHATCTL_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Trust this CA certificate (PEM) for an https:// endpoint instead of
    /// the system's roots.
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,

    /// Give up on connecting or on a reply after this long (e.g. 500ms, 5s).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Table: aligned columns for people. Json: stable, for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List connected clients.
    #[command(visible_alias = "ls")]
    ListClients {
        /// Only clients in this room.
        #[arg(long)]
        room: Option<String>,
        /// Only clients whose nick or address contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Show one client, on whichever node it is.
    Client {
        /// A client id (digits), NODE:ID in cluster mode, or a nick.
        id_or_nick: ClientRef,
    },
    /// Disconnect a client, on whichever node it is.
    Kick {
        /// A client id (digits), NODE:ID in cluster mode, or a nick.
        id_or_nick: ClientRef,
        /// Shown to the client and its room.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Send a server notice to everyone, or to one room.
    Broadcast {
        text: String,
        /// Only this room.
        #[arg(long)]
        room: Option<String>,
    },
    /// List rooms.
    Rooms,
    /// Show server statistics.
    Stats,
    /// Ban an address or network and disconnect its clients.
    Ban {
        /// An IP address (192.0.2.7) or a CIDR network (192.0.2.0/24).
        #[arg(value_parser = ip_or_cidr)]
        ip_or_cidr: String,
        /// Lift the ban after this long (e.g. 30m, 1h, 7d); default: never.
        #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Why; kept with the ban.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a ban.
    Unban {
        /// As given to `ban`.
        #[arg(value_parser = ip_or_cidr)]
        ip_or_cidr: String,
    },
    /// List bans in force.
    Bans,
    /// Stream events (connects, joins, kicks, ...) until interrupted.
    Watch {
        /// Also stream chat messages.
        #[arg(long)]
        messages: bool,
    },
    /// Make chatd re-read its config file.
    Reload,
    /// Replace chatd by the binary now at its path, keeping every connection
    ///
    /// The running chatd starts the binary at its own path with the same
    /// arguments and hands it every listener and every client with its
    /// state: nobody is disconnected. If the new process fails before it
    /// serves, the running chatd serves on and its error is shown (exit 1).
    Upgrade,
    /// List the cluster's nodes that answer, with their clients and uptime.
    Nodes,
    /// Check health with the standard gRPC health service; exit 0 when
    /// SERVING, 1 when not, 3 for a service chatd does not know.
    Health {
        /// The service to ask about; the whole server by default.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

/// An IP address or a CIDR network, checked here so that a typo is a
/// usage error (exit 2) before anything is sent.
fn ip_or_cidr(text: &str) -> Result<String, String> {
    const WANT: &str =
        "expected an IP address (192.0.2.7, 2001:db8::1) or a network (192.0.2.0/24)";
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| WANT.to_owned())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.map(str::parse::<u8>) {
        None => Ok(text.to_owned()),
        Some(Ok(n)) if n <= max => Ok(text.to_owned()),
        Some(_) => Err(format!("{WANT}; the prefix length is 0 to {max}")),
    }
}

/// A client named on the command line: digits are an id, anything else a
/// nick (nicks start with a letter, so the two never clash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRef {
    Id(u64),
    /// `NODE:ID`: a client of one node of a cluster (ids are per node).
    NodeId(String, u64),
    Nick(String),
}

impl std::str::FromStr for ClientRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("expected a client id or a nick".into());
        }
        if let Some((node, id)) = s.rsplit_once(':')
            && !node.is_empty()
            && !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_digit())
        {
            return id
                .parse()
                .map(|id| ClientRef::NodeId(node.to_owned(), id))
                .map_err(|_| format!("client id {id} is out of range"));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse()
                .map(ClientRef::Id)
                .map_err(|_| format!("client id {s} is out of range"))
        } else {
            Ok(ClientRef::Nick(s.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClientRef;

    #[test]
    fn a_client_is_an_id_a_node_and_id_or_a_nick() {
        assert_eq!("7".parse(), Ok(ClientRef::Id(7)));
        assert_eq!(
            "node-b:7".parse(),
            Ok(ClientRef::NodeId("node-b".into(), 7))
        );
        assert_eq!("alice".parse(), Ok(ClientRef::Nick("alice".into())));
        assert_eq!(":7".parse(), Ok(ClientRef::Nick(":7".into())));
        assert!("n:99999999999999999999".parse::<ClientRef>().is_err());
    }
}
