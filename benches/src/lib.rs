//! What the demo, the integration tests and the benchmarks share: the
//! namespace [`testbed`], and [`Redir`], a testbed with netredird and
//! netredir-agent running in it plus the real servers on the client LAN.

pub mod testbed;

use anyhow::{Context, Result, bail};
use netredir_shared::control::{MapEntry, Request, Response, Stats, Status, request};
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;
use testbed::{HOST_VM_IFACE, HOST_WAN_IP, TUNNEL_PORT, Testbed, bin, wait_until};

/// A testbed with netredird on the host and (optionally) an agent.
pub struct Redir {
    /// The namespaces and processes.
    pub tb: Testbed,
    /// netredird's control socket.
    pub control: PathBuf,
}

impl Redir {
    /// A testbed with netredird started and answering its control API.
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_args(tag, &[])
    }

    /// The same, with extra arguments for netredird.
    pub fn with_args(tag: &str, daemon_args: &[&str]) -> Result<Self> {
        Self::with_testbed(Testbed::new(tag)?, daemon_args)
    }

    /// netredird with `daemon_args` on a testbed built by the caller (one
    /// with an emulated WAN, for example).
    pub fn with_testbed(tb: Testbed, daemon_args: &[&str]) -> Result<Self> {
        let control = tb.dir().join("control.sock");
        let r = Self { tb, control };
        r.start_daemon(daemon_args)?;
        Ok(r)
    }

    /// The host's state directory (key, certificate, paired agents).
    pub fn host_state(&self) -> PathBuf {
        self.tb.dir().join("host-state")
    }

    /// The agents' state directory (key, pinned host).
    pub fn agent_state(&self) -> PathBuf {
        self.tb.dir().join("agent-state")
    }

    /// netredird with `env` (`NAME=VALUE`) in its environment.
    pub fn with_env(tag: &str, env: &[&str], daemon_args: &[&str]) -> Result<Self> {
        let tb = Testbed::new(tag)?;
        let control = tb.dir().join("control.sock");
        let r = Self { tb, control };
        r.start_daemon_env(env, daemon_args)?;
        Ok(r)
    }

    /// netredird with no VM attached (they come by `vm attach`).
    pub fn without_vm(tag: &str, daemon_args: &[&str]) -> Result<Self> {
        let tb = Testbed::new(tag)?;
        let control = tb.dir().join("control.sock");
        let r = Self { tb, control };
        r.start("netredird", &[], false, daemon_args)?;
        Ok(r)
    }

    /// Starts netredird on the host end of the VM's NIC.
    pub fn start_daemon(&self, extra: &[&str]) -> Result<()> {
        self.start_daemon_env(&[], extra)
    }

    /// The same with `env` (`NAME=VALUE`) in its environment.
    pub fn start_daemon_env(&self, env: &[&str], extra: &[&str]) -> Result<()> {
        self.start("netredird", env, true, extra)
    }

    /// netredird again (after the first one stopped), on the same state
    /// and control socket, as process `name` (its log `name.log`).
    pub fn restart_daemon(&self, name: &str, extra: &[&str]) -> Result<()> {
        self.start(name, &[], true, extra)
    }

    fn start(&self, name: &str, env: &[&str], with_vm: bool, extra: &[&str]) -> Result<()> {
        let listen = format!("{HOST_WAN_IP}:{TUNNEL_PORT}");
        let control = self.control.to_string_lossy().into_owned();
        let state = self.host_state().to_string_lossy().into_owned();
        let mut args = vec![
            // Hermetic: never the host's own /etc/netredir/netredird.toml.
            "--config",
            "/dev/null",
            "--listen",
            &listen,
            "--control",
            &control,
            "--state-dir",
            &state,
            "--log",
            "debug",
        ];
        if with_vm {
            args.extend(["--iface", HOST_VM_IFACE]);
        }
        args.extend_from_slice(extra);
        let daemon = bin("netredird")?;
        if env.is_empty() {
            self.tb.spawn(&self.tb.host, name, daemon, &args)?;
        } else {
            // env(1) sets them and execs netredird in the same process.
            let d = daemon.to_string_lossy().into_owned();
            let mut all: Vec<&str> = env.to_vec();
            all.push(&d);
            all.extend_from_slice(&args);
            self.tb.spawn(&self.tb.host, name, "env", &all)?;
        }
        wait_until(
            "netredird to answer on its control socket",
            Duration::from_secs(20),
            || {
                !self.tb.running(name)
                    || request(&self.control, &Request::VmList, Duration::from_secs(5)).is_ok()
            },
        )?;
        if !self.tb.running(name) {
            bail!("netredird exited at start:\n{}", self.tb.log_tail(name));
        }
        Ok(())
    }

    /// A one-time pairing code from the daemon.
    pub fn pair_code(&self) -> Result<String> {
        self.pair_code_for(None)
    }

    /// A one-time pairing code for VM `vm` (or the only one).
    pub fn pair_code_for(&self, vm: Option<&str>) -> Result<String> {
        match request(
            &self.control,
            &Request::Pair {
                vm: vm.map(str::to_string),
            },
            Duration::from_secs(5),
        )? {
            Response::Pair { code, .. } => Ok(code),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Starts an agent in the client namespace exporting `exports`
    /// (`NAME=HOST:PORT`), pairing it first if it is not yet, and waits
    /// until the daemon lists them online.
    pub fn start_agent(&self, name: &str, exports: &[&str]) -> Result<()> {
        self.start_agent_with(name, exports, &[])
    }

    /// The same, with extra agent arguments.
    pub fn start_agent_with(&self, name: &str, exports: &[&str], extra: &[&str]) -> Result<()> {
        self.start_agent_for(None, &self.agent_state(), name, exports, extra)
    }

    /// An agent for VM `vm` (or the only one) with its own state
    /// directory `state` (its key: one agent per VM).
    pub fn start_agent_for(
        &self,
        vm: Option<&str>,
        state: &std::path::Path,
        name: &str,
        exports: &[&str],
        extra: &[&str],
    ) -> Result<()> {
        let connect = format!("{HOST_WAN_IP}:{TUNNEL_PORT}");
        let state_dir = state.to_string_lossy().into_owned();
        let mut args = vec![
            "--connect",
            &connect,
            "--state-dir",
            &state_dir,
            "--log",
            "debug",
        ];
        let code;
        if !state.join("host.pin").exists() {
            code = self.pair_code_for(vm)?;
            args.extend(["--pair", &code]);
        }
        for e in exports {
            args.extend(["--export", e]);
        }
        args.extend_from_slice(extra);
        self.tb
            .spawn(&self.tb.client, name, bin("netredir-agent")?, &args)?;
        let names: Vec<&str> = exports.iter().filter_map(|e| e.split('=').next()).collect();
        // This agent's session first: the map may still show a previous
        // agent's exports online until the host has taken the new Hello.
        let log = self.tb.dir().join(format!("{name}.log"));
        wait_until("the agent to be connected", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .is_ok_and(|s| s.contains("connected to netredird; exports announced"))
        })
        .with_context(|| format!("agent log:\n{}", self.tb.log_tail(name)))?;
        wait_until(
            "the agent's exports to be online",
            Duration::from_secs(20),
            || {
                self.map_for(vm).is_ok_and(|m| {
                    names
                        .iter()
                        .all(|n| m.iter().any(|e| e.name == *n && e.state == "online"))
                })
            },
        )
        .with_context(|| format!("agent log:\n{}", self.tb.log_tail(name)))
    }

    /// The daemon's resource table.
    pub fn map(&self) -> Result<Vec<MapEntry>> {
        self.map_for(None)
    }

    /// VM `vm`'s resource table (or the only VM's).
    pub fn map_for(&self, vm: Option<&str>) -> Result<Vec<MapEntry>> {
        let req = Request::MapList {
            vm: vm.map(str::to_string),
        };
        match request(&self.control, &req, Duration::from_secs(5))? {
            Response::Map { entries } => Ok(entries),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// The daemon's status.
    pub fn status(&self) -> Result<Status> {
        match request(
            &self.control,
            &Request::Status { vm: None },
            Duration::from_secs(5),
        )? {
            Response::Status(s) => Ok(s),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// The daemon's tunnel statistics.
    pub fn stats(&self) -> Result<Stats> {
        match request(
            &self.control,
            &Request::Stats { vm: None },
            Duration::from_secs(5),
        )? {
            Response::Stats(s) => Ok(s),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// One counter from the status, 0 if absent.
    pub fn counter(&self, name: &str) -> Result<u64> {
        Ok(self
            .status()?
            .counters
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v))
    }

    /// Resource `name`'s row of the map.
    fn entry(&self, name: &str) -> Result<MapEntry> {
        self.entry_for(None, name)
    }

    fn entry_for(&self, vm: Option<&str>, name: &str) -> Result<MapEntry> {
        let m = self.map_for(vm)?;
        m.iter()
            .find(|e| e.name == name)
            .cloned()
            .with_context(|| format!("no resource {name} in {m:?}"))
    }

    /// The vIP of resource `name`.
    pub fn vip(&self, name: &str) -> Result<Ipv4Addr> {
        Ok(self.entry(name)?.vip.parse()?)
    }

    /// The vIP of resource `name` of VM `vm`.
    pub fn vip_for(&self, vm: &str, name: &str) -> Result<Ipv4Addr> {
        Ok(self.entry_for(Some(vm), name)?.vip.parse()?)
    }

    /// The IPv6 vIP of resource `name`.
    pub fn vip6(&self, name: &str) -> Result<std::net::Ipv6Addr> {
        Ok(self.entry(name)?.vip6.parse()?)
    }

    /// Waits until something in the lan namespace listens on TCP `port`.
    pub fn wait_listening(&self, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        wait_until(
            &format!("a listener on lan port {port}"),
            Duration::from_secs(10),
            || {
                self.tb
                    .lan
                    .run("ss", &["-Hltn", &filter])
                    .is_ok_and(|o| !o.stdout.is_empty())
            },
        )
    }

    /// Waits until something in the lan namespace listens on UDP `port`.
    pub fn wait_listening_udp(&self, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        wait_until(
            &format!("a UDP listener on lan port {port}"),
            Duration::from_secs(10),
            || {
                self.tb
                    .lan
                    .run("ss", &["-Hlun", &filter])
                    .is_ok_and(|o| !o.stdout.is_empty())
            },
        )
    }

    /// A real SNMP agent (snmpd) on the LAN server, community `public`,
    /// whose sysDescr is `descr`.
    pub fn snmpd(&self, descr: &str) -> Result<()> {
        let conf = self.tb.dir().join("snmpd.conf");
        std::fs::write(
            &conf,
            format!(
                "agentAddress udp:{}:161\nrocommunity public default\nsysDescr {descr}\n",
                testbed::LAN_IP
            ),
        )?;
        let state = self.tb.dir().join("snmp-state");
        std::fs::create_dir_all(&state)?;
        let conf = conf.to_string_lossy().into_owned();
        let pid = self
            .tb
            .dir()
            .join("snmpd.pid")
            .to_string_lossy()
            .into_owned();
        let mut cmd_env = vec![
            "env".to_string(),
            format!("SNMP_PERSISTENT_DIR={}", state.display()),
        ];
        cmd_env.extend(["snmpd", "-f", "-Lo", "-C", "-c", &conf, "-p", &pid].map(String::from));
        let args: Vec<&str> = cmd_env[1..].iter().map(String::as_str).collect();
        self.tb.spawn(&self.tb.lan, "snmpd", &cmd_env[0], &args)?;
        self.wait_listening_udp(161)
    }

    /// A private D-Bus system bus and avahi-daemon in `ns` (what
    /// ippeveprinter and the avahi tools talk to); the bus's address. The
    /// daemon's pid file and socket live in a tmpfs of its own mount
    /// namespace, so tests running side by side each have theirs.
    pub fn avahi(&self, ns: &testbed::Netns) -> Result<String> {
        let dir = self.tb.dir().join(format!("avahi-{}", ns.name()));
        std::fs::create_dir_all(&dir)?;
        let bus = dir.join("bus");
        let conf = dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                bus.display()
            ),
        )?;
        let tag = ns.name().to_string();
        let conf = conf.to_string_lossy().into_owned();
        self.tb.spawn(
            ns,
            &format!("dbus-{tag}"),
            "dbus-daemon",
            &["--nofork", "--nopidfile", "--config-file", &conf],
        )?;
        wait_until("the private D-Bus socket", Duration::from_secs(10), || {
            bus.exists()
        })?;
        let address = format!("unix:path={}", bus.display());
        let aconf = dir.join("avahi-daemon.conf");
        // A host name of its own: the namespaces' hostname is the machine's.
        let host: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        std::fs::write(
            &aconf,
            format!(
                "[server]\nhost-name={host}\nuse-ipv4=yes\nuse-ipv6=yes\nenable-dbus=yes\n[wide-area]\nenable-wide-area=no\n[publish]\npublish-hinfo=no\npublish-workstation=no\n"
            ),
        )?;
        let script = format!(
            "mount -t tmpfs netredir-avahi /run/avahi-daemon 2>/dev/null || {{ mkdir -p /run/avahi-daemon && mount -t tmpfs netredir-avahi /run/avahi-daemon; }}; exec avahi-daemon -f {} --no-chroot --no-drop-root --no-rlimits",
            aconf.display()
        );
        let env = format!("DBUS_SYSTEM_BUS_ADDRESS={address}");
        self.tb.spawn(
            ns,
            &format!("avahi-{tag}"),
            "env",
            &[&env, "sh", "-c", &script],
        )?;
        let name = format!("avahi-{tag}");
        wait_until("avahi-daemon on its bus", Duration::from_secs(10), || {
            !self.tb.running(&name)
                || ns
                    .command("env")
                    .args([&env, "avahi-browse", "-at", "-k"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        })?;
        if !self.tb.running(&name) {
            bail!("avahi-daemon exited:\n{}", self.tb.log_tail(&name));
        }
        Ok(address)
    }

    /// A CUPS scheduler of its own in `ns` (a guest's print system), its
    /// state under the testbed's directory; the socket `lpadmin` and `lp`
    /// reach it at (their `CUPS_SERVER`).
    pub fn cupsd(&self, ns: &testbed::Netns) -> Result<String> {
        let dir = self.tb.dir().join(format!("cups-{}", ns.name()));
        for sub in ["etc/ppd", "spool/tmp", "cache", "state/certs", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Backends run as lp: it reads the spool and writes its temp
        // files, through directories it may enter.
        for d in [self.tb.dir(), dir.as_path()] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        let lp = std::process::Command::new("chown")
            .args(["-R", "lp:lp"])
            .arg(dir.join("spool"))
            .status()?;
        if !lp.success() {
            bail!("cannot give the CUPS spool to lp");
        }
        let d = dir.display();
        let sock = format!("{d}/cups.sock");
        std::fs::write(
            dir.join("etc/cupsd.conf"),
            format!(
                "Listen {sock}\nLogLevel debug\nBrowsing No\nDefaultAuthType None\n\
                 <Location />\n  Order allow,deny\n  Allow all\n</Location>\n\
                 <Location /admin>\n  Order allow,deny\n  Allow all\n</Location>\n\
                 <Policy default>\n  <Limit All>\n    Order deny,allow\n  </Limit>\n</Policy>\n"
            ),
        )?;
        std::fs::write(
            dir.join("cups-files.conf"),
            format!(
                "ServerRoot {d}/etc\nRequestRoot {d}/spool\nTempDir {d}/spool/tmp\n\
                 CacheDir {d}/cache\nStateDir {d}/state\nServerBin /usr/lib/cups\n\
                 DataDir /usr/share/cups\nAccessLog {d}/log/access_log\n\
                 ErrorLog stderr\nPageLog {d}/log/page_log\nUser lp\nGroup lp\n\
                 SystemGroup root\nFileDevice No\n"
            ),
        )?;
        let conf = format!("{d}/etc/cupsd.conf");
        let files = format!("{d}/cups-files.conf");
        let name = format!("cupsd-{}", ns.name());
        self.tb
            .spawn(ns, &name, "cupsd", &["-f", "-c", &conf, "-s", &files])?;
        let s = sock.clone();
        wait_until("cupsd to answer", Duration::from_secs(15), || {
            !self.tb.running(&name)
                || ns
                    .command("lpstat")
                    .args(["-h", &s, "-r"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("is running"))
        })?;
        if !self.tb.running(&name) {
            bail!("cupsd exited:\n{}", self.tb.log_tail(&name));
        }
        Ok(sock)
    }

    /// CUPS's IPP Everywhere printer on the LAN at `port`, on every
    /// address, keeping each job's document in `spool`. As real printers
    /// and cupsd, it answers 400 to a `Host` that is neither its name nor
    /// an address; its URIs name what the client's `Host` said. It needs
    /// avahi, started here too.
    pub fn ippeveprinter(&self, name: &str, port: u16, spool: &std::path::Path) -> Result<()> {
        let bus = self.avahi(&self.tb.lan)?;
        std::fs::create_dir_all(spool)?;
        let env = format!("DBUS_SYSTEM_BUS_ADDRESS={bus}");
        let port_s = port.to_string();
        let spool_s = spool.to_string_lossy().into_owned();
        self.tb.spawn(
            &self.tb.lan,
            name,
            "env",
            &[
                &env,
                "ippeveprinter",
                "-p",
                &port_s,
                "-d",
                &spool_s,
                "-k",
                // Jobs "print" at once (the default is 5-15 s of
                // simulated printing, while further jobs are refused).
                "-c",
                "/bin/true",
                "-f",
                "application/pdf,application/octet-stream",
                name,
            ],
        )?;
        self.wait_listening(port)
            .with_context(|| format!("ippeveprinter's log:\n{}", self.tb.log_tail(name)))
    }

    /// Prints `job` from the VM to `addr`, whose printer is
    /// [`Redir::printer_once`] `printer` writing to `file`: the guest gets
    /// a clean end and nothing back, the printer exits, and `file` holds
    /// the job byte for byte.
    pub fn print_whole(
        &self,
        addr: std::net::SocketAddr,
        job: &[u8],
        printer: &str,
        file: &std::path::Path,
    ) -> Result<()> {
        let leftover = self.tb.vm.enter(|| print_job(addr, job))??;
        if !leftover.is_empty() {
            bail!("the printer sent {} bytes back", leftover.len());
        }
        let st = self.tb.wait_exit(printer, Duration::from_secs(60))?;
        if !st.success() {
            bail!("{printer} exited with {st}");
        }
        let got = std::fs::read(file)?;
        if got.len() != job.len() || sha256_hex(&got) != sha256_hex(job) {
            bail!("{} bytes arrived of {}, or others", got.len(), job.len());
        }
        Ok(())
    }

    /// A printer that takes one job on `port` and writes it to `file`
    /// (socat), exiting when the job's connection closes.
    pub fn printer_once(&self, name: &str, port: u16, file: &std::path::Path) -> Result<()> {
        let listen = format!("TCP-LISTEN:{port},reuseaddr");
        let out = format!("OPEN:{},creat,trunc", file.display());
        self.tb
            .spawn(&self.tb.lan, name, "socat", &["-u", &listen, &out])?;
        self.wait_listening(port)
    }

    /// A sink for many connections on `port`: each gets back the sha256
    /// of what it sent, after it half-closes (socat + sha256sum).
    pub fn digest_sink(&self, name: &str, port: u16) -> Result<()> {
        let listen = format!("TCP-LISTEN:{port},reuseaddr,fork,backlog=512");
        self.tb
            .spawn(&self.tb.lan, name, "socat", &[&listen, "SYSTEM:sha256sum"])?;
        self.wait_listening(port)
    }

    /// An echo server for many connections on `port` (socat).
    pub fn echo(&self, name: &str, port: u16) -> Result<()> {
        let listen = format!("TCP-LISTEN:{port},reuseaddr,fork,backlog=512");
        self.tb.spawn(
            &self.tb.lan,
            name,
            "socat",
            &["-b", ECHO_BLOCK, &listen, "PIPE"],
        )?;
        self.wait_listening(port)
    }
}

/// socat's block size for echo servers (`-b`). socat writes into a pipe
/// (`PIPE`, `EXEC:cat`) with blocking writes of up to its block size once
/// poll says the pipe has room, which is one page; with the default 8192
/// a write can block on a pipe that only socat itself drains, and the
/// echo stops for good when its output backs up (seen in the fault test
/// during tunnel outages: socat in `anon_pipe_write`). A page never blocks.
pub const ECHO_BLOCK: &str = "4096";

/// Deterministic bytes that look like a print job: PJL and PostScript
/// text interleaved with raster runs, `len` bytes from `seed`.
pub fn job_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    let mut rng = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    out.extend_from_slice(b"\x1b%-12345X@PJL JOB NAME=\"netredir\"\r\n@PJL ENTER LANGUAGE=POSTSCRIPT\r\n%!PS-Adobe-3.0\n");
    let mut page = 0;
    while out.len() < len {
        page += 1;
        out.extend_from_slice(
            format!("%%Page: {page} {page}\n/Helvetica findfont 12 scalefont setfont\n").as_bytes(),
        );
        for line in 0..40 {
            out.extend_from_slice(
                format!(
                    "72 {} moveto (Line {line} of page {page}) show\n",
                    720 - line * 16
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(b"gsave 100 100 translate 400 300 scale 400 300 8 [400 0 0 -300 0 300] currentfile /ASCIIHexDecode filter image\n");
        for _ in 0..2048 {
            let v = rng();
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(b"\ngrestore showpage\n");
    }
    out.truncate(len);
    out
}

/// A text-only PostScript job (no raster): what compresses well, `len`
/// bytes from `seed`.
pub fn text_job(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 4096);
    out.extend_from_slice(b"%!PS-Adobe-3.0\n%%Title: netredir text job\n");
    let mut page = seed;
    while out.len() < len {
        page += 1;
        out.extend_from_slice(
            format!("%%Page: {page} {page}\n/Times-Roman findfont 11 scalefont setfont\n")
                .as_bytes(),
        );
        for line in 0..60u64 {
            let words = [
                "invoice", "total", "amount", "customer", "netredir", "printer", "page", "order",
            ];
            let w = words[((line * 7 + page) % 8) as usize];
            out.extend_from_slice(
                format!(
                    "72 {} moveto ({w} {} of page {page}: {}) show\n",
                    760 - line * 12,
                    line,
                    (line * 31 + page * 17) % 1000
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(b"showpage\n");
    }
    out.truncate(len);
    out
}

/// `len` pseudo-random bytes (xorshift64) from `seed`: what already
/// compressed or encrypted data looks like.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A TCP connection with 10 s to connect and 60 s for each read and write,
/// so a broken path fails a test instead of hanging it.
pub fn connect(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Sends `job` as a print client does: connect, write it all, half-close,
/// then read until the server closes; returns what the server sent back.
pub fn print_job(addr: std::net::SocketAddr, job: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = connect(addr)?;
    s.write_all(job)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(rest)
}

/// `netredirctl --control CONTROL ARGS...`: (exit ok, stdout, stderr).
pub fn netredirctl(control: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin("netredirctl").expect("netredirctl built"))
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("netredirctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A raw IPv4 socket (whole packets, header included): for floods a real
/// stack would not send. Made in the caller's network namespace.
pub struct RawIp(std::os::fd::OwnedFd);

impl RawIp {
    /// Opens it (needs CAP_NET_RAW).
    pub fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends IPv4 packet `pkt` toward `dst`; whether it went.
    pub fn send(&self, pkt: &[u8], dst: Ipv4Addr) -> bool {
        use std::os::fd::AsRawFd;
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a live buffer and sockaddr of the size given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        n > 0
    }
}

/// A TCP SYN from the VM (10.200.0.2) port `sport` to `dst:dport`, IPv4
/// header included, for a raw socket (the kernel fills in checksum and id).
pub fn raw_syn(sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 200, 0, 2];
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
