//! Storage figures for `/status` and `/metrics`, read from the sample store's tallies and the
//! state folder on the blocking pool, and a cache answering from the last figures while a
//! read is stuck.

use crate::base::error::Result;
use crate::daemon::Shared;
use std::sync::Arc;
use std::time::Duration;

/// What `/status` and `/metrics` read from the state folder.
#[derive(Debug, Clone, Default)]
pub struct StorageFigures {
    pub counts: crate::base::store::Counts,
    pub total: usize,
    pub uncaptioned: usize,
    pub latest: Option<u64>,
}

fn read_figures(shared: &Shared) -> Result<StorageFigures> {
    Ok(StorageFigures {
        counts: shared.store.counts(),
        total: shared.store.len(),
        uncaptioned: shared.store.uncaptioned_len(),
        latest: shared.state.latest_version()?,
    })
}

/// How long an endpoint waits for the state folder before answering from [`Cache`].
const STORAGE_ANSWER: Duration = Duration::from_secs(2);

/// The last figures read from the state folder, and whether a read is stuck: while one is,
/// `/status` and `/metrics` answer at once from the last figures (marked stale) and `/readyz`
/// says 503 — no request waits on a blocked storage call, and no second one is started.
#[derive(Default)]
pub struct Cache {
    figures: std::sync::Mutex<Option<(std::time::Instant, StorageFigures)>>,
    stuck_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Cache {
    /// Seconds the outstanding storage read has been stuck, if one is.
    pub fn stuck_for(&self) -> Option<u64> {
        self.stuck_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_secs())
    }

    fn last(&self) -> (StorageFigures, Option<u64>) {
        match &*self.figures.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((t, f)) => (f.clone(), Some(t.elapsed().as_secs())),
            None => (StorageFigures::default(), None),
        }
    }
}

/// Storage figures: fresh when the state folder answers within [`STORAGE_ANSWER`], otherwise
/// the last ones with a note saying how old they are.
pub(super) async fn figures(shared: &Arc<Shared>) -> (StorageFigures, Option<String>) {
    let cache = &shared.http_cache;
    let stale = |why: String| {
        let (f, age) = cache.last();
        let note = match age {
            Some(a) => format!("{why}; storage figures from {a} s ago"),
            None => format!("{why}; no storage figures yet"),
        };
        (f, Some(note))
    };
    if let Some(s) = cache.stuck_for() {
        return stale(format!("the state folder has not answered for {s} s"));
    }
    let s = shared.clone();
    let read = tokio::task::spawn_blocking(move || {
        let r = read_figures(&s);
        let cache = &s.http_cache;
        if let Ok(f) = &r {
            *cache.figures.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((std::time::Instant::now(), f.clone()));
        }
        *cache.stuck_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
    });
    match tokio::time::timeout(STORAGE_ANSWER, read).await {
        Ok(Ok(Ok(f))) => (f, None),
        Ok(Ok(Err(e))) => stale(format!("reading the state folder failed: {e}")),
        Ok(Err(e)) => stale(format!("reading the state folder failed: {e}")),
        Err(_) => {
            cache
                .stuck_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| {
                    std::time::Instant::now()
                        .checked_sub(STORAGE_ANSWER)
                        .unwrap_or_else(std::time::Instant::now)
                });
            stale(format!(
                "the state folder did not answer within {} s",
                STORAGE_ANSWER.as_secs()
            ))
        }
    }
}
