//! `plip-tests`: reserved for end-to-end scenarios that span the crates (a producer, the
//! daemon, a ReID client). Today every such test needs the `plipd` binary and lives beside it in
//! `actors/tests/` (the daemon against the real broker, the poison suite, the offline workflow,
//! the layer check); this crate holds none yet.
