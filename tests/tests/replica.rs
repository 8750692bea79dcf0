//! Order-status reads on a PostgreSQL streaming replica (FLOODGATE_DATABASE_REPLICA_URL):
//! served there once it has caught up, by the primary while it lags, and never older than
//! what the caller was already told. The replica's replay is paused to make it lag for
//! certain.

use floodgate_tests::{Options, TestApp, eventually, servers::PrivatePgPair, streams::Sse};
use serde_json::json;
use std::time::Duration;
use tokio_postgres::NoTls;

async fn replica_reads(app: &TestApp, outcome: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("floodgate_replica_reads_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_reads_use_the_replica_and_never_go_back_in_time() {
    let pair = tokio::task::spawn_blocking(PrivatePgPair::start)
        .await
        .unwrap();
    let (primary, replica) = (pair.url(), pair.replica_url());
    let replica_for_app = replica.clone();
    let app = TestApp::spawn_with(Options {
        notifier: true,
        tweak: Box::new(move |c| {
            c.database_url = primary;
            c.database_replica_url = Some(replica_for_app);
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("tee", 10, None).await;
    let alice = app.customer("alice");
    let r = app.order(&alice, &[("tee", 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/orders/{id}");
    app.wait_idle().await;

    // Caught up: the replica serves the read.
    eventually(Duration::from_secs(20), || async {
        let before = replica_reads(&app, "replica").await;
        let s = app.get(&path, Some(&alice)).await;
        s.status == 200
            && s.body["status"] == "confirmed"
            && replica_reads(&app, "replica").await > before
    })
    .await;

    // The replica stops replaying: it still shows the order confirmed after the cancel.
    let (db, conn) = tokio_postgres::connect(&replica, NoTls).await.unwrap();
    tokio::spawn(conn);
    db.execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .unwrap();
    let c = app
        .post(&format!("{path}/cancel"), Some(&alice), &json!({}))
        .await;
    assert_eq!(
        (c.status, c.body["status"].as_str()),
        (200, Some("cancelled")),
        "{c:?}"
    );
    let on_replica: String = db
        .query_one(
            &format!(
                "SELECT status FROM {}.orders WHERE id = $1",
                app.cfg.namespace
            ),
            &[&uuid::Uuid::parse_str(&id).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        on_replica, "confirmed",
        "the replica lags behind the cancel"
    );

    // Told `cancelled`, the caller never reads `confirmed` again: the primary answers.
    let lagging = replica_reads(&app, "lagging").await;
    for _ in 0..5 {
        let s = app.get(&path, Some(&alice)).await;
        assert_eq!(
            (s.status, s.body["status"].as_str()),
            (200, Some("cancelled")),
            "{s:?}"
        );
    }
    assert!(replica_reads(&app, "lagging").await >= lagging + 5.0);
    // The notifier's subscribe-time read too.
    let url = format!(
        "{}/v1/stream?topics=order:{id}&access_token={alice}",
        app.notifier.as_ref().unwrap()
    );
    let mut sse = Sse::connect(&app.client, &url).await.expect("stream");
    let ev = sse
        .next(Duration::from_secs(10))
        .await
        .expect("current status");
    assert_eq!(ev.data["status"], "cancelled", "{ev:?}");

    // Replay resumes: the replica serves reads again, and shows the cancel.
    db.execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(20), || async {
        let before = replica_reads(&app, "replica").await;
        let s = app.get(&path, Some(&alice)).await;
        assert_eq!(s.body["status"], "cancelled", "{s:?}");
        replica_reads(&app, "replica").await > before
    })
    .await;
    drop(app);
    drop(pair);
}
