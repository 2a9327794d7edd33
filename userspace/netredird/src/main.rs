//! netredird: the host daemon, one per VDI host, for every VM's network
//! redirection.
//!
//! Theory of operation. VMs attach at runtime (`netredirctl vm attach`,
//! or `--iface` at start): for each, [`attach`] loads `steer`, points it at
//! the VM's virtual subnet and attaches it to the host end of the VM's
//! NIC: with `--dedicated` as native XDP with the AF_XDP socket on that
//! NIC (up to MTU 3500; a jumbo-frame one as a shared NIC is); else (a shared NIC) as a TC classifier that moves only the
//! subnet's frames into a TAP device of netredird's own for the VM (the
//! guest's large segments arrive whole), so the VM's other traffic keeps
//! the kernel's fast path. Threads:
//! - the data path workers ([`workers`], [`datapath`]): `--workers`
//!   io_uring loops, each owning its share of the VMs (their TAP devices
//!   or AF_XDP sockets, engines, sessions and tunnel connections); the first also
//!   accepts agents and runs their handshakes;
//! - the control server ([`control`]): answers `netredirctl` on a unix
//!   socket, asking the workers over crossbeam channels (and preparing
//!   a VM to attach on its own thread);
//! - with `--metrics`, the metrics server ([`metrics`]): Prometheus text
//!   over HTTP, asking the data path the same way;
//! - main: waits for SIGINT/SIGTERM (or the data path failing), then stops
//!   the data path (which detaches every VM) and removes the control
//!   socket.

mod attach;
mod config;
mod control;
mod counters;
mod datapath;
mod metrics;
mod workers;

use anyhow::{Context, Result, bail};
use clap::Parser;
use netredir_datapath::steer::interface_exists;
use netredir_datapath::xsk::FRAME_SIZE;
use netredir_shared::control::{AttachSpec, DEFAULT_CONTROL_PATH, Response};
use netredir_shared::pairing::PairStore;
use netredir_shared::session::Compression;
use netredir_shared::subnet::{DEFAULT_PREFIX6, DEFAULT_SUBNET, Ipv4Subnet, Ipv6Prefix};
use netredir_shared::tls::Identity;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Gives the VMs on this host transparent access to resources on their
/// users' networks, through tunnels to netredir-agent (one daemon per
/// host; VMs attach with `netredirctl vm attach`).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Settings file (TOML; flags given here win over it) [default:
    /// /etc/netredir/netredird.toml, if it is there].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Attach one VM at start, on this host end of its NIC (tap, vnet or
    /// veth; or the `iface` of the config's `[[vm]]`). Without it netredird
    /// starts with no VM: attach them with `netredirctl vm attach`.
    #[arg(long)]
    iface: Option<String>,
    /// Address and port to accept agents on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7900")]
    listen: SocketAddr,
    /// The virtual subnet that resources get addresses in (each VM's own;
    /// the default for `vm attach`).
    #[arg(long, value_name = "CIDR", default_value = DEFAULT_SUBNET)]
    subnet: Ipv4Subnet,
    /// The virtual IPv6 /64 beside the subnet (a ULA): each resource gets
    /// an IPv6 vIP in it too.
    #[arg(long, value_name = "PREFIX/64", default_value = DEFAULT_PREFIX6)]
    prefix6: Ipv6Prefix,
    /// Unix socket of the control API (netredirctl --control).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    /// The --iface VM's NIC carries only netredir traffic: steer by XDP right on
    /// it (up to MTU 3500; above, by the TC classifier and a TAP device), answer its DHCP requests (address, DNS server, route for the
    /// subnet) and send IPv6 router advertisements (SLAAC in the prefix,
    /// DNS server, no default route). Without it the NIC is shared: a TC
    /// classifier takes only the subnet's frames.
    #[arg(long)]
    dedicated: bool,
    /// DNS zone the VM resolves resources in (NAME.ZONE).
    #[arg(long, value_name = "ZONE", default_value = "netredir.internal")]
    zone: String,
    /// Name of the --iface VM (its libvirt domain); pairings are bound to
    /// it [default: the interface name].
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Where the host key, certificate and paired agents are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/netredir")]
    state_dir: PathBuf,
    /// Compression of the VM's data toward the agent: off, auto (skips
    /// incompressible data) or a zstd level 1-19.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    compression: Compression,
    /// Compression for one resource, NAME=MODE (repeatable).
    #[arg(long, value_name = "NAME=MODE", value_parser = parse_resource_mode)]
    resource_compression: Vec<(String, Compression)>,
    /// Seconds a session survives without a tunnel connection before its
    /// flows are reset.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    grace: u64,
    /// Seconds between heartbeats; three missed ones drop the connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    heartbeat: u64,
    /// Most concurrent flows (TCP and UDP) the VM may have.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_flows: usize,
    /// New flows per second the VM may open (bursts of twice as many).
    #[arg(long, value_name = "N", default_value_t = 200)]
    new_flows_per_sec: u32,
    /// Socket buffer per TCP flow and direction, KiB: less takes more
    /// flows in the same memory.
    #[arg(long, value_name = "KIB", default_value_t = 256)]
    flow_buffer_kib: usize,
    /// Memory for frames between dedicated NICs and netredird, MiB, shared
    /// by every VM attached with --dedicated (an idle one keeps 64 KiB of
    /// it, a busy one up to 2 MiB): the UMEM of the AF_XDP sockets, locked
    /// in RAM, made at the first such attach (shared NICs need none).
    /// 64 MiB serves about 750 such VMs well; give more for more.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    umem_mib: usize,
    /// Data path threads; each serves its share of the VMs (a VM stays on
    /// one) [default: one per core].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Busy polling: spin this many microseconds for the next event before
    /// sleeping (0: off). Saves a sleep and wake-up per message when replies
    /// come quickly (a LAN round trip), at the cost of that much CPU per
    /// message; the latency benchmark reports both.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    busy_poll_us: u64,
    /// Most memory all of the VM's TCP flows may hold in buffers, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 96)]
    max_buffer_mib: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (per VM and per
    /// resource: flows, bytes, refusals, tunnel state); off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log: String,
    /// The config file's further `[[vm]]` tables, attached at start.
    #[arg(skip)]
    more_vms: Vec<AttachSpec>,
}

fn parse_resource_mode(s: &str) -> Result<(String, Compression), String> {
    let (name, mode) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=MODE, e.g. scanner=off"))?;
    Ok((name.to_ascii_lowercase(), mode.parse()?))
}

fn main() {
    netredir_shared::docs::generate_if_requested(<Args as clap::CommandFactory>::command(), "8");
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let args = match <Args as clap::FromArgMatches>::from_arg_matches(&matches)
        .map_err(anyhow::Error::from)
        .and_then(|a| config::apply(a, &matches))
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netredird: {e:#}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(args) {
        eprintln!("netredird: {e:#}");
        std::process::exit(1);
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a local set; pthread_sigmask on this
    // thread before any other thread exists, so all inherit the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Tells systemd how the daemon stands (`READY=1`, `STOPPING=1`, with
/// `Type=notify`); nothing when not started by it (no `NOTIFY_SOCKET`).
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| match path.as_bytes().strip_prefix(b"@") {
        Some(name) => s.send_to_addr(state.as_bytes(), &UnixAddr::from_abstract_name(name)?),
        None => s.send_to(state.as_bytes(), &path),
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd ({}): {e}", path.to_string_lossy());
    }
}

/// Waits up to `timeout` for SIGINT/SIGTERM; returns the signal if one came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; null siginfo is allowed.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

fn run(args: Args) -> Result<()> {
    let sigs = block_signals();
    // Every agent connection is a descriptor (and so is every handshake).
    netredir_uring::raise_fd_limit();
    if let Some(iface) = &args.iface
        && !interface_exists(iface)
    {
        bail!("cannot attach to {iface}: no such interface (give the host end of the VM's NIC)");
    }
    // Bind first: a busy port should not leave XDP half set up.
    let listener = TcpListener::bind(args.listen).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            anyhow::anyhow!(
                "cannot listen on {}: address in use (another netredird?)",
                args.listen
            )
        }
        _ => anyhow::Error::new(e).context(format!("cannot listen on {}", args.listen)),
    })?;
    if args.vm.as_deref().is_some_and(|v| v.trim().is_empty()) {
        anyhow::bail!("--vm needs a name (the libvirt domain's name or UUID)");
    }
    let metrics_listener = args.metrics.map(metrics::bind).transpose()?;
    let mut control = control::Server::bind(&args.control)?;
    let identity = Identity::load_or_create(&args.state_dir, "host", "netredird")
        .context("cannot load or create the host identity (--state-dir)")?;
    let pairs = PairStore::load(&args.state_dir).with_context(|| {
        format!(
            "cannot read the paired agents in {}",
            args.state_dir.display()
        )
    })?;
    if args.heartbeat == 0 {
        bail!("--heartbeat must be at least 1 second");
    }
    if !(4..=4096).contains(&args.flow_buffer_kib) {
        bail!("--flow-buffer-kib must be 4 to 4096");
    }
    if args.new_flows_per_sec == 0 || args.max_flows == 0 {
        bail!("--new-flows-per-sec and --max-flows must be at least 1");
    }
    if !(8..=4096).contains(&args.umem_mib) {
        bail!("--umem-mib must be 8 to 4096");
    }
    if args.busy_poll_us > 10_000 {
        bail!("--busy-poll-us must be 0 (off) to 10000");
    }
    if args.max_buffer_mib * 1024 < 3 * args.flow_buffer_kib {
        bail!("--max-buffer-mib is too small for even one flow of --flow-buffer-kib");
    }
    if let Err(e) = netredir_datapath::dns::VDns::new(&args.zone) {
        bail!("--zone {}: {e}", args.zone);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(cores);
    if !(1..=256).contains(&workers) {
        bail!("--workers must be 1 to 256");
    }

    tracing::info!(fingerprint = %identity.fingerprint(), "host identity");
    let cfg = datapath::Config {
        identity: Arc::new(identity),
        pairs: Arc::new(Mutex::new(pairs)),
        registry: Arc::default(),
        daemon: Arc::default(),
        compression: args.compression,
        resource_compression: args.resource_compression.iter().cloned().collect(),
        grace: Duration::from_secs(args.grace),
        heartbeat: Duration::from_secs(args.heartbeat),
        replay_limit: 8 * 1024 * 1024,
        state_dir: args.state_dir.clone(),
        zone: args.zone.clone(),
        max_flows: args.max_flows,
        new_flows_per_sec: args.new_flows_per_sec,
        flow_buffer: args.flow_buffer_kib * 1024,
        max_buffer: args.max_buffer_mib << 20,
        busy_poll: Duration::from_micros(args.busy_poll_us),
    };
    // The programs are loaded once, for every VM: the verifier runs here,
    // not at each attach.
    let steer = Arc::new(std::sync::Mutex::new(
        netredir_datapath::steer::Steer::load()?,
    ));
    // Loading parsed the kernel's BTF (megabytes, now free): give that
    // heap back.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let defaults = Arc::new(attach::Defaults {
        subnet: args.subnet,
        prefix6: args.prefix6,
        pool: Arc::default(),
        umem_frames: (args.umem_mib << 20) as u32 / FRAME_SIZE,
        steer,
    });
    let (dp, threads) = workers::Workers::start(workers, cfg, listener)?;
    let stop = |threads: Vec<workers::Worker>| {
        dp.shutdown();
        threads.into_iter().map(|t| t.join()).collect::<Vec<_>>()
    };
    // `--iface`: the one VM of a daemon started for it, attached at once.
    if let Some(iface) = args.iface.clone() {
        let name = args.vm.clone().unwrap_or_else(|| iface.clone());
        if args.vm.is_none() {
            tracing::warn!(
                "no --vm: pairings are bound to the interface name {iface}, which libvirt gives anew on every boot; name the VM (its libvirt domain) with --vm or [[vm]] name"
            );
        }
        let spec = AttachSpec {
            name,
            iface,
            dedicated: args.dedicated,
            subnet: None,
            prefix6: None,
        };
        if let Response::Error { message } = attach::attach(&spec, &defaults, &dp) {
            stop(threads);
            control.remove();
            bail!("{message}");
        }
    }
    // The config file's other VMs: one whose NIC is not there (the VM is
    // not running) must not keep the others from being served.
    for spec in &args.more_vms {
        if let Response::Error { message } = attach::attach(spec, &defaults, &dp) {
            tracing::error!(vm = %spec.name, iface = %spec.iface, "cannot attach: {message}; serving the others");
        }
    }
    control.spawn(dp.clone(), defaults.clone())?;
    if let Some(l) = metrics_listener {
        metrics::serve(l, dp.clone())?;
    }
    tracing::info!(
        listen = %args.listen,
        control = %args.control.display(),
        subnet = %args.subnet,
        prefix6 = %args.prefix6,
        vm = args.iface.as_ref().map(|_| args.vm.clone().unwrap_or_default()),
        workers,
        "netredird ready"
    );
    sd_notify(&match &args.iface {
        Some(iface) => format!(
            "READY=1\nSTATUS=serving VM {} on {iface}",
            args.vm.as_deref().unwrap_or(iface)
        ),
        None => "READY=1\nSTATUS=waiting for VMs (netredirctl vm attach)".to_string(),
    });

    let outcomes = loop {
        if let Some(sig) = wait_signal(&sigs, Duration::from_millis(200)) {
            tracing::info!(signal = sig, "stopping");
            sd_notify("STOPPING=1");
            break stop(threads);
        }
        // One worker failing stops them all: its VMs would be unserved.
        if threads.iter().any(|t| t.is_finished()) {
            break stop(threads);
        }
    };
    control.remove();
    for outcome in outcomes {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("data path failed")),
            Err(_) => bail!("data path thread panicked"),
        }
    }
    tracing::info!("stopped; every VM detached");
    Ok(())
}
