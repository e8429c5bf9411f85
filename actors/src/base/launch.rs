//! `plipd run` as a child process, for the benchmarks and the demo: started from this very
//! binary with its settings in `PLIP__…` environment variables, an HTTP listener on a free
//! localhost port, watched through `/status`, stopped with SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

/// A running daemon child. Dropping it sends SIGTERM and waits for the exit.
pub struct DaemonProcess {
    child: Option<Child>,
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

impl DaemonProcess {
    /// Starts `plipd run`.
    ///
    /// # Errors
    /// The binary or the log file cannot be found or created, or no port is free.
    pub fn start(launch: Launch<'_>) -> Result<DaemonProcess, Error> {
        let addr = free_local_addr()?;
        let stderr = match launch.log {
            Some(p) => Stdio::from(
                std::fs::File::create(p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?,
            ),
            None => Stdio::null(),
        };
        let child = Command::new(std::env::current_exe()?)
            .arg("run")
            .env("PLIP__BROKER__URL", launch.url)
            .env("PLIP__STATE__DIR", launch.state)
            .env("PLIP__HTTP__LISTEN", &addr)
            .envs(launch.env)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        Ok(DaemonProcess {
            child: Some(child),
            addr,
        })
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
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(st))) => Err(format!("plipd exited early ({st})").into()),
            _ => Ok(()),
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
        c.wait().ok()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
