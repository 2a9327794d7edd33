//! The control API server: line-delimited JSON on a unix socket.
//!
//! It runs on its own threads with blocking I/O (a handful of requests a
//! minute): one per client, at most [`MAX_CLIENTS`] at once, so a client
//! that stalls holds only its own; a request line is at most [`MAX_LINE`]
//! bytes and each read waits at most 5 s. Whatever it needs from the data
//! path it asks the workers (through [`Workers`]) and waits for the answer
//! with a timeout.

use crate::attach::Defaults;
use crate::workers::Workers;
use anyhow::{Context, Result, bail};
use netredir_shared::control::{Request, Response};
use std::io::Read;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Longest request line; longer ones get an error and the connection ends.
pub const MAX_LINE: usize = 64 * 1024;
/// Most clients served at once; more get an error at once.
pub const MAX_CLIENTS: usize = 16;

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
    pub fn spawn(&mut self, dp: Arc<Workers>, defaults: Arc<Defaults>) -> Result<()> {
        let listener = self
            .listener
            .take()
            .context("control server started twice")?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let busy = Arc::new(AtomicUsize::new(0));
                for conn in listener.incoming() {
                    let s = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("control accept: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        busy.fetch_sub(1, Ordering::SeqCst);
                        let _ = reply(
                            &s,
                            &Response::Error {
                                message: format!("busy: {MAX_CLIENTS} clients are being served"),
                            },
                        );
                        continue;
                    }
                    let (dp, defaults, busy) = (dp.clone(), defaults.clone(), busy.clone());
                    let spawned = std::thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || {
                            if let Err(e) = serve(s, &dp, &defaults) {
                                tracing::debug!("control client: {e:#}");
                            }
                            busy.fetch_sub(1, Ordering::SeqCst);
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("cannot start a control client thread: {e}");
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

fn serve(s: UnixStream, dp: &Workers, defaults: &Defaults) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&s);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_LINE {
            reply(
                &s,
                &Response::Error {
                    message: format!("request longer than {MAX_LINE} bytes"),
                },
            )?;
            return Ok(());
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match req {
                Request::VmAttach(spec) => crate::attach::attach(&spec, defaults, dp),
                req => dp.answer(req),
            },
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        reply(&s, &resp)?;
    }
}

/// One answer line.
fn reply(s: &UnixStream, resp: &Response) -> Result<()> {
    let mut out = serde_json::to_string(resp)?;
    out.push('\n');
    let mut w = s;
    w.write_all(out.as_bytes())?;
    Ok(())
}
