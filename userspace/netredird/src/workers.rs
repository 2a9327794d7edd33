//! The data path's workers and what routes requests to them.
//!
//! `--workers N` data path threads (default: one per core), each an
//! io_uring loop driving many VMs ([`crate::datapath`]). A VM lives on one
//! worker for as long as it is attached (chosen at attach: the one with
//! the fewest VMs), with its AF_XDP socket, its engine, its session and
//! its agent's tunnel connection, so a VM's hot path never crosses
//! threads and never takes a lock. Worker 0 also owns the tunnel listener:
//! it runs every connection's TLS handshake and preamble, and once the
//! agent's key has selected a VM it hands the connection (socket, TLS
//! state and all) to that VM's worker, which resumes or starts the
//! session. Within a worker VMs are served in turn, each taking at most
//! one ring of frames and one receive per turn, so a flooding VM cannot
//! starve the others of its worker.
//!
//! What all workers share, behind locks taken off the hot path: the
//! [`Registry`] of attached VMs (name → worker), the paired agents, and
//! the daemon's own counters. The control and metrics threads ask through
//! [`Workers`], which sends each request to the worker of the VM it names,
//! or to all of them and merges the answers.

use crate::counters::DaemonCounters;
use crate::datapath::{self, Request, VmSetup};
use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use netredir_shared::control::{Request as Ctl, Response};
use netredir_shared::pairing::{CODE_LIFETIME, PairStore};
use netredir_shared::tls::Fingerprint;
use netredir_uring::Waker;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where an attached VM lives.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its worker.
    pub worker: usize,
    /// Its id there (unique in the process, never reused).
    pub id: u64,
    /// The host end of its NIC.
    pub iface: String,
}

/// The attached VMs of every worker, by name: what routes a request or an
/// agent's connection to the right worker.
#[derive(Default)]
pub struct Registry {
    vms: Mutex<BTreeMap<String, Entry>>,
    next_id: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new VM id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Why a VM of this name or on this NIC cannot attach, if so.
    pub fn taken(&self, name: &str, iface: &str) -> Option<String> {
        taken(&self.lock(), name, iface)
    }

    /// Records an attached VM, unless its name or NIC is taken (checked
    /// again here: two attaches may race).
    pub fn insert(&self, name: &str, e: Entry) -> Result<(), String> {
        let mut vms = self.lock();
        if let Some(why) = taken(&vms, name, &e.iface) {
            return Err(why);
        }
        vms.insert(name.to_string(), e);
        Ok(())
    }

    /// Forgets a detached VM.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// The VM of this name.
    pub fn get(&self, name: &str) -> Option<Entry> {
        self.lock().get(name).cloned()
    }

    /// Every attached VM.
    pub fn all(&self) -> Vec<(String, Entry)> {
        self.lock()
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// The VM a request names, or the only one attached, or why none.
    pub fn resolve(&self, vm: Option<&str>) -> Result<(String, Entry), String> {
        let vms = self.lock();
        match vm {
            Some(name) => vms
                .get(name)
                .map(|e| (name.to_string(), e.clone()))
                .ok_or_else(|| format!("no VM {name:?} is attached (see `netredirctl vm list`)")),
            None => {
                let mut it = vms.iter();
                match (it.next(), it.next()) {
                    (Some((n, e)), None) => Ok((n.clone(), e.clone())),
                    (None, _) => Err(
                        "no VM is attached: attach one with `netredirctl vm attach NAME --iface IF`"
                            .into(),
                    ),
                    _ => Err(format!(
                        "{} VMs are attached: say which with --vm NAME (see `netredirctl vm list`)",
                        vms.len()
                    )),
                }
            }
        }
    }

    fn per_worker(&self, n: usize) -> Vec<usize> {
        let mut count = vec![0; n];
        for e in self.lock().values() {
            if let Some(c) = count.get_mut(e.worker) {
                *c += 1;
            }
        }
        count
    }
}

fn taken(vms: &BTreeMap<String, Entry>, name: &str, iface: &str) -> Option<String> {
    if let Some(e) = vms.get(name) {
        return Some(format!("VM {name:?} is already attached (on {})", e.iface));
    }
    vms.iter()
        .find(|(_, e)| e.iface == iface)
        .map(|(n, _)| format!("{iface} already carries VM {n:?}"))
}

/// A worker's thread, to join.
pub type Worker = JoinHandle<Result<()>>;

/// A worker's mailbox.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<Request>,
    waker: Arc<Waker>,
}

impl Mailbox {
    /// Delivers `req` and wakes the worker; false if it has stopped.
    pub fn send(&self, req: Request) -> bool {
        let ok = self.tx.send(req).is_ok();
        self.waker.wake();
        ok
    }
}

/// What the rest of the daemon holds to reach the workers.
pub struct Workers {
    mailboxes: Vec<Mailbox>,
    registry: Arc<Registry>,
    pairs: Arc<Mutex<PairStore>>,
    daemon: Arc<DaemonCounters>,
    host: Fingerprint,
}

/// How long the control plane waits for a worker's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

impl Workers {
    /// Starts `n` workers; worker 0 accepts agents on `listener`.
    pub fn start(
        n: usize,
        cfg: datapath::Config,
        listener: TcpListener,
    ) -> Result<(Arc<Self>, Vec<Worker>)> {
        let n = n.max(1);
        let mut mailboxes = Vec::new();
        let mut inboxes: Vec<(Receiver<Request>, Arc<Waker>)> = Vec::new();
        for _ in 0..n {
            let waker = Arc::new(Waker::new().context("cannot create eventfd")?);
            let (tx, rx) = crossbeam_channel::bounded(256);
            mailboxes.push(Mailbox {
                tx,
                waker: waker.clone(),
            });
            inboxes.push((rx, waker));
        }
        let mut listener = Some(listener);
        let mut threads = Vec::new();
        for (i, (rx, waker)) in inboxes.into_iter().enumerate() {
            let (cfg, l, peers) = (cfg.clone(), listener.take(), mailboxes.clone());
            let t = std::thread::Builder::new()
                .name(format!("datapath-{i}"))
                .spawn(move || datapath::run(i, cfg, l, rx, waker, peers))
                .context("cannot start a data path thread")?;
            threads.push(t);
        }
        let w = Workers {
            mailboxes,
            registry: cfg.registry.clone(),
            pairs: cfg.pairs.clone(),
            daemon: cfg.daemon.clone(),
            host: cfg.identity.fingerprint(),
        };
        Ok((Arc::new(w), threads))
    }

    fn ask(&self, worker: usize, make: impl FnOnce(Sender<Response>) -> Request) -> Response {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.mailboxes[worker].send(make(tx)) {
            return error("data path is not running");
        }
        rx.recv_timeout(ANSWER_TIMEOUT)
            .unwrap_or_else(|_| error("data path did not answer in 3 s"))
    }

    /// Answers a control request (all but `VmAttach`, see
    /// [`crate::attach::attach`]).
    pub fn answer(&self, req: Ctl) -> Response {
        type Make = fn(Option<String>, Sender<Response>) -> Request;
        let on_vm = |vm: Option<String>, make: Make| match self.registry.resolve(vm.as_deref()) {
            Ok((name, e)) => self.ask(e.worker, |tx| make(Some(name), tx)),
            Err(why) => error(why),
        };
        match req {
            Ctl::MapList { vm } => on_vm(vm, Request::MapList),
            Ctl::MapEdit { vm, edit } => match self.registry.resolve(vm.as_deref()) {
                Ok((name, e)) => self.ask(e.worker, |tx| Request::MapEdit(Some(name), edit, tx)),
                Err(why) => error(why),
            },
            Ctl::Status { vm } => on_vm(vm, Request::Status),
            Ctl::Stats { vm } => on_vm(vm, Request::Stats),
            Ctl::VmDetach { name } => match self.registry.get(&name) {
                Some(e) => self.ask(e.worker, |tx| Request::Detach(name, tx)),
                None => error(format!(
                    "no VM {name:?} is attached (see `netredirctl vm list`)"
                )),
            },
            Ctl::VmList => {
                let mut vms = Vec::new();
                for w in 0..self.mailboxes.len() {
                    match self.ask(w, Request::VmList) {
                        Response::Vms { vms: v } => vms.extend(v),
                        other => return other,
                    }
                }
                vms.sort_by(|a, b| a.name.cmp(&b.name));
                Response::Vms { vms }
            }
            Ctl::Pair { vm } => self.pair(vm),
            Ctl::PairsList { vm } => Response::Pairs {
                agents: self.pairs().list(vm.as_deref()),
            },
            Ctl::Unpair { vm, key } => self.unpair(vm, &key),
            Ctl::VmAttach(_) => error("internal: attach goes through attach::attach"),
        }
    }

    fn pairs(&self) -> MutexGuard<'_, PairStore> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why a VM of this name or on this NIC cannot attach, if so.
    pub fn taken(&self, name: &str, iface: &str) -> Option<String> {
        self.registry.taken(name, iface)
    }

    /// Hands a prepared VM to the worker with the fewest VMs.
    pub fn attach(&self, setup: VmSetup) -> Response {
        let load = self.registry.per_worker(self.mailboxes.len());
        let w = (0..load.len()).min_by_key(|i| load[*i]).unwrap_or(0);
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.mailboxes[w].send(Request::Attach(Box::new(setup), tx)) {
            return error("data path is not running");
        }
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| error("data path did not answer in 10 s"))
    }

    /// The Prometheus text for every VM of every worker.
    pub fn metrics(&self) -> Option<String> {
        let mut vms = Vec::new();
        for m in &self.mailboxes {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if !m.send(Request::Metrics(tx)) {
                return None;
            }
            vms.extend(rx.recv_timeout(ANSWER_TIMEOUT).ok()?);
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Some(crate::metrics::render(&vms, &self.daemon.pairs()))
    }

    /// Stops every worker (each detaches its VMs).
    pub fn shutdown(&self) {
        for m in &self.mailboxes {
            m.send(Request::Shutdown);
        }
    }

    fn pair(&self, vm: Option<String>) -> Response {
        // A VM may be paired before it is attached (its name is enough).
        let name = match (vm, self.registry.resolve(None)) {
            (Some(name), _) => name,
            (None, Ok((name, _))) => name,
            (None, Err(e)) => return error(e),
        };
        if name.trim().is_empty() {
            return error("--vm needs a name (the libvirt domain's name or UUID)");
        }
        let code = self.pairs().issue(&self.host, &name, Instant::now());
        tracing::info!(vm = %name, "pairing code issued");
        Response::Pair {
            code: code.to_string(),
            vm: name,
            host_fingerprint: self.host.to_hex(),
            valid_for_secs: CODE_LIFETIME.as_secs(),
        }
    }

    /// Forgets a paired agent of a VM; ends its session if it has one.
    fn unpair(&self, vm: Option<String>, key: &str) -> Response {
        // A VM that is not attached may have pairings too: name it.
        let name = match (&vm, self.registry.resolve(vm.as_deref())) {
            (_, Ok((name, _))) => name,
            (Some(name), Err(_)) => name.clone(),
            (None, Err(e)) => return error(e),
        };
        let agent = match self.pairs().unpair(&name, key) {
            Ok(a) => a,
            Err(e) => return error(e.to_string()),
        };
        tracing::info!(agent = %agent.name, key = %agent.fingerprint, vm = %name, "agent unpaired");
        let mut session_ended = false;
        if let Some(e) = self.registry.get(&name) {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let fp = agent.fingerprint.clone();
            if self.mailboxes[e.worker].send(Request::EndSession(name, fp, tx)) {
                session_ended = rx.recv_timeout(ANSWER_TIMEOUT).unwrap_or(false);
            }
        }
        Response::Unpaired {
            agent,
            session_ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(worker: usize, id: u64, iface: &str) -> Entry {
        Entry {
            worker,
            id,
            iface: iface.into(),
        }
    }

    #[test]
    fn a_name_or_nic_is_taken_once_and_free_again_after_detach() {
        let r = Registry::default();
        r.insert("desk-a", entry(0, 1, "vnet0")).unwrap();
        let e = r.insert("desk-a", entry(1, 2, "vnet1")).unwrap_err();
        assert!(e.contains("already attached (on vnet0)"), "{e}");
        let e = r.insert("desk-b", entry(1, 2, "vnet0")).unwrap_err();
        assert!(e.contains("vnet0 already carries VM \"desk-a\""), "{e}");
        assert!(r.taken("desk-b", "vnet1").is_none());
        r.remove("desk-a");
        r.insert("desk-b", entry(1, 2, "vnet0")).unwrap();
        assert_eq!(r.get("desk-b").unwrap().worker, 1);
    }

    #[test]
    fn no_name_means_the_only_vm_and_several_must_be_named() {
        let r = Registry::default();
        assert!(r.resolve(None).unwrap_err().contains("no VM is attached"));
        r.insert("desk-a", entry(0, 1, "vnet0")).unwrap();
        assert_eq!(r.resolve(None).unwrap().0, "desk-a");
        r.insert("desk-b", entry(1, 2, "vnet1")).unwrap();
        assert!(r.resolve(None).unwrap_err().contains("2 VMs are attached"));
        assert_eq!(r.resolve(Some("desk-b")).unwrap().1.id, 2);
        assert!(
            r.resolve(Some("desk-c"))
                .unwrap_err()
                .contains("no VM \"desk-c\"")
        );
        assert_eq!(r.per_worker(3), vec![1, 1, 0]);
    }

    #[test]
    fn ids_are_never_reused() {
        let r = Registry::default();
        let a = r.next_id();
        let b = r.next_id();
        assert!(a != b && a != 0 && b != 0);
    }
}
