//! `plip-tests`: end-to-end tests that start the real `plipd` binary against a real RabbitMQ,
//! and the third-party (Python `pika`) client script. The daemon does not exist yet; until it
//! does, the binary's own command-line tests live in `actors/tests/`.
