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
