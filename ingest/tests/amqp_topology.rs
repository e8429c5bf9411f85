//! The topology against the real RabbitMQ on 127.0.0.1:5672 (`PLIP_AMQP_URL` overrides).

use plip_ingest::amqp::{connect, QueueType, Topology, TopologyError};

fn url() -> String {
    std::env::var("PLIP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique() -> Topology {
    Topology::with_suffix(&format!(
        "t{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ))
}

async fn cleanup(t: &Topology) {
    let conn = connect(&url()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    t.delete(&ch).await;
}

/// Declaring twice is fine; declaring the ingest queue as another type is refused with a
/// message naming the queue and the argument. A message published to the ingest exchange lands
/// in the ingest queue.
#[tokio::test]
async fn declare_is_idempotent_and_mismatch_is_named() {
    let t = unique();
    let conn = connect(&url())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (see .ci/run)");
    let ch = conn.create_channel().await.unwrap();
    t.declare(&ch).await.unwrap();
    t.declare(&ch).await.unwrap();

    ch.basic_publish(
        t.ingest_exchange.as_str().into(),
        "".into(),
        lapin::options::BasicPublishOptions::default(),
        b"{}",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let q = ch
        .queue_declare(
            t.ingest_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 1);

    let other = Topology {
        queue_type: QueueType::Quorum,
        ..t.clone()
    };
    let ch2 = conn.create_channel().await.unwrap();
    let err = other.declare(&ch2).await.unwrap_err();
    match &err {
        TopologyError::Mismatch { object, detail } => {
            assert_eq!(object, &format!("queue {}", t.ingest_queue));
            assert!(detail.contains("x-queue-type"), "{detail}");
        }
        other => panic!("expected a mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&t.ingest_queue));
    cleanup(&t).await;
}
