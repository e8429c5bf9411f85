//! The ractor supervision tree: one supervisor, one child actor per worker (ingest, each
//! caption worker, trainer, checkpointer, HTTP listener).
//!
//! A child actor starts its worker (an async task, or an OS thread for CPU-bound work) in
//! `pre_start` and fails when the worker returns an error or panics. The supervisor overrides
//! ractor's default (which stops the supervisor when a child exits): a failed child is
//! restarted after an exponential backoff (0.5 s doubling to 30 s; reset after a minute of
//! health), and the restart is counted in the status. Nothing is buffered in a mailbox: workers
//! pull from sled or the broker, and the trainer hands the checkpointer one checkpoint at a time.

use crate::base::config::Role;
use crate::base::error::{Error, Result};

use super::{trainer, Shared};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The supervised children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Child {
    Ingest,
    Captions(usize),
    Trainer,
    Checkpointer,
    Http,
    Swapper,
    Requests,
    Notify,
    ModelsLog,
    Follower,
}

impl Child {
    fn name(self) -> String {
        match self {
            Child::Ingest => "ingest".into(),
            Child::Captions(i) => format!("captions-{i}"),
            Child::Trainer => "trainer".into(),
            Child::Checkpointer => "checkpointer".into(),
            Child::Http => "http".into(),
            Child::Swapper => "swapper".into(),
            Child::Requests => "reid-requests".into(),
            Child::Notify => "systemd-notify".into(),
            Child::ModelsLog => "models-log".into(),
            Child::Follower => "follower".into(),
        }
    }
}

/// What the children share besides [`Shared`].
#[derive(Clone)]
pub struct Wiring {
    pub shared: Arc<Shared>,
    pub listener: Arc<TcpListener>,
    pub jobs_tx: mpsc::Sender<trainer::Job>,
    pub jobs_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<trainer::Job>>>,
    /// Workers currently running.
    pub running: Arc<Tasks>,
}

/// The workers running, by name: each holds a [`Completion`] while it runs, and shutdown waits
/// for them to be dropped (woken as each ends, no polling) and names those still running when
/// its deadline passes.
#[derive(Default)]
pub struct Tasks {
    names: Mutex<BTreeMap<String, usize>>,
    ended: tokio::sync::Notify,
}

impl Tasks {
    fn start(self: &Arc<Self>, name: String) -> Completion {
        *self
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.clone())
            .or_default() += 1;
        Completion {
            tasks: self.clone(),
            name,
        }
    }

    /// Names of the workers still running.
    pub fn running(&self) -> Vec<String> {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Waits until no worker runs, or until `deadline`: then the names of those still running.
    async fn wait_all(&self, deadline: Instant) -> Result<(), Vec<String>> {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.running().is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), ended)
                .await
                .is_err()
            {
                return Err(self.running());
            }
        }
    }
}

/// Held by a running worker; dropping it (the worker ended, however) takes it off [`Tasks`].
pub struct Completion {
    tasks: Arc<Tasks>,
    name: String,
}

impl Drop for Completion {
    fn drop(&mut self) {
        {
            let mut names = self
                .tasks
                .names
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = names.get_mut(&self.name) {
                *n -= 1;
                if *n == 0 {
                    names.remove(&self.name);
                }
            }
        }
        self.tasks.ended.notify_waiters();
    }
}

/// A worker's end, reported to its actor.
pub enum WorkerMsg {
    Exited(Result<()>),
}

/// The actor wrapping one worker.
pub struct Worker;

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = Child;
    type Arguments = (Child, Wiring);

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        (child, w): (Child, Wiring),
    ) -> Result<Child, ActorProcessingErr> {
        let completion = w.running.start(child.name());
        let shared = w.shared.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<()>>();
        // OS-thread workers report through the oneshot (a panic drops the sender).
        let thread = |name: String, f: Box<dyn FnOnce() -> Result<()> + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let r = f();
                    let _ = tx.send(r);
                })
                .map(|_| ())
                .map_err(Error::from)
        };
        let task: Option<tokio::task::JoinHandle<Result<()>>> = match child {
            Child::Ingest => Some(tokio::spawn(async move {
                super::ingest::run(shared).await;
                Ok(())
            })),
            Child::Http => {
                let l = w.listener.clone();
                Some(tokio::spawn(super::http::serve(shared, l)))
            }
            Child::Swapper => Some(tokio::spawn(super::serving::swapper(shared))),
            Child::Notify => Some(tokio::spawn(super::notify::run(shared))),
            Child::Requests => Some(tokio::spawn(super::serving::requests(shared))),
            Child::ModelsLog => Some(tokio::spawn(super::logs::models_logger(shared))),
            Child::Follower => Some(tokio::spawn(super::follower::run(shared))),
            Child::Checkpointer => {
                let rx = w.jobs_rx.clone();
                Some(tokio::spawn(trainer::checkpointer(shared, rx)))
            }
            Child::Captions(i) => {
                let n = shared.cfg.captions.workers;
                thread(
                    child.name(),
                    Box::new(move || super::captioner::run(shared, i, n)),
                )?;
                None
            }
            Child::Trainer => {
                let jobs = w.jobs_tx.clone();
                thread(
                    child.name(),
                    Box::new(move || {
                        let r = trainer::run(shared.clone(), jobs);
                        if let Err(e) = &r {
                            let mut st = shared.stats();
                            st.trainer.state = super::TrainerState::Failed;
                            st.trainer.error = Some(e.to_string());
                        }
                        r
                    }),
                )?;
                None
            }
        };
        let me = myself.clone();
        let shared_for_exit = w.shared.clone();
        tokio::spawn(async move {
            let r = match task {
                Some(t) => t
                    .await
                    .unwrap_or_else(|e| Err(Error::Internal(format!("worker panicked: {e}")))),
                None => rx
                    .await
                    .unwrap_or_else(|_| Err(Error::Internal("worker thread panicked".into()))),
            };
            if child == Child::Trainer && r.is_err() {
                shared_for_exit.stats().trainer.state = super::TrainerState::Failed;
            }
            drop(completion);
            let _ = me.cast(WorkerMsg::Exited(r));
        });
        Ok(child)
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        child: &mut Child,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Exited(Ok(())) => {
                myself.stop(None);
                Ok(())
            }
            WorkerMsg::Exited(Err(e)) => Err(format!("{}: {e}", child.name()).into()),
        }
    }
}

/// Supervisor messages.
pub enum SupMsg {
    Start(Child),
}

/// The supervisor.
pub struct Supervisor;

/// The supervisor's state.
pub struct SupState {
    wiring: Wiring,
    children: HashMap<ractor::ActorId, Child>,
    backoff: HashMap<Child, (Duration, Instant)>,
}

impl Supervisor {
    async fn spawn(myself: &ActorRef<SupMsg>, st: &mut SupState, child: Child) {
        match Actor::spawn_linked(None, Worker, (child, st.wiring.clone()), myself.get_cell()).await
        {
            Ok((r, _)) => {
                st.children.insert(r.get_id(), child);
            }
            Err(e) => {
                tracing::error!(child = child.name(), error = %e, "child_start_failed");
                Self::restart_later(myself, st, child);
            }
        }
    }

    fn restart_later(myself: &ActorRef<SupMsg>, st: &mut SupState, child: Child) {
        if st.wiring.shared.stopping() {
            return;
        }
        let now = Instant::now();
        let entry = st
            .backoff
            .entry(child)
            .or_insert((Duration::from_millis(250), now));
        // A child that stayed up for a minute starts again from the shortest delay.
        if now.duration_since(entry.1) > Duration::from_secs(60) {
            entry.0 = Duration::from_millis(250);
        }
        entry.0 = (entry.0 * 2).min(Duration::from_secs(30));
        entry.1 = now;
        let delay = entry.0;
        *st.wiring
            .shared
            .stats()
            .restarts
            .entry(child.name())
            .or_default() += 1;
        tracing::warn!(
            child = child.name(),
            in_ms = delay.as_millis() as u64,
            "child_restart"
        );
        ractor::time::send_after(delay, myself.get_cell(), move || SupMsg::Start(child));
    }
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = Wiring;

    async fn pre_start(
        &self,
        myself: ActorRef<SupMsg>,
        wiring: Wiring,
    ) -> Result<SupState, ActorProcessingErr> {
        let mut st = SupState {
            wiring,
            children: HashMap::new(),
            backoff: HashMap::new(),
        };
        let cfg = &st.wiring.shared.cfg;
        let mut kids = vec![Child::Http, Child::Notify];
        if cfg.role == Role::Server {
            // No training data: the logs bring the models and the gallery.
            kids.push(Child::Follower);
            kids.push(Child::Swapper);
            kids.push(Child::Requests);
            st.wiring.shared.stats().trainer.state = super::TrainerState::Disabled;
        } else {
            kids.push(Child::Checkpointer);
            kids.push(Child::Ingest);
            kids.extend((0..cfg.captions.workers).map(Child::Captions));
            if cfg.serving.enabled {
                // The gate and promotions stay with the trainer; a trainer answers no requests.
                kids.push(Child::Swapper);
                if cfg.role == Role::All {
                    kids.push(Child::Requests);
                }
                if cfg.streams.enabled {
                    kids.push(Child::ModelsLog);
                }
            }
            if cfg.trainer.enabled {
                kids.push(Child::Trainer);
            } else {
                st.wiring.shared.stats().trainer.state = super::TrainerState::Disabled;
            }
        }
        for k in kids {
            Self::spawn(&myself, &mut st, k).await;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupMsg>,
        msg: SupMsg,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::Start(child) => {
                if !st.wiring.shared.stopping() {
                    Self::spawn(&myself, st, child).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(child) = st.children.remove(&cell.get_id()) {
                    tracing::error!(child = child.name(), error = %err, "child_failed");
                    Self::restart_later(&myself, st, child);
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(child) = st.children.remove(&cell.get_id()) {
                    // A worker only ends cleanly at shutdown; otherwise bring it back.
                    if !st.wiring.shared.stopping() {
                        Self::restart_later(&myself, st, child);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The running supervisor.
pub struct Running {
    pub sup: ActorRef<SupMsg>,
    handle: tokio::task::JoinHandle<()>,
    workers: Arc<Tasks>,
}

impl Running {
    /// The workers' registry (to name what still runs when a deadline passes).
    pub fn tasks(&self) -> Arc<Tasks> {
        self.workers.clone()
    }
}

/// Starts the supervisor and its children.
///
/// # Errors
/// The supervisor cannot be spawned.
pub async fn start(shared: Arc<Shared>, listener: TcpListener) -> Result<Running> {
    let (jobs_tx, jobs_rx) = mpsc::channel(1);
    let wiring = Wiring {
        shared,
        listener: Arc::new(listener),
        jobs_tx,
        jobs_rx: Arc::new(tokio::sync::Mutex::new(jobs_rx)),
        running: Arc::new(Tasks::default()),
    };
    let workers = wiring.running.clone();
    let (sup, handle) = Actor::spawn(Some("plipd".into()), Supervisor, wiring)
        .await
        .map_err(|e| Error::Internal(format!("cannot start the supervisor: {e}")))?;
    Ok(Running {
        sup,
        handle,
        workers,
    })
}

/// Waits (up to two minutes: the trainer may be mid-step and writes a last checkpoint) for the
/// workers to wind down after [`Shared::stop`], then stops the supervisor.
pub async fn shutdown(running: Running) {
    let deadline = Instant::now() + Duration::from_secs(120);
    if let Err(still) = running.workers.wait_all(deadline).await {
        tracing::warn!(still_running = ?still, "workers_did_not_stop");
    }
    running.sup.stop(None);
    let _ = running.handle.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shutdown's wait ends as soon as the last worker's completion guard drops (no polling),
    /// and at its deadline names those still running.
    #[tokio::test]
    async fn completion_guards_end_the_wait_or_name_the_laggards() {
        let tasks = Arc::new(Tasks::default());
        let ingest = tasks.start("ingest".into());
        let trainer = tasks.start("trainer".into());
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            tasks.wait_all(soon).await,
            Err(vec!["ingest".to_string(), "trainer".to_string()])
        );
        drop(ingest);
        let waiter = {
            let tasks = tasks.clone();
            tokio::spawn(async move {
                tasks
                    .wait_all(Instant::now() + Duration::from_secs(30))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        drop(trainer);
        assert_eq!(waiter.await.expect("joined"), Ok(()));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(tasks.running().is_empty());
    }
}
