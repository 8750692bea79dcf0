//! `floodgate reconcile --if-unloaded` as `ops/stack up` runs it on every start: once the
//! stock is loaded it returns at once, without scanning history.

use std::process::Command;

fn floodgate(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(args)
        .env("FLOODGATE_NAMESPACE", ns)
        .env(
            "FLOODGATE_JWT_SECRET",
            "a-test-secret-of-at-least-32-bytes-0000",
        )
        .env("FLOODGATE_LOG", "warn")
        .output()
        .expect("run floodgate")
}

#[test]
fn if_unloaded_loads_once_then_returns_without_the_scan() {
    let ns = format!("cli_{}", std::process::id());
    assert!(floodgate(&ns, &["migrate"]).status.success());
    let first = floodgate(&ns, &["reconcile", "--if-unloaded", "--quiet-secs", "0"]);
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{first:?}");
    assert!(
        out.contains("ok: Redis matches PostgreSQL"),
        "the first run loads and checks: {out}"
    );

    let again = floodgate(&ns, &["reconcile", "--if-unloaded"]);
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(
        out.trim(),
        "stock is loaded; nothing to do",
        "no invariant scan"
    );

    // The scan itself, on demand.
    let check = floodgate(&ns, &["reconcile", "--check"]);
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("ok: Redis matches"),
        "{check:?}"
    );
    // Clean up the namespace's schema and keys.
    let _ = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "floodgate",
            "-qc",
        ])
        .arg(format!("DROP SCHEMA IF EXISTS {ns} CASCADE"))
        .output();
    let _ = Command::new("redis-cli")
        .args(["--scan", "--pattern"])
        .arg(format!("{{{ns}}}*"))
        .output()
        .map(|o| {
            let keys: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(String::from)
                .collect();
            if !keys.is_empty() {
                let _ = Command::new("redis-cli").arg("DEL").args(keys).output();
            }
        });
}
