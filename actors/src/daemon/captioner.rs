//! Caption workers: OS threads that write captions for samples stored without any.
//!
//! Intake captions what it stores (`SampleStore::put_one`: the captions come from the
//! producer's attributes or from colours estimated in the pixels it decoded anyway), so new
//! records need no worker. State folders written by earlier versions hold samples stored with a
//! ticket in the `uncaptioned` tree instead: each worker takes the tickets of its shard,
//! captions the sample the same way (decoding it when no colours were kept) and clears the
//! ticket together with the captions. A crash loses nothing: tickets survive in sled.
//!
//! Worker 0 also applies the training-sample cap (`state.max_training_samples`).

use crate::base::error::Result;

use super::Shared;
use plip_ingest::captions::estimate_colours;
use plip_ingest::image::{decode, IntakeLimits};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Captions samples of shard `shard` of `shards` until shutdown.
///
/// # Errors
/// Never for a bad sample (it is captioned as "a person" or skipped with a log line); a
/// storage failure is retried after a pause.
pub fn run(shared: Arc<Shared>, shard: usize, shards: usize) -> Result<()> {
    let mut last_evict = Instant::now();
    while !shared.stopping() {
        if shard == 0 && last_evict.elapsed() > Duration::from_secs(10) {
            last_evict = Instant::now();
            let cap = shared.cfg.state.max_training_samples;
            // Fewer samples than the cap in all: nothing to evict, no scan.
            if cap > 0 && shared.store.len() > cap {
                match shared.store.evict_training(cap) {
                    Ok(0) => {}
                    Ok(n) => {
                        shared.stats().evicted += n as u64;
                        tracing::info!(samples = n, cap, "evicted");
                    }
                    Err(e) => tracing::error!(error = %e, "evict_failed"),
                }
            }
        }
        let ids = shared.store.uncaptioned(64, shard, shards);
        if ids.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        for id in ids {
            if shared.stopping() {
                break;
            }
            let sample = match shared.store.get(&id) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "caption_failed");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let captions = match &sample {
                None => vec![],
                Some(s) => {
                    let attrs = match s.meta.attributes.or(s.meta.colours) {
                        Some(a) => a,
                        None => match decode(&s.jpeg, &IntakeLimits::default()) {
                            Ok(img) => estimate_colours(&img),
                            Err(_) => Default::default(),
                        },
                    };
                    crate::base::store::daemon_captions(&attrs, s.meta.seq)
                }
            };
            match shared.store.set_captions(&id, captions) {
                Ok(()) => shared.stats().captioned += 1,
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "caption_failed");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
    Ok(())
}
