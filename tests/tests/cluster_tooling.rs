//! The cluster tooling itself (`ops/cluster` through tests/src/servers.rs): each engine
//! comes up as a working cluster, and a killed node fails over as the fault tests
//! expect. Run by `ops/stack test --cluster`, not by the single-server suite.

use floodgate_tests::servers::{
    PrivatePgPair, PrivateRabbitCluster, PrivateRedisCluster, redis_cli,
};
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use std::time::{Duration, Instant};

/// A key written to the master of its slot, acknowledged by a replica (WAIT), survives
/// the master's `kill -9`: the replica takes over; the old master comes back as a replica.
#[test]
fn redis_cluster_fails_over_to_the_replica() {
    let cluster = PrivateRedisCluster::start();
    let nodes = cluster.nodes();
    assert_eq!(
        nodes.iter().filter(|n| n.master && n.up).count(),
        3,
        "{nodes:?}"
    );
    assert_eq!(
        nodes.iter().filter(|n| !n.master && n.up).count(),
        3,
        "{nodes:?}"
    );
    for p in cluster.ports() {
        assert!(redis_cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
    }

    let key = "{tooling}:k";
    let master = cluster.master_of_key(key);
    let replica = cluster
        .replica_of(master)
        .expect("the master has a replica");
    assert_eq!(
        redis_cli(cluster.port(master), &["SET", key, "v1"]).trim(),
        "OK"
    );
    // One replica acknowledged the write before the master dies.
    assert_eq!(
        redis_cli(cluster.port(master), &["WAIT", "1", "2000"]).trim(),
        "1"
    );

    cluster.kill_node(master);
    let took = cluster.wait_promoted(replica, Duration::from_secs(20));
    eprintln!("redis: node {replica} promoted {took:?} after node {master} was killed");
    assert_eq!(cluster.master_of_key(key), replica);
    // On a failure, say what each node held and how replication stood (a CI run once
    // read nothing here after a WAIT of 1).
    assert_eq!(
        redis_cli(cluster.port(replica), &["GET", key]).trim(),
        "v1",
        "node {replica} after the failover; nodes {:?}; its replication: {}",
        cluster.nodes(),
        redis_cli(cluster.port(replica), &["INFO", "replication"])
    );

    let started = Instant::now();
    cluster.start_node(master);
    eprintln!("redis: node {master} rejoined in {:?}", started.elapsed());
    let back = cluster
        .nodes()
        .into_iter()
        .find(|n| n.index == master)
        .unwrap();
    assert!(
        back.up && !back.master && back.master_index == Some(replica),
        "{back:?}"
    );
}

/// A quorum queue declared with three members keeps a confirmed message through the
/// `kill -9` of its leader's node; the node comes back into the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbit_cluster_keeps_a_quorum_queue_through_a_node_kill() {
    let cluster = tokio::task::spawn_blocking(PrivateRabbitCluster::start)
        .await
        .unwrap();
    assert_eq!(cluster.running(), vec![true; PrivateRabbitCluster::NODES]);
    assert_eq!(
        cluster.url().split(',').count(),
        PrivateRabbitCluster::NODES
    );

    let conn = Connection::connect(&cluster.node_url(0), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(3));
    let queue = "tooling.q";
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, args).await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        b"kept",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let leader = cluster.leader_of(queue).expect("a leader");
    eprintln!("rabbitmq: {queue} leader on node {leader}");
    drop(ch);
    let _ = conn.close(200, "bye".into()).await;

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill_node(leader);
        cluster
    })
    .await
    .unwrap();
    let other = (leader + 1) % PrivateRabbitCluster::NODES;
    let open = || async {
        let conn = Connection::connect(&cluster.node_url(other), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        (conn, ch)
    };
    let (mut conn, mut ch) = open().await;
    let started = Instant::now();
    let mut errors = Vec::new();
    let got = loop {
        // A new leader is elected within seconds; until then a get fails (closing the
        // channel) or finds nothing.
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(m)) => break m.delivery.data.clone(),
            Ok(None) => {}
            Err(e) => {
                // The broker closes the channel, or the connection, on a failed get.
                errors.push(e.to_string());
                (conn, ch) = open().await;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no message from {queue} within 30 s of the leader's node kill; errors: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got, b"kept");
    eprintln!(
        "rabbitmq: message read from node {other} {:?} after the kill ({} failed gets first)",
        started.elapsed(),
        errors.len()
    );
    let _ = conn.close(200, "bye".into()).await;

    let cluster = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        cluster.start_node(leader);
        eprintln!("rabbitmq: node {leader} back in {:?}", started.elapsed());
        cluster
    })
    .await
    .unwrap();
    assert_eq!(cluster.running(), vec![true; PrivateRabbitCluster::NODES]);
}

/// A row committed on the primary shows on the replica; after the primary's crash the
/// promoted replica takes writes.
#[tokio::test]
async fn pg_replica_follows_the_primary_and_can_be_promoted() {
    let pair = tokio::task::spawn_blocking(PrivatePgPair::start)
        .await
        .unwrap();
    let connect = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let primary = connect(pair.url()).await;
    let replica = connect(pair.replica_url()).await;
    primary
        .batch_execute("create table t (x int); insert into t values (42)")
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        if let Ok(row) = replica.query_one("select x from t", &[]).await {
            assert_eq!(row.get::<_, i32>(0), 42);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the row never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "postgres: the row reached the replica in {:?}",
        started.elapsed()
    );
    let err = replica
        .execute("insert into t values (1)", &[])
        .await
        .unwrap_err();
    let read_only = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        read_only.as_deref().unwrap_or("").contains("read-only"),
        "{err:?}"
    );

    let pair = tokio::task::spawn_blocking(move || {
        pair.kill_primary();
        let started = Instant::now();
        pair.promote();
        eprintln!("postgres: replica promoted in {:?}", started.elapsed());
        pair
    })
    .await
    .unwrap();
    assert_eq!(
        pair.nodes(),
        vec![("primary".to_owned(), false), ("primary".to_owned(), true)]
    );
    replica
        .execute("insert into t values (1)", &[])
        .await
        .unwrap();
}
