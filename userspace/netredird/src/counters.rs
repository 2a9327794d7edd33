//! The daemon's and each VM's own counters, as typed fields: a misspelt
//! counter is a compile error, and `status` and the metrics list them all
//! by their field names.

use std::sync::atomic::{AtomicU64, Ordering};

/// Declares a counter struct with a `pairs()` listing of its fields.
macro_rules! counters {
    (
        $(#[$meta:meta])* $name:ident of $ty:ty, read $read:expr;
        $($(#[doc = $doc:literal])* $field:ident,)*
    ) => {
        $(#[$meta])*
        #[derive(Default, Debug)]
        pub struct $name {
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl $name {
            /// Every counter with its name, in declaration order.
            pub fn pairs(&self) -> Vec<(&'static str, u64)> {
                let read = $read;
                vec![$((stringify!($field), read(&self.$field)),)*]
            }
        }
    };
}

counters! {
    /// The daemon's counters: tunnel connections before a VM is known,
    /// shared by the workers (bumped per connection event, not per frame).
    DaemonCounters of AtomicU64, read |c: &AtomicU64| c.load(Ordering::Relaxed);
    /// Connections accepted.
    tunnel_connections,
    /// Connections refused or dropped before authentication, all reasons.
    tunnel_refused,
    /// ... because too many were in their handshake (from one address).
    tunnel_refused_handshake_limit,
    /// ... because the handshake did not finish in time.
    tunnel_refused_slow_handshake,
    /// ... because the peer did not speak TLS.
    tunnel_refused_not_tls,
    /// ... because TLS failed (an unknown or broken certificate).
    tunnel_refused_tls,
    /// ... because the agent speaks another protocol version.
    tunnel_refused_version,
    /// ... because the preamble broke the protocol.
    tunnel_refused_protocol,
    /// ... because the agent's key is paired with no VM here.
    tunnel_refused_unpaired,
    /// ... because the pairing code was wrong, used or expired.
    tunnel_refused_bad_code,
    /// Agents told "not now": their VM is not attached.
    tunnel_later_vm_detached,
    /// Accepts postponed: no descriptor was left.
    tunnel_accept_backoffs,
    /// Agents paired.
    pairings,
    /// Bytes received on all tunnel connections.
    tunnel_bytes_in,
    /// Bytes sent on all tunnel connections.
    tunnel_bytes_out,
}

counters! {
    /// One VM's own counters (its engine, socket and session have theirs).
    VmCounters of u64, read |c: &u64| *c;
    /// Bytes received on its tunnel connections.
    tunnel_bytes_in,
    /// Bytes sent on its tunnel connections.
    tunnel_bytes_out,
    /// Its agent went silent for three heartbeats.
    heartbeat_timeouts,
    /// Its agent broke the record protocol.
    tunnel_protocol_errors,
    /// Opens its agent refused.
    refused_opens,
    /// Flow messages for flows already gone (races, normal).
    flow_messages_ignored,
}

/// Adds one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n`.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads it.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_name_every_field_with_its_value() {
        let d = DaemonCounters::default();
        inc(&d.tunnel_refused);
        add(&d.tunnel_bytes_in, 5);
        let p = d.pairs();
        assert_eq!(p.len(), 15);
        assert!(p.contains(&("tunnel_refused", 1)));
        assert!(p.contains(&("tunnel_bytes_in", 5)));
        let v = VmCounters {
            refused_opens: 2,
            ..Default::default()
        };
        assert_eq!(v.pairs()[4], ("refused_opens", 2));
    }
}
