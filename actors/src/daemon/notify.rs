//! systemd's notification protocol (`sd_notify`), written out: datagrams to `$NOTIFY_SOCKET`.
//! READY=1 once the broker is consumed and the trainer's model is loaded, WATCHDOG=1 at half
//! of `$WATCHDOG_USEC`, STATUS= lines (step, loss, serving version, gallery size), STOPPING=1 at
//! shutdown. Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

use crate::base::error::Result;

use super::Shared;
use std::sync::Arc;
use std::time::Duration;

/// Sends one notification; errors are ignored (systemd may be gone at shutdown).
pub fn notify(state: &str) {
    #[cfg(unix)]
    {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
            return;
        };
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux).
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
                    let _ = sock.send_to_addr(state.as_bytes(), &addr);
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = name;
        } else {
            let _ = sock.send_to(state.as_bytes(), std::path::Path::new(&path));
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// Start-up is complete: consuming from the broker and, when training, the model loaded (or
/// resumed); for a server, following the logs. A fresh daemon has no model to serve until its first checkpoint, so READY does not
/// wait for one (`/readyz` does).
fn started(shared: &Shared) -> bool {
    let st = shared.stats();
    if shared.cfg.role == crate::base::config::Role::Server {
        return st.follower.connected;
    }
    st.consuming
        && (!shared.cfg.trainer.enabled
            || !matches!(
                st.trainer.state,
                super::TrainerState::NotStarted | super::TrainerState::Starting
            ))
}

/// The watchdog interval systemd asked for, if any.
fn watchdog() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Runs until shutdown: READY once ready, then STATUS every few seconds and WATCHDOG pings.
pub async fn run(shared: Arc<Shared>) -> Result<()> {
    let ping = watchdog().map(|w| w / 2);
    let tick = ping
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    let mut ready = false;
    loop {
        if !ready && started(&shared) {
            ready = true;
            notify("READY=1");
            tracing::info!("ready");
        }
        let st = shared.stats().clone();
        let serving = shared.serving_snapshot();
        let status = format!(
            "STATUS={}; step {}, loss {}; serving version {}, gallery {}",
            if ready { "ready" } else { "starting" },
            st.trainer.step,
            st.trainer
                .loss
                .map_or("-".to_string(), |l| format!("{l:.3}")),
            serving
                .as_ref()
                .map_or("-".to_string(), |s| s.version.to_string()),
            serving.as_ref().map_or(0, |s| s.rows.len()),
        );
        // The watchdog is only fed while the event loop runs: a hung runtime gets restarted.
        if ping.is_some() {
            notify(&format!("WATCHDOG=1\n{status}"));
        } else {
            notify(&status);
        }
        if shared.sleep_or_stop(tick).await {
            return Ok(());
        }
    }
}
