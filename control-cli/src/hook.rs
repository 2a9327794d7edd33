//! The libvirt hook: `/etc/libvirt/hooks/qemu.d/netredir` runs
//! `netredirctl libvirt-hook DOMAIN OPERATION SUBOP EXTRA` with the
//! domain's XML on stdin. When a domain has `started`, each `<interface>`
//! that carries the user alias `ua-netredir` (shared NIC) or
//! `ua-netredir-dedicated` (a NIC only for netredir) is attached under the
//! domain's name, on the host end libvirt gave it (`<target dev=...>`);
//! when it has `stopped` (or is `release`d), the VM is detached.
//!
//! The domain's name is the VM's identity: stable from boot to boot, where
//! the `vnetN` name is not. A hook that fails never keeps a desktop from
//! starting: it says why on stderr (libvirtd's log) and exits 0.

use anyhow::{Context, Result, bail};

/// The user aliases the hook looks for.
pub const ALIAS_SHARED: &str = "ua-netredir";
/// See [`ALIAS_SHARED`].
pub const ALIAS_DEDICATED: &str = "ua-netredir-dedicated";

/// One NIC to attach: the host end's name and whether it is dedicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Host end (`vnet3`, a tap).
    pub iface: String,
    /// `ua-netredir-dedicated`.
    pub dedicated: bool,
}

/// The netredir NICs of a domain's XML (live XML: with `<target dev>`).
pub fn nics(xml: &str) -> Result<Vec<Nic>> {
    let doc = roxmltree::Document::parse(xml).context("the domain XML does not parse")?;
    let mut out = Vec::new();
    for iface in doc.descendants().filter(|n| {
        n.has_tag_name("interface") && n.parent().is_some_and(|p| p.has_tag_name("devices"))
    }) {
        let child = |tag: &str| iface.children().find(|c| c.has_tag_name(tag));
        let dedicated = match child("alias").and_then(|a| a.attribute("name")) {
            Some(ALIAS_SHARED) => false,
            Some(ALIAS_DEDICATED) => true,
            _ => continue,
        };
        let Some(dev) = child("target").and_then(|t| t.attribute("dev")) else {
            bail!(
                "an interface marked for netredir has no <target dev=...> (is this the live XML?)"
            );
        };
        out.push(Nic {
            iface: dev.to_string(),
            dedicated,
        });
    }
    Ok(out)
}

/// What the hook does for `operation`.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Attach the domain's netredir NICs.
    Attach,
    /// Detach the domain.
    Detach,
    /// Nothing (`prepare`, `start`, `migrate`, ...).
    Nothing,
}

/// libvirt's qemu hook operations, as netredir sees them.
pub fn action(operation: &str) -> Action {
    match operation {
        // The NICs exist once QEMU has started; a daemon restart that
        // finds the domain running again sees `reconnect`.
        "started" | "reconnect" | "attach" => Action::Attach,
        "stopped" | "release" => Action::Detach,
        _ => Action::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' id='7'>
  <name>alice-desktop</name>
  <devices>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:01'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <alias name='ua-netredir'/>
    </interface>
    <interface type='network'>
      <target dev='vnet4'/>
      <alias name='net1'/>
    </interface>
    <interface type='bridge'>
      <target dev='vnet5'/>
      <alias name='ua-netredir-dedicated'/>
    </interface>
  </devices>
</domain>"#;

    #[test]
    fn the_marked_nics_are_found_with_their_mode() {
        assert_eq!(
            nics(XML).unwrap(),
            [
                Nic {
                    iface: "vnet3".into(),
                    dedicated: false
                },
                Nic {
                    iface: "vnet5".into(),
                    dedicated: true
                }
            ]
        );
        assert!(nics("<domain><devices/></domain>").unwrap().is_empty());
        assert!(nics("<domain").is_err());
        let inactive = "<domain><devices><interface><alias name='ua-netredir'/></interface></devices></domain>";
        assert!(
            nics(inactive)
                .unwrap_err()
                .to_string()
                .contains("target dev")
        );
    }

    #[test]
    fn operations_map_to_attach_and_detach() {
        assert_eq!(action("started"), Action::Attach);
        assert_eq!(action("stopped"), Action::Detach);
        assert_eq!(action("release"), Action::Detach);
        assert_eq!(action("prepare"), Action::Nothing);
    }
}
