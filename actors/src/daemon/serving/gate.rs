//! The promotion gate, as pure functions (no broker, no state folder): which checkpoint the
//! swapper tries next, and whether a candidate may replace the serving version.

use std::collections::{BTreeMap, HashSet};

/// The checkpoint to try next and whether the gate applies to it: a pinned version (a rollback)
/// is served as is, ungated, unless it already serves; otherwise the newest checkpoint, when it
/// is newer than the serving one and was not refused before.
pub fn candidate(
    serving: Option<u64>,
    latest: Option<u64>,
    pinned: Option<u64>,
    refused: &HashSet<u64>,
) -> Option<(u64, bool)> {
    match pinned {
        Some(p) => (serving != Some(p)).then_some((p, false)),
        None => latest
            .filter(|v| !refused.contains(v) && serving.is_none_or(|s| *v > s))
            .map(|v| (v, true)),
    }
}

/// Why a candidate is refused: its gate metric and the serving version's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub candidate: f64,
    pub serving: f64,
}

/// The gate: a candidate is refused when its `metric` is below the serving version's by more
/// than `margin`. A metric missing on either side (no probe samples yet) does not refuse.
pub fn refuses(
    metric: &str,
    candidate: &BTreeMap<String, f64>,
    serving: &BTreeMap<String, f64>,
    margin: f64,
) -> Option<Refusal> {
    let (&new, &old) = (candidate.get(metric)?, serving.get(metric)?);
    (new < old - margin).then_some(Refusal {
        candidate: new,
        serving: old,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(map_v: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("mAP".to_string(), map_v)])
    }

    #[test]
    fn the_newest_unrefused_checkpoint_is_tried_gated() {
        let none = HashSet::new();
        assert_eq!(candidate(None, Some(3), None, &none), Some((3, true)));
        assert_eq!(candidate(Some(2), Some(3), None, &none), Some((3, true)));
        assert_eq!(candidate(Some(3), Some(3), None, &none), None);
        assert_eq!(candidate(Some(4), Some(3), None, &none), None);
        assert_eq!(candidate(Some(2), None, None, &none), None);
        let refused = HashSet::from([3]);
        assert_eq!(candidate(Some(2), Some(3), None, &refused), None);
    }

    #[test]
    fn a_pinned_version_is_served_ungated_even_when_older() {
        let refused = HashSet::from([1]);
        assert_eq!(
            candidate(Some(5), Some(6), Some(1), &refused),
            Some((1, false))
        );
        assert_eq!(candidate(Some(1), Some(6), Some(1), &refused), None);
        assert_eq!(candidate(None, None, Some(1), &refused), Some((1, false)));
    }

    #[test]
    fn the_gate_refuses_only_a_drop_beyond_the_margin() {
        assert_eq!(refuses("mAP", &m(0.50), &m(0.52), 0.05), None);
        assert_eq!(refuses("mAP", &m(0.60), &m(0.52), 0.0), None);
        assert_eq!(
            refuses("mAP", &m(0.40), &m(0.52), 0.05),
            Some(Refusal {
                candidate: 0.40,
                serving: 0.52
            })
        );
        // Equal is not worse.
        assert_eq!(refuses("mAP", &m(0.52), &m(0.52), 0.0), None);
        // Without the metric on either side, nothing is refused.
        assert_eq!(refuses("rank1", &m(0.1), &m(0.9), 0.0), None);
        assert_eq!(refuses("mAP", &BTreeMap::new(), &m(0.9), 0.0), None);
    }
}
