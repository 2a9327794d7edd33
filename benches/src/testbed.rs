//! A throwaway network of namespaces: `vm`, `host`, `client`, `lan`.
//!
//! ```text
//!  vm ── eth0 10.200.0.2 ═══ vm0 10.200.0.1 ── host ── wan0 10.201.0.1
//!          fd00:200::2         fd00:200::1                  ║
//!  lan ── eth0 10.202.0.2 ═══ lan0 10.202.0.1 ── client ── wan0 10.201.0.2
//! ```
//!
//! The VM's one NIC is shared, as on most VDI hosts: it reaches the
//! virtual subnet through its gateway 10.200.0.1 (vm0, where netredird's
//! classifier sits), the IPv6 prefix on-link (so NDP for vIPs is
//! exercised too), and everything else through 10.200.0.1 as well. Names
//! carry the creating process id and a counter, so tests run in parallel;
//! a namespace left by a process that no longer exists is removed by the
//! next testbed. Everything is removed on drop, also on panic; processes
//! started through [`Testbed::spawn`] are killed first. Nothing here
//! touches the root namespace's interfaces or routes.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Address of the VM.
pub const VM_IP: &str = "10.200.0.2";
/// The VM's IPv6 address (outside the virtual prefix).
pub const VM_IP6: &str = "fd00:200::2";
/// netredird's IPv6 address on the VM link.
pub const HOST_VM_IP6: &str = "fd00:200::1";
/// The virtual IPv6 prefix netredird uses by default.
pub const PREFIX6: &str = "fd6e:7264::/64";
/// netredird's address on the VM link (outside the virtual subnet).
pub const HOST_VM_IP: &str = "10.200.0.1";
/// netredird's address on the WAN link: where the agent dials.
pub const HOST_WAN_IP: &str = "10.201.0.1";
/// The client machine's WAN address.
pub const CLIENT_WAN_IP: &str = "10.201.0.2";
/// The client machine's LAN address.
pub const CLIENT_LAN_IP: &str = "10.202.0.1";
/// A server on the client LAN (printers and friends).
pub const LAN_IP: &str = "10.202.0.2";
/// The host end of the VM's NIC, where `steer` attaches.
pub const HOST_VM_IFACE: &str = "vm0";
/// The tunnel port netredird listens on.
pub const TUNNEL_PORT: u16 = 7900;

/// One network namespace of a testbed.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Its name under /run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `prog` inside this namespace.
    pub fn command(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// Runs `prog args` inside the namespace; fails with its stderr.
    pub fn run(&self, prog: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(prog)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {prog} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{prog} {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets made
    /// there belong to it.
    pub fn enter<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).with_context(|| format!("cannot open {path}"))?;
                // SAFETY: setns on this thread only, with an fd we hold.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A started process, killed when the testbed goes.
#[derive(Debug)]
pub struct Proc {
    /// Short name, also of its log file.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Where its stdout and stderr go.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// An emulated WAN between host and client (see `netredir-wan`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WanLink {
    /// Rate in each direction, Mbit/s.
    pub rate_mbit: f64,
    /// Round-trip time added (half each way), milliseconds.
    pub rtt_ms: f64,
    /// Frames lost in each direction, percent.
    pub loss_pct: f64,
}

/// The namespaces, their processes and a scratch directory.
pub struct Testbed {
    /// The guest.
    pub vm: Netns,
    /// The VDI host: netredird.
    pub host: Netns,
    /// The user's machine: netredir-agent.
    pub client: Netns,
    /// The user's LAN: printers and servers.
    pub lan: Netns,
    /// With an emulated WAN: the namespace its emulator runs in, joining
    /// host and client at layer 2.
    pub wan: Option<Netns>,
    link: Option<WanLink>,
    /// Namespaces added later ([`Testbed::add_netns`]).
    extra: Mutex<Vec<Netns>>,
    dir: PathBuf,
    procs: Mutex<Vec<Proc>>,
    done: Mutex<bool>,
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces left by testbeds whose process is gone.
fn sweep_stale() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("nr") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            let _ = ip(&["netns", "del", &name]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&name));
        }
    }
}

impl Testbed {
    /// Builds the four namespaces and their links. `tag` names the test in
    /// the scratch directory.
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_wan(tag, None)
    }

    /// Like [`Testbed::new`], with host and client joined through the WAN
    /// emulator (offloads off on that path, so frames are MTU-sized).
    pub fn with_wan(tag: &str, link: Option<WanLink>) -> Result<Self> {
        sweep_stale();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("nr{}x{}", std::process::id(), n);
        let dir = std::env::temp_dir().join(format!("netredir-{tag}-{prefix}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mk = |role: &str| Netns {
            name: format!("{prefix}-{role}"),
        };
        let tb = Self {
            vm: mk("vm"),
            host: mk("host"),
            client: mk("client"),
            lan: mk("lan"),
            wan: link.map(|_| mk("wan")),
            link,
            extra: Mutex::new(Vec::new()),
            dir,
            procs: Mutex::new(Vec::new()),
            done: Mutex::new(false),
        };
        // From here on, Drop cleans up whatever was made.
        tb.build()
            .context("cannot build the testbed (needs root and iproute2)")?;
        Ok(tb)
    }

    fn build(&self) -> Result<()> {
        for ns in self.namespaces() {
            ip(&["netns", "add", ns.name()])?;
            ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        }
        let link = |a: &Netns, an: &str, aip: &str, b: &Netns, bn: &str, bip: &str| -> Result<()> {
            ip(&[
                "-n",
                a.name(),
                "link",
                "add",
                an,
                "type",
                "veth",
                "peer",
                "name",
                bn,
                "netns",
                b.name(),
            ])?;
            ip(&[
                "-n",
                a.name(),
                "addr",
                "add",
                &format!("{aip}/24"),
                "dev",
                an,
            ])?;
            ip(&[
                "-n",
                b.name(),
                "addr",
                "add",
                &format!("{bip}/24"),
                "dev",
                bn,
            ])?;
            ip(&["-n", a.name(), "link", "set", an, "up"])?;
            ip(&["-n", b.name(), "link", "set", bn, "up"])?;
            Ok(())
        };
        link(
            &self.vm,
            "eth0",
            VM_IP,
            &self.host,
            HOST_VM_IFACE,
            HOST_VM_IP,
        )?;
        match (&self.wan, self.link) {
            (Some(wan), Some(l)) => self.build_wan(wan, l)?,
            _ => link(
                &self.host,
                "wan0",
                HOST_WAN_IP,
                &self.client,
                "wan0",
                CLIENT_WAN_IP,
            )?,
        }
        link(
            &self.client,
            "lan0",
            CLIENT_LAN_IP,
            &self.lan,
            "eth0",
            LAN_IP,
        )?;
        ip(&[
            "-n",
            self.vm.name(),
            "route",
            "add",
            "100.77.0.0/16",
            "via",
            HOST_VM_IP,
        ])?;
        ip(&[
            "-n",
            self.vm.name(),
            "route",
            "add",
            "default",
            "via",
            HOST_VM_IP,
        ])?;
        // IPv6 on the VM link, ready at once (no duplicate detection), and
        // the virtual prefix on-link like the subnet.
        for (ns, dev, addr) in [
            (&self.vm, "eth0", VM_IP6),
            (&self.host, HOST_VM_IFACE, HOST_VM_IP6),
        ] {
            let cidr = format!("{addr}/64");
            ip(&["-n", ns.name(), "addr", "add", &cidr, "dev", dev, "nodad"])?;
        }
        ip(&["-n", self.vm.name(), "route", "add", PREFIX6, "dev", "eth0"])?;
        ip(&[
            "-n",
            self.lan.name(),
            "route",
            "add",
            "default",
            "via",
            CLIENT_LAN_IP,
        ])?;
        // As on a desktop distribution: anyone may ping (unprivileged ICMP
        // sockets); a new namespace starts with nobody allowed.
        self.client
            .run("sysctl", &["-qw", "net.ipv4.ping_group_range=0 2147483647"])?;
        Ok(())
    }

    /// host wan0 ═══ h0 [netredir-wan] c0 ═══ wan0 client, same addresses
    /// as without the emulator.
    fn build_wan(&self, wan: &Netns, l: WanLink) -> Result<()> {
        for (ns, end, other, addr) in [
            (&self.host, "wan0", "h0", HOST_WAN_IP),
            (&self.client, "wan0", "c0", CLIENT_WAN_IP),
        ] {
            ip(&[
                "-n",
                ns.name(),
                "link",
                "add",
                end,
                "type",
                "veth",
                "peer",
                "name",
                other,
                "netns",
                wan.name(),
            ])?;
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                end,
            ])?;
            // Full checksums and MTU-sized frames: the emulator copies
            // frames as they are, and a wire has no offloads.
            ns.run(
                "ethtool",
                &[
                    "-K", end, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
                ],
            )?;
            wan.run(
                "ethtool",
                &[
                    "-K", other, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
                ],
            )?;
            wan.run(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{other}.disable_ipv6=1")],
            )?;
            ip(&["-n", ns.name(), "link", "set", end, "up"])?;
            ip(&["-n", wan.name(), "link", "set", other, "up"])?;
        }
        let emulator = bin("netredir-wan")?;
        let (rate, delay, loss) = (
            format!("{}", l.rate_mbit),
            format!("{}", l.rtt_ms / 2.0),
            format!("{}", l.loss_pct),
        );
        self.spawn(
            wan,
            "wan",
            emulator,
            &[
                "--a",
                "h0",
                "--b",
                "c0",
                "--rate-mbit",
                &rate,
                "--delay-ms",
                &delay,
                "--loss",
                &loss,
            ],
        )?;
        Ok(())
    }

    /// The emulated WAN, if this testbed has one.
    pub fn wan_link(&self) -> Option<WanLink> {
        self.link
    }

    fn namespaces(&self) -> Vec<Netns> {
        let mut v = vec![
            self.vm.clone(),
            self.host.clone(),
            self.client.clone(),
            self.lan.clone(),
        ];
        v.extend(self.wan.clone());
        v.extend(
            self.extra
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        v
    }

    /// A further empty namespace (only `lo`, up), named after `role`,
    /// removed with the testbed: where a peer such as slirp4netns or pasta
    /// gives a guest its network.
    pub fn add_netns(&self, role: &str) -> Result<Netns> {
        let prefix = self.vm.name().trim_end_matches("-vm");
        let ns = Netns {
            name: format!("{prefix}-{role}"),
        };
        self.extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ns.clone());
        ip(&["netns", "add", ns.name()])?;
        ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A further VM `vm{n}` (n from 2 to 99) on its own link to the host:
    /// its namespace, and the host end of its NIC (returned, named
    /// `vm{n}`), addresses 10.200.n.2 (VM) and 10.200.n.1 (host), the
    /// virtual subnet and everything else routed via the host, as for the
    /// first VM. Removed with the testbed.
    pub fn add_vm(&self, n: u8) -> Result<(Netns, String)> {
        if !(2..100).contains(&n) {
            bail!("add_vm: n must be 2 to 99");
        }
        let ns = self.add_netns(&format!("vm{n}"))?;
        let iface = format!("vm{n}");
        let (vm_ip, host_ip) = (format!("10.200.{n}.2"), format!("10.200.{n}.1"));
        ip(&[
            "-n",
            self.host.name(),
            "link",
            "add",
            &iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        ip(&[
            "-n",
            self.host.name(),
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &iface,
        ])?;
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{vm_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", self.host.name(), "link", "set", &iface, "up"])?;
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "100.77.0.0/16",
            "via",
            &host_ip,
        ])?;
        ip(&["-n", ns.name(), "route", "add", "default", "via", &host_ip])?;
        Ok((ns, iface))
    }

    /// Gives namespace `ns` its own /etc/resolv.conf (for programs started
    /// with `ip netns exec`); removed with the testbed.
    pub fn set_resolv_conf(&self, ns: &Netns, content: &str) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("resolv.conf"), content)?;
        Ok(())
    }

    /// Scratch directory, removed with the testbed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `prog args` in `ns`, output to `<dir>/<name>.log`. It is
    /// killed when the testbed is dropped.
    pub fn spawn(
        &self,
        ns: &Netns,
        name: &str,
        prog: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Result<u32> {
        let log = self.dir.join(format!("{name}.log"));
        let f = File::create(&log)?;
        let mut cmd = ns.command(&prog);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        // SAFETY: only async-signal-safe calls between fork and exec: the
        // child must not inherit a caller's blocked SIGINT/SIGTERM.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        self.procs.lock().expect("procs").push(Proc {
            name: name.into(),
            child,
            log,
        });
        Ok(pid)
    }

    /// Waits (at most `timeout`) for process `name` to exit; its status.
    pub fn wait_exit(&self, name: &str, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut procs = self.procs.lock().expect("procs");
                let p = procs
                    .iter_mut()
                    .find(|p| p.name == name)
                    .with_context(|| format!("no process {name}"))?;
                if let Some(st) = p.child.try_wait()? {
                    return Ok(st);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} still running after {timeout:?}; log:\n{}",
                    self.log_tail(name)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to process `name`.
    pub fn signal(&self, name: &str, sig: i32) -> Result<()> {
        let procs = self.procs.lock().expect("procs");
        let p = procs
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))?;
        // SAFETY: kill(2) on a child we started and have not reaped.
        unsafe { libc::kill(p.pid() as i32, sig) };
        Ok(())
    }

    /// The pid of process `name`.
    pub fn pid(&self, name: &str) -> Result<u32> {
        let procs = self.procs.lock().expect("procs");
        procs
            .iter()
            .find(|p| p.name == name)
            .map(Proc::pid)
            .with_context(|| format!("no process {name}"))
    }

    /// Resident memory of process `name`, in bytes (VmRSS).
    pub fn rss(&self, name: &str) -> Result<u64> {
        let pid = self.pid(name)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }

    /// Whether process `name` is still running.
    pub fn running(&self, name: &str) -> bool {
        let mut procs = self.procs.lock().expect("procs");
        procs
            .iter_mut()
            .find(|p| p.name == name)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// The last lines of a process's log.
    pub fn log_tail(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills the processes and removes the namespaces; idempotent, and
    /// what Drop does.
    pub fn cleanup(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return;
        }
        *done = true;
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        for p in procs.iter_mut() {
            if matches!(p.child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on our unreaped child.
                unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in procs.iter_mut() {
            while matches!(p.child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if std::thread::panicking() {
            for p in procs.iter() {
                eprintln!(
                    "---- {} ({}) ----\n{}",
                    p.name,
                    p.log.display(),
                    self.log_tail(&p.name)
                );
            }
        }
        // Whatever our processes left running in the namespaces (socat's
        // forked children, a shell's `sleep`) goes too, or it would keep a
        // deleted namespace alive.
        for ns in self.namespaces() {
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", ns.name()])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) of a process inside our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for ns in self.namespaces() {
            let _ = ip(&["netns", "del", ns.name()]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns.name()));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Where the workspace's binaries are: `NETREDIR_BIN_DIR`, else next to
/// the running executable (target/<profile>, also from target/<profile>/deps).
pub fn bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("NETREDIR_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let mut d = exe.parent().context("exe has no dir")?.to_path_buf();
            if d.ends_with("deps") {
                d.pop();
            }
            d
        }
    };
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build the workspace first (cargo build --workspace)",
            p.display()
        );
    }
    Ok(p)
}
