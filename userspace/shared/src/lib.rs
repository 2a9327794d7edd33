//! What the two daemons and the CLI share, none of it doing I/O except the
//! control client.
//!
//! - [`wire`]: the tunnel's messages and their codec (bytes in, messages
//!   out; messages in, bytes out).
//! - [`export`]: parsing `--export NAME=HOST:PORT` as the agent takes it.
//! - [`vip`]: the one function that turns a resource name into its vIP.
//! - [`control`]: the control API's requests and answers (line-delimited
//!   JSON on a unix socket) and a small blocking client for it.
//! - [`subnet`]: IPv4 prefixes as the daemons take them on the command line.

pub mod control;
pub mod export;
pub mod subnet;
pub mod vip;
pub mod wire;
