//! The `floodgate` command's writes reach the audit log (API.md "Audit log"): a
//! reconcile and each dead letter replayed, under the operator's name, one run id per
//! run; `--check` and `dlq list` write nothing.

use floodgate_tests::{TestApp, env_of, eventually};
use std::{process::Command, time::Duration};

const FLOODGATE: &str = env!("CARGO_BIN_EXE_floodgate");

fn floodgate(app: &TestApp, args: &[&str]) -> std::process::Output {
    let out = Command::new(FLOODGATE)
        .envs(env_of(&app.cfg))
        .args(args)
        .output()
        .expect("run floodgate");
    assert!(
        out.status.success(),
        "floodgate {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_are_audited_under_the_operators_name() {
    let app = TestApp::spawn().await;
    app.create_sku("tee", 5, None).await;
    app.publish_raw(b"{this is not an order").await;
    eventually(Duration::from_secs(20), || async {
        app.dead_letters().await == 1
    })
    .await;

    floodgate(&app, &["--actor", "amy", "reconcile", "--check"]);
    floodgate(&app, &["--actor", "amy", "dlq", "list"]);
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log").await,
        1,
        "only the SKU's creation"
    );

    floodgate(&app, &["--actor", "amy", "reconcile", "--quiet-secs", "0"]);
    floodgate(&app, &["--actor", "bo", "dlq", "replay", "--all"]);
    eventually(Duration::from_secs(20), || async {
        app.dead_letters().await == 1
    })
    .await;

    let db = app.pg.get().await.unwrap();
    let rows = db
        .query(
            "SELECT actor, role, action, target, request_id, after FROM audit_log
              WHERE actor LIKE 'cli:%' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let want = |a: &str, act: &str, t: &str| {
        (
            a.to_owned(),
            "admin".to_owned(),
            act.to_owned(),
            t.to_owned(),
        )
    };
    assert_eq!(
        got,
        [
            want("cli:amy", "reconcile", "stock"),
            want("cli:bo", "dlq.replay", "dlq")
        ]
    );
    let after: serde_json::Value = rows[0].get(5);
    assert_eq!(after["skus_loaded"].as_i64(), Some(1), "{after}");
    let id: Option<String> = rows[1].get(4);
    assert!(
        id.is_some_and(|i| uuid::Uuid::parse_str(&i).is_ok()),
        "a run id"
    );

    // A name that cannot be recorded is refused before anything runs; commands that
    // write nothing do not mind it.
    let token = Command::new(FLOODGATE)
        .envs(env_of(&app.cfg))
        .args(["--actor", "two words", "token", "--sub", "x"])
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let bad = Command::new(FLOODGATE)
        .envs(env_of(&app.cfg))
        .args(["--actor", "two words", "reconcile"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert_eq!(app.scalar("SELECT count(*) FROM audit_log").await, 3);
}
