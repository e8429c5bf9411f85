//! `plipd run` as a child process — one harness for the benchmarks, the demo and the tests:
//! started (by default from this very binary, with its settings in `PLIP__…` environment
//! variables; the tests name the built `plipd` and a configuration file) with an HTTP listener
//! on a free localhost port, watched through `/status`, stopped with SIGTERM or killed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

/// A running daemon child. Dropping it sends SIGTERM and waits for the exit.
pub struct DaemonProcess {
    child: Option<Child>,
    /// How the child ended, once it has.
    exited: Option<std::process::ExitStatus>,
    addr: String,
}

/// What a [`DaemonProcess`] starts with.
pub struct Launch<'a> {
    /// Broker URL.
    pub url: &'a str,
    /// The state folder.
    pub state: &'a Path,
    /// `(PLIP__… variable, value)`: the topology's names and any other setting.
    pub env: Vec<(String, String)>,
    /// Where the daemon's log (stderr) goes; discarded when `None`.
    pub log: Option<&'a Path>,
}

/// A free TCP port on localhost (bound, then released for the child to take).
///
/// # Errors
/// No port could be bound.
pub fn free_local_addr() -> std::io::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// Exactly how to start a daemon child (what [`Launch`] fills in from its settings).
pub struct Spawn<'a> {
    /// The `plipd` binary.
    pub program: PathBuf,
    /// Its arguments (`run`, `--config FILE`, …).
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The listener address the daemon is configured with (`host:port`).
    pub addr: String,
    /// Where stderr goes (appended to; created when missing); discarded when `None`.
    pub log: Option<&'a Path>,
}

impl DaemonProcess {
    /// Starts `plipd run` from this binary, configured by environment variables.
    ///
    /// # Errors
    /// The binary or the log file cannot be found or created, or no port is free.
    pub fn start(launch: Launch<'_>) -> Result<DaemonProcess, Error> {
        let addr = free_local_addr()?;
        if let Some(p) = launch.log {
            // A fresh log per start.
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        }
        let mut env = vec![
            ("PLIP__BROKER__URL".to_string(), launch.url.to_string()),
            (
                "PLIP__STATE__DIR".to_string(),
                launch.state.display().to_string(),
            ),
            ("PLIP__HTTP__LISTEN".to_string(), addr.clone()),
        ];
        env.extend(launch.env);
        DaemonProcess::spawn(Spawn {
            program: std::env::current_exe()?,
            args: vec!["run".into()],
            env,
            addr,
            log: launch.log,
        })
    }

    /// Starts a daemon exactly as `spawn` says.
    ///
    /// # Errors
    /// The binary cannot be run or the log file cannot be opened.
    pub fn spawn(spawn: Spawn<'_>) -> Result<DaemonProcess, Error> {
        let stderr = match spawn.log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open {}: {e}", p.display()))?,
            ),
            None => Stdio::null(),
        };
        let child = Command::new(&spawn.program)
            .args(&spawn.args)
            .envs(spawn.env)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", spawn.program.display()))?;
        Ok(DaemonProcess {
            child: Some(child),
            exited: None,
            addr: spawn.addr,
        })
    }

    /// The exit status, when the child has exited (it is then no longer held).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            self.child = None;
            self.exited = Some(st);
        }
        self.exited
    }

    /// True while the child runs.
    pub fn running(&mut self) -> bool {
        self.try_wait();
        self.child.is_some()
    }

    /// Waits up to `limit` for the child to exit by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if self.child.is_none() || t.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (as a crash or `kill -9` would), then reaps the child.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.exited = c.wait().ok();
        }
    }

    /// The daemon's HTTP listener (`host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `/status`, when the daemon answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        super::client::get(&self.addr, "/status").and_then(Result::ok)
    }

    /// An error when the child has exited.
    ///
    /// # Errors
    /// The daemon is no longer running (with its exit status).
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match (self.try_wait(), &self.child) {
            (Some(st), _) => Err(format!("plipd exited early ({st})").into()),
            (None, None) => Err("plipd is not running".into()),
            (None, Some(_)) => Ok(()),
        }
    }

    /// Polls `/status` (every 25 ms) until `pred` holds; returns that status.
    ///
    /// # Errors
    /// The daemon exited, or `limit` passed first (naming `what`).
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, Error> {
        let t = Instant::now();
        while t.elapsed() < limit {
            self.check_alive()?;
            if let Some(s) = self.status() {
                if pred(&s) {
                    return Ok(s);
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(format!("timed out after {} s waiting for {what}", limit.as_secs()).into())
    }

    /// SIGTERM, then waits for the exit (the daemon writes a last checkpoint first).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        self.exited = c.wait().ok();
        self.exited
    }

    /// SIGTERM, then waits up to `limit`; a child still running then is killed and `None`
    /// returned.
    pub fn stop_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.as_ref()?.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let st = self.wait_exit(limit);
        if st.is_none() {
            self.kill();
        }
        st
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
