//! The service binaries as an operator meets them: `--help` and `--version` answer
//! without touching a server, and no process starts without a real JWT secret.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BINARIES: [(&str, &str); 3] = [
    ("floodgate-ingress", env!("CARGO_BIN_EXE_ingress-process")),
    ("floodgate-worker", env!("CARGO_BIN_EXE_worker-process")),
    ("floodgate-notifier", env!("CARGO_BIN_EXE_notifier-process")),
];

/// Runs `exe args` with only `env` set (servers pointed at a closed port, so a binary
/// that started its service would fail or hang, not quietly work). Fails the test if
/// the process has not exited within a minute.
fn run(exe: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(exe)
        .args(args)
        .env_clear()
        .env("FLOODGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
        .env("FLOODGATE_REDIS_URL", "redis://127.0.0.1:9")
        .env(
            "FLOODGATE_DATABASE_URL",
            "postgres://postgres@127.0.0.1:9/x",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{exe} {args:?} did not exit: it started the service");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_and_version_answer_without_starting_anything() {
    for (name, exe) in BINARIES {
        let help = run(exe, &["--help"], &[]);
        let out = text(&help.stdout);
        assert!(help.status.success(), "{name} --help: {help:?}");
        assert!(
            out.contains(name) && out.contains("FLOODGATE_JWT_SECRET"),
            "{out}"
        );
        // Every variable, with its default and meaning.
        assert!(
            out.lines()
                .any(|l| l.trim() == "FLOODGATE_BATCH_SIZE [default: 200]"),
            "{out}"
        );
        for v in floodgate_common::config::VARS {
            assert!(
                out.contains(v.name) && out.contains(v.about),
                "{name}: {v:?}"
            );
        }

        let version = run(exe, &["--version"], &[]);
        assert!(version.status.success(), "{name} --version: {version:?}");
        assert_eq!(
            text(&version.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );

        let bogus = run(exe, &["--port", "1"], &[]);
        assert_eq!(bogus.status.code(), Some(2), "{name}: {bogus:?}");
        assert!(text(&bogus.stderr).contains("--port"), "{bogus:?}");
    }
}

#[test]
fn no_secret_or_a_short_one_refuses_to_start_and_says_why() {
    for (name, exe) in BINARIES {
        let none = run(exe, &[], &[]);
        let err = text(&none.stderr);
        assert!(!none.status.success(), "{name} started without a secret");
        assert!(
            err.contains("FLOODGATE_JWT_SECRET") && err.contains("not set"),
            "{name}: {err}"
        );

        let short = run(
            exe,
            &[],
            &[("FLOODGATE_JWT_SECRET", "floodgate-dev-secret-change-me")],
        );
        let err = text(&short.stderr);
        assert!(
            !short.status.success(),
            "{name} started with a short secret"
        );
        assert!(err.contains("at least 32"), "{name}: {err}");
    }
}

#[test]
fn an_unknown_variable_is_warned_about_naming_the_one_it_misspells() {
    for (name, exe) in BINARIES {
        // The servers are unreachable: each process reads its configuration, warns, and
        // fails to connect.
        let out = run(
            exe,
            &[],
            &[
                (
                    "FLOODGATE_JWT_SECRET",
                    "a-test-secret-of-at-least-32-bytes!",
                ),
                ("FLOODGATE_BATCH_SIZ", "5"),
                ("FLOODGATE_TOTALLY_UNRELATED_THING", "1"),
            ],
        );
        let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
        let warned = |var: &str| {
            log.lines()
                .filter(|l| l.contains(&format!("unknown configuration variable {var} ")))
                .collect::<Vec<_>>()
        };
        let typo = warned("FLOODGATE_BATCH_SIZ");
        assert_eq!(typo.len(), 1, "{name}: once per variable: {log}");
        assert!(
            typo[0].contains("did you mean FLOODGATE_BATCH_SIZE?") && typo[0].contains("WARN"),
            "{name}: {log}"
        );
        let other = warned("FLOODGATE_TOTALLY_UNRELATED_THING");
        assert_eq!(other.len(), 1, "{name}: {log}");
        assert!(!other[0].contains("did you mean"), "{name}: {log}");
        // The known ones set by `run` are not warned about.
        assert!(warned("FLOODGATE_REDIS_URL").is_empty(), "{name}: {log}");
        assert!(warned("FLOODGATE_JWT_SECRET").is_empty(), "{name}: {log}");
    }
}

#[test]
fn a_worker_refuses_a_schema_older_than_its_migrations_and_names_the_fix() {
    // A namespace whose schema exists but was never migrated: the worker would write
    // columns that are not there and dead-letter every order.
    let ns = format!("unmigrated_{}", std::process::id());
    let db = "postgres://postgres@127.0.0.1:5432/floodgate";
    let psql = |sql: &str| {
        let ok = Command::new("psql")
            .args([db, "-qAtc", sql])
            .status()
            .expect("psql")
            .success();
        assert!(ok, "psql {sql}");
    };
    psql(&format!("CREATE SCHEMA {ns}"));
    let out = run(
        BINARIES[1].1,
        &[],
        &[
            (
                "FLOODGATE_JWT_SECRET",
                "a-test-secret-that-is-long-enough-0123456789",
            ),
            ("FLOODGATE_NAMESPACE", &ns),
            ("FLOODGATE_DATABASE_URL", db),
            ("FLOODGATE_REDIS_URL", "redis://127.0.0.1:6379"),
            ("FLOODGATE_WORKER_ADDR", "127.0.0.1:0"),
        ],
    );
    psql(&format!("DROP SCHEMA {ns} CASCADE"));
    let log = text(&out.stdout) + &text(&out.stderr);
    assert!(
        !out.status.success(),
        "the worker started on an unmigrated schema"
    );
    assert!(
        log.contains("is at migration none") && log.contains("run `floodgate migrate` first"),
        "{log}"
    );
}
