//! `floodgate token` signs with the configured secret or refuses: never with a default.

use std::process::Command;

fn floodgate(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run floodgate")
}

#[test]
fn token_needs_a_real_secret_and_signs_with_the_first() {
    let out = floodgate(&[], &["token", "--sub", "alice"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed a token without a secret");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FLOODGATE_JWT_SECRET") && err.contains("not set"),
        "{err}"
    );

    let new = "a-new-secret-of-at-least-32-bytes-123";
    let old = "an-old-secret-of-at-least-32-bytes-456";
    let list = format!("{new},{old}");
    let out = floodgate(
        &[("FLOODGATE_JWT_SECRET", &list)],
        &["token", "--sub", "alice", "--role", "admin"],
    );
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let only = |s: &str| floodgate_common::auth::Verifier::new(s).verify(token.trim());
    let caller = only(new).expect("signed with the first secret");
    assert!(caller.is_admin());
    assert!(only(old).is_err());
}

#[test]
fn an_unknown_variable_is_warned_about_on_stderr_and_the_token_stays_clean() {
    let out = floodgate(
        &[
            (
                "FLOODGATE_JWT_SECRET",
                "a-test-secret-of-at-least-32-bytes!",
            ),
            ("FLOODGATE_NAMESPCE", "shop"),
        ],
        &["token", "--sub", "alice"],
    );
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "unknown configuration variable FLOODGATE_NAMESPCE is ignored; did you mean FLOODGATE_NAMESPACE?"
        ),
        "{err}"
    );
    // Only the token on stdout, so `$(floodgate token ...)` still works.
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "{token}");
    assert_eq!(token.lines().count(), 1, "{token}");
}
