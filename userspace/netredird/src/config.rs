//! The settings file, `/etc/netredir/netredird.toml` (or `--config PATH`):
//! the same settings as the flags, under the same names (`state_dir` for
//! `--state-dir`), and the VMs to attach at start as `[[vm]]` tables. A flag given
//! on the command line wins over the file; the file wins over the flags'
//! defaults. Unknown keys are errors, so that a misspelt one is not
//! silently ignored.
//!
//! ```toml
//! listen = "0.0.0.0:7900"
//! metrics = "127.0.0.1:9900"
//! grace = 60
//!
//! [[vm]]
//! name = "alice-desktop"   # its libvirt domain
//! iface = "vnet3"
//! dedicated = false
//! ```

use crate::Args;
use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the settings are read from when `--config` is not given (if the
/// file is there).
pub const DEFAULT_PATH: &str = "/etc/netredir/netredird.toml";

/// The file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    control: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    subnet: Option<String>,
    prefix6: Option<String>,
    zone: Option<String>,
    compression: Option<String>,
    resource_compression: Option<BTreeMap<String, String>>,
    grace: Option<u64>,
    heartbeat: Option<u64>,
    max_flows: Option<usize>,
    new_flows_per_sec: Option<u32>,
    flow_buffer_kib: Option<usize>,
    max_buffer_mib: Option<usize>,
    busy_poll_us: Option<u64>,
    umem_mib: Option<usize>,
    workers: Option<usize>,
    log: Option<String>,
    #[serde(default)]
    vm: Vec<Vm>,
}

/// A VM to serve from the start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vm {
    name: String,
    iface: String,
    #[serde(default)]
    dedicated: bool,
}

/// `args` with the settings file applied under the flags given.
pub fn apply(mut args: Args, m: &clap::ArgMatches) -> Result<Args> {
    let (path, must) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let Some(file) = read(&path, must)? else {
        return Ok(args);
    };
    let ctx = |key: &str| format!("{}: {key}", path.display());
    // Only what the command line did not say.
    let unset = |id: &str| m.value_source(id) != Some(ValueSource::CommandLine);
    macro_rules! take {
        ($($field:ident),*) => {$(
            if let Some(v) = file.$field.clone() && unset(stringify!($field)) {
                args.$field = v.into();
            }
        )*};
    }
    take!(
        listen,
        control,
        state_dir,
        grace,
        heartbeat,
        max_flows,
        new_flows_per_sec,
        flow_buffer_kib,
        max_buffer_mib,
        busy_poll_us,
        umem_mib,
        workers,
        log,
        zone
    );
    if let Some(v) = file.metrics
        && unset("metrics")
    {
        args.metrics = Some(v);
    }
    macro_rules! parse {
        ($($field:ident),*) => {$(
            if let Some(v) = &file.$field && unset(stringify!($field)) {
                args.$field = v
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| ctx(stringify!($field)))?;
            }
        )*};
    }
    parse!(subnet, prefix6, compression);
    if let Some(map) = &file.resource_compression
        && unset("resource_compression")
    {
        args.resource_compression = map
            .iter()
            .map(|(name, mode)| {
                crate::parse_resource_mode(&format!("{name}={mode}"))
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| ctx("resource_compression"))
            })
            .collect::<Result<_>>()?;
    }
    for (i, a) in file.vm.iter().enumerate() {
        if let Some(b) = file.vm[..i]
            .iter()
            .find(|b| b.name == a.name || b.iface == a.iface)
        {
            bail!(
                "{}: [[vm]] {:?} on {} and {:?} on {}: each VM needs a name and an interface of its own",
                path.display(),
                b.name,
                b.iface,
                a.name,
                a.iface
            );
        }
    }
    // The first is the one --iface would name (flags win over it); the
    // others are attached beside it.
    if let Some((vm, more)) = file.vm.split_first()
        && unset("iface")
    {
        args.iface = Some(vm.iface.clone());
        if unset("vm") {
            args.vm = Some(vm.name.clone());
        }
        if unset("dedicated") {
            args.dedicated = vm.dedicated;
        }
        args.more_vms = more
            .iter()
            .map(|v| netredir_shared::control::AttachSpec {
                name: v.name.clone(),
                iface: v.iface.clone(),
                dedicated: v.dedicated,
                subnet: None,
                prefix6: None,
            })
            .collect();
    }
    Ok(args)
}

/// The file at `path`; `None` if it is not there and did not have to be.
fn read(path: &Path, must: bool) -> Result<Option<File>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the config {}", path.display()));
        }
    };
    toml::from_str(&text)
        .map(Some)
        .with_context(|| format!("config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn args_with(file: &str, argv: &[&str]) -> Result<Args> {
        let dir = std::env::temp_dir().join(format!("netredird-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per call: tests run in parallel.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.join(format!("{n}.toml"));
        std::fs::write(&path, file).unwrap();
        let p = path.to_string_lossy().into_owned();
        let mut all = vec!["netredird", "--config", &p];
        all.extend_from_slice(argv);
        let m = Args::command().try_get_matches_from(all).unwrap();
        let args = Args::from_arg_matches(&m).unwrap();
        let r = apply(args, &m);
        std::fs::remove_file(&path).unwrap();
        r
    }

    #[test]
    fn the_file_fills_in_and_flags_win() {
        let a = args_with(
            r#"
listen = "127.0.0.1:7999"
grace = 77
zone = "file.test"
subnet = "100.99.0.0/16"
resource_compression = { scanner = "off" }
[[vm]]
name = "alice"
iface = "vnet9"
dedicated = true
"#,
            &["--zone", "flag.test"],
        )
        .unwrap();
        assert_eq!(a.listen, "127.0.0.1:7999".parse().unwrap());
        assert_eq!(a.grace, 77);
        assert_eq!(a.zone, "flag.test", "the flag wins");
        assert_eq!(a.subnet.to_string(), "100.99.0.0/16");
        assert_eq!(a.iface.as_deref(), Some("vnet9"));
        assert_eq!(a.vm.as_deref(), Some("alice"));
        assert!(a.dedicated);
        assert_eq!(a.resource_compression.len(), 1);
        assert_eq!(a.heartbeat, 5, "a default the file leaves alone");
    }

    #[test]
    fn several_vms_in_the_file_are_all_attached() {
        let a = args_with(
            "[[vm]]\nname = \"a\"\niface = \"x\"\n[[vm]]\nname = \"b\"\niface = \"y\"\ndedicated = true",
            &[],
        )
        .unwrap();
        assert_eq!(
            (a.vm.as_deref(), a.iface.as_deref()),
            (Some("a"), Some("x"))
        );
        assert_eq!(a.more_vms.len(), 1);
        assert_eq!(
            (a.more_vms[0].name.as_str(), a.more_vms[0].dedicated),
            ("b", true)
        );
        // --iface on the command line is the one VM then.
        let a = args_with(
            "[[vm]]\nname = \"a\"\niface = \"x\"\n[[vm]]\nname = \"b\"\niface = \"y\"",
            &["--iface", "z"],
        )
        .unwrap();
        assert_eq!(a.iface.as_deref(), Some("z"));
        assert!(a.more_vms.is_empty());
    }

    #[test]
    fn mistakes_in_the_file_are_errors_that_say_where() {
        for (file, says) in [
            ("grase = 3", "unknown field"),
            ("subnet = \"100.99.0.0/33\"", "subnet"),
            ("grace = \"long\"", "grace"),
            (
                "[[vm]]\nname = \"a\"\niface = \"x\"\n[[vm]]\nname = \"a\"\niface = \"y\"",
                "of its own",
            ),
        ] {
            let e = format!("{:#}", args_with(file, &[]).unwrap_err());
            assert!(e.contains(says) && e.contains(".toml"), "{file}: {e}");
        }
        let m = Args::command()
            .try_get_matches_from(["netredird", "--config", "/nonexistent/netredird.toml"])
            .unwrap();
        let e = apply(Args::from_arg_matches(&m).unwrap(), &m).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read the config"), "{e:#}");
    }
}
