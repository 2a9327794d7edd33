//! The control API server: line-delimited JSON on a unix socket.
//!
//! It runs on its own thread with blocking I/O (a handful of requests a
//! minute); whatever it needs from the data path it asks over the crossbeam
//! channel and waits for the answer with a timeout.

use crate::datapath::Request as DpRequest;
use anyhow::{Context, Result, bail};
use crossbeam_channel::Sender;
use netredir_datapath::steer::Steer;
use netredir_shared::control::{Request, Response};
use netredir_uring::Waker;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The bound control socket.
pub struct Server {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Server {
    /// Binds `path`, creating its directory; a stale socket from a dead
    /// daemon is replaced, a live one is an error.
    pub fn bind(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is in use: another netredird runs with it (use --control)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot bind control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            listener: Some(listener),
        })
    }

    /// Serves requests on a thread of its own until the process exits.
    pub fn spawn(
        &mut self,
        dp: Sender<DpRequest>,
        waker: Arc<Waker>,
        steer: Arc<Mutex<Steer>>,
    ) -> Result<()> {
        let listener = self
            .listener
            .take()
            .context("control server started twice")?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            if let Err(e) = serve(s, &dp, &waker, &steer) {
                                tracing::debug!("control client: {e:#}");
                            }
                        }
                        Err(e) => tracing::warn!("control accept: {e}"),
                    }
                }
            })
            .context("cannot start the control thread")?;
        Ok(())
    }

    /// Removes the socket file.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(s: UnixStream, dp: &Sender<DpRequest>, waker: &Waker, steer: &Mutex<Steer>) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&s);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, dp, waker, steer),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_string(&resp)?;
        out.push('\n');
        (&s).write_all(out.as_bytes())?;
        line.clear();
    }
    Ok(())
}

fn answer(req: Request, dp: &Sender<DpRequest>, waker: &Waker, steer: &Mutex<Steer>) -> Response {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let sent = match req {
        Request::MapList => dp.send(DpRequest::MapList(tx.clone())),
        Request::Status => dp.send(DpRequest::Status(tx.clone())),
        Request::Stats => dp.send(DpRequest::Stats(tx.clone())),
        Request::Pair { vm } => dp.send(DpRequest::Pair(vm, tx.clone())),
    };
    if sent.is_err() {
        return Response::Error {
            message: "data path is not running".into(),
        };
    }
    waker.wake();
    match rx.recv_timeout(Duration::from_secs(3)) {
        Ok(Response::Status(mut st)) => {
            if let Ok(s) = steer.lock() {
                st.counters.extend(
                    s.counters()
                        .into_iter()
                        .map(|(k, v)| (format!("steer.{k}"), v)),
                );
            }
            Response::Status(st)
        }
        Ok(r) => r,
        Err(_) => Response::Error {
            message: "data path did not answer in 3 s".into(),
        },
    }
}
