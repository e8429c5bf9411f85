#!/usr/bin/env bash
# The main job: the whole system on this machine. Makes sure a RabbitMQ broker answers on
# 127.0.0.1:5672 (starting or installing it when it can), builds plipd, and runs `plipd demo`:
# the daemon learning from a synthetic pedestrian stream and answering queries, with live
# progress and a report in reports/demo/. Arguments go to `plipd demo` (e.g. --minutes 5).
set -euo pipefail
cd "$(dirname "$0")/.."

broker_up() { (echo > /dev/tcp/127.0.0.1/5672) >/dev/null 2>&1; }
if ! broker_up; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else
      echo "RabbitMQ is not running on 127.0.0.1:5672 and is not installed. Install and start it with:" >&2
      echo "  sudo apt-get install -y rabbitmq-server && sudo systemctl start rabbitmq-server" >&2
      exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "RabbitMQ is not installed and this system has no apt-get; install rabbitmq-server with its package manager and start it" >&2
      exit 1
    fi
    echo "installing rabbitmq-server…" >&2
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server
  fi
  if ! broker_up; then
    echo "starting rabbitmq-server…" >&2
    if [ "$(id -u)" = 0 ]; then rabbitmq-server -detached || true; else sudo -n rabbitmq-server -detached || true; fi
    for _ in $(seq 1 60); do broker_up && break; sleep 2; done
  fi
  broker_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
fi
cargo build --release -q -p plip-actors
exec "${CARGO_TARGET_DIR:-target}/release/plipd" demo "$@"
