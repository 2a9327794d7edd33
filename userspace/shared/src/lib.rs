//! What the two daemons and the CLI share, none of it doing I/O except the
//! control client.
//!
//! - [`wire`]: the tunnel's messages and their codec (bytes in, messages
//!   out; messages in, bytes out).
//! - [`link`]: one tunnel connection: TLS, a preamble, then records.
//! - [`endpoint`]: each side of the tunnel as one sans-IO value: session,
//!   connection, preamble, heartbeats, grace and resume.
//! - [`pairing`]: which agent keys may reach which VM; one-time codes.
//! - [`session`]: records, acknowledgements, replay and per-flow
//!   compression on top of the messages.
//! - [`export`]: parsing `--export NAME=HOST:PORT` as the agent takes it.
//! - [`http_rewrite`]: per-flow HTTP/IPP rewriting at the agent, so a printer
//!   that checks `Host` accepts the guest's virtual name.
//! - [`vip`]: the one place that turns a resource's key into its vIP, and
//!   each VM's vIPs as the host keeps them.
//! - [`control`]: the control API's requests and answers (line-delimited
//!   JSON on a unix socket) and a small blocking client for it.
//! - [`subnet`]: IPv4 prefixes as the daemons take them on the command line.
//! - [`tls`]: the tunnel's TLS 1.3, sans-IO, both sides pinned by
//!   certificate fingerprint; identities on disk and pairing codes.
//! - `docs` (feature `docs`): man pages and shell completions for the
//!   package, from each binary's clap definition.

pub mod control;
#[cfg(feature = "docs")]
pub mod docs;
pub mod endpoint;
pub mod export;
pub mod http_rewrite;
pub mod link;
pub mod pairing;
pub mod session;
pub mod subnet;
pub mod tls;
pub mod vip;
pub mod wire;
