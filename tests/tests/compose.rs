//! `docker-compose.yml` and the `Dockerfile` against the code they run. No Docker engine
//! is needed: `docker-compose config` (Debian's docker-compose, which `ops/stack test`
//! installs; or Docker's `docker compose`) validates the file and prints it normalized
//! (anchors merged, variables interpolated, paths absolute), and the checks read that:
//!
//! - every `FLOODGATE_*` variable set for a service is one floodgate reads
//!   (`floodgate_common::config::VARS`), so a renamed variable fails here;
//! - each floodgate service's health check, published and exposed ports are the port
//!   of its own `*_ADDR` setting (or its default), and the Prometheus targets in
//!   `ops/prometheus/targets-compose/` name compose services on the ports they serve
//!   metrics on, every floodgate service among them;
//! - every command is a binary the Dockerfile puts in the image it runs, and every such
//!   binary is a bin target of the workspace (or of ops/loadtest);
//! - every host path mounted and every path the Dockerfile copies exists (and
//!   `.dockerignore` does not drop it);
//! - start-up order: a `service_healthy` dependency has a health check, the services
//!   wait for `migrate`, `reconcile` waits for the services;
//! - with no `FLOODGATE_JWT_SECRET`, compose refuses the file, naming the variable;
//! - against the real services (in-process, real servers), the health checks' paths and
//!   `/metrics` answer 200.
//!
//! Without docker-compose the tests are skipped, except under CI (`CI` set), where they fail.

use floodgate_tests::{Options, TestApp};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The floodgate services: binary, and the variable holding its listen address.
const SERVICES: [(&str, &str); 3] = [
    ("floodgate-ingress", "FLOODGATE_INGRESS_ADDR"),
    ("floodgate-worker", "FLOODGATE_WORKER_ADDR"),
    ("floodgate-notifier", "FLOODGATE_NOTIFIER_ADDR"),
];

/// A stand-in secret for validating the file (never used to sign anything).
const DUMMY_SECRET: &str = "compose-check-dummy-secret-0123456789abcdef";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// Every variable floodgate reads, with its default ("" when required or unset).
fn registry() -> BTreeMap<&'static str, &'static str> {
    floodgate_common::config::VARS
        .iter()
        .map(|v| (v.name, v.default))
        .collect()
}

/// The compose command: Debian's `docker-compose`, else `docker compose`; None if neither
/// runs. Under CI its absence is a failure: `ops/stack test` installs it.
fn compose_command() -> Option<Vec<&'static str>> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let found = [&["docker-compose"][..], &["docker", "compose"][..]]
        .into_iter()
        .find(|c| works(c))
        .map(<[&str]>::to_vec);
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "neither docker-compose nor `docker compose` runs; `ops/stack test` installs \
             Debian's docker-compose"
        );
        eprintln!("skipped: no docker-compose (ops/stack test installs it)");
    }
    found
}

/// `docker-compose config` of the repository's file with the loadtest profile on, in an
/// environment holding only `env` (no `.env` file, nothing inherited that compose reads).
fn compose_config(cmd: &[&str], env: &[(&str, &str)]) -> Output {
    let root = root();
    // docker-compose 1.x wants a regular file (not /dev/null).
    let no_env_file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compose-empty.env");
    std::fs::write(&no_env_file, "").expect("an empty env file");
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..])
        .arg("--project-directory")
        .arg(&root)
        .arg("-f")
        .arg(root.join("docker-compose.yml"))
        .arg("--env-file")
        .arg(&no_env_file)
        .args(["--profile", "loadtest", "config"])
        .env_clear()
        .envs(env.iter().copied());
    for keep in ["PATH", "HOME", "LANG"] {
        if let Some(v) = std::env::var_os(keep) {
            c.env(keep, v);
        }
    }
    c.output().expect("run docker-compose config")
}

/// The normalized compose file, or None when compose is missing (outside CI).
fn normalized() -> Option<Value> {
    let cmd = compose_command()?;
    let out = compose_config(&cmd, &[("FLOODGATE_JWT_SECRET", DUMMY_SECRET)]);
    assert!(
        out.status.success(),
        "docker-compose config refused docker-compose.yml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    Some(yaml_serde::from_str(&text).expect("docker-compose config prints YAML"))
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A scalar as text (compose prints some numbers as numbers, some as strings).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A command or entrypoint as a list of words (the string form split on whitespace).
fn words(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a.iter().map(text).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// The port of a `host:port` or `[v6]:port` address.
fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// The port of a URL `scheme://host:port/...` (None without an explicit port).
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    port_of(hostport)
}

fn url_path(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/').map_or("/".into(), |i| rest[i..].to_owned())
}

/// Published ports as (host port, container port): the short form
/// `[ip:]published:target[/proto]` (docker-compose 1.x) or the long form (2.x).
fn published(svc: &Value) -> Vec<(u16, u16)> {
    let Some(Value::Array(ports)) = svc.get("ports") else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|p| match p {
            Value::Object(m) => {
                let target = text(&m["target"]).parse().expect("target port");
                let host = m
                    .get("published")
                    .map_or(target, |p| text(p).parse().expect("published port"));
                (host, target)
            }
            short => {
                let s = text(short);
                let s = s.split('/').next().unwrap_or_default();
                let mut parts = s.rsplit(':');
                let target = parts
                    .next()
                    .and_then(|t| t.parse().ok())
                    .expect("target port");
                let host = parts.next().and_then(|h| h.parse().ok()).unwrap_or(target);
                (host, target)
            }
        })
        .collect()
}

fn exposed(svc: &Value) -> BTreeSet<u16> {
    let Some(Value::Array(ports)) = svc.get("expose") else {
        return BTreeSet::new();
    };
    ports
        .iter()
        .map(|p| {
            text(p)
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .expect("exposed port")
        })
        .collect()
}

/// Host paths bind-mounted into a service (absolute, as `config` resolves them).
fn bind_sources(svc: &Value) -> Vec<PathBuf> {
    let Some(Value::Array(vols)) = svc.get("volumes") else {
        return Vec::new();
    };
    vols.iter()
        .filter_map(|v| match v {
            Value::Object(m) => (m.get("type").map(text).as_deref() == Some("bind"))
                .then(|| PathBuf::from(text(&m["source"]))),
            short => {
                let s = text(short);
                let src = s.split(':').next().unwrap_or_default();
                (src.starts_with('/') || src.starts_with('.')).then(|| PathBuf::from(src))
            }
        })
        .collect()
}

/// The health check's command, or None when the service has none (or disables it).
fn healthcheck(svc: &Value) -> Option<Vec<String>> {
    let hc = svc.get("healthcheck")?;
    if hc.get("disable").is_some_and(|d| d == &Value::Bool(true)) {
        return None;
    }
    let test = words(hc.get("test"));
    (!test.is_empty() && test[0] != "NONE").then_some(test)
}

/// The program a service runs: its entrypoint, else its command.
fn program(svc: &Value) -> Option<String> {
    let entrypoint = words(svc.get("entrypoint"));
    entrypoint
        .into_iter()
        .next()
        .or_else(|| words(svc.get("command")).into_iter().next())
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    match svc.get("environment") {
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|kv| {
                let kv = text(kv);
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// One build stage of the Dockerfile.
#[derive(Debug, Default)]
struct Stage {
    name: String,
    base: String,
    /// Files copied into /usr/local/bin/ (the image's programs).
    bins: Vec<String>,
    /// Those of them built by another stage (`COPY --from=`).
    built: Vec<String>,
    /// Sources copied from the build context.
    context_copies: Vec<String>,
}

/// The Dockerfile's stages (continuation lines joined, comments dropped).
fn dockerfile_stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut stages: Vec<Stage> = Vec::new();
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[0].to_ascii_uppercase().as_str() {
            "FROM" => stages.push(Stage {
                base: w[1].to_owned(),
                name: match w.get(2) {
                    Some(a) if a.eq_ignore_ascii_case("as") => w[3].to_owned(),
                    _ => String::new(),
                },
                ..Stage::default()
            }),
            "COPY" => {
                let stage = stages.last_mut().expect("COPY before FROM");
                let flags: Vec<&str> = w[1..]
                    .iter()
                    .copied()
                    .filter(|a| a.starts_with("--"))
                    .collect();
                let args: Vec<&str> = w[1..]
                    .iter()
                    .copied()
                    .filter(|a| !a.starts_with("--"))
                    .collect();
                let (dest, sources) = args.split_last().expect("COPY has a destination");
                let from_stage = flags.iter().any(|f| f.starts_with("--from="));
                if !from_stage {
                    stage
                        .context_copies
                        .extend(sources.iter().map(|s| (*s).to_owned()));
                }
                for s in sources {
                    let name = match dest.strip_prefix("/usr/local/bin/") {
                        Some("") => Path::new(s)
                            .file_name()
                            .expect("a file")
                            .to_string_lossy()
                            .into_owned(),
                        Some(file) => file.to_owned(),
                        None => continue,
                    };
                    if from_stage {
                        stage.built.push(name.clone());
                    }
                    stage.bins.push(name);
                }
            }
            _ => {}
        }
    }
    stages
}

/// The binaries a target's image holds: its own and its base stages'.
fn image_bins(stages: &[Stage], target: &str) -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    let mut name = target.to_owned();
    while let Some(stage) = stages.iter().find(|s| s.name == name) {
        bins.extend(stage.bins.iter().cloned());
        name = stage.base.clone();
    }
    bins
}

/// The bin targets of a cargo workspace (`cargo metadata`, no dependency resolution).
fn cargo_bins(manifest: &Path) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").clone())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.contains(&Value::from("bin")))
        })
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Whether a `.dockerignore` pattern (the forms that file uses: a path, `**/name`,
/// `*.ext`) drops `path` or a folder above it.
fn ignored(patterns: &[String], path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches("./").split('/').collect();
    patterns.iter().any(|p| {
        if let Some(name) = p.strip_prefix("**/") {
            parts.contains(&name)
        } else if let Some(ext) = p.strip_prefix('*') {
            parts.len() == 1 && parts[0].ends_with(ext)
        } else {
            let p: Vec<&str> = p.trim_end_matches('/').split('/').collect();
            parts.starts_with(&p)
        }
    })
}

/// The listen port of a compose service running a floodgate service binary.
fn service_port(svc: &Value, addr_var: &str, registry: &BTreeMap<&str, &str>) -> u16 {
    let env = environment(svc);
    let addr = env.get(addr_var).cloned().unwrap_or_else(|| {
        registry
            .get(addr_var)
            .expect("a known variable")
            .to_string()
    });
    port_of(&addr).unwrap_or_else(|| panic!("{addr_var}={addr} has no port"))
}

#[test]
fn compose_refuses_to_start_without_a_jwt_secret() {
    let Some(cmd) = compose_command() else { return };
    let out = compose_config(&cmd, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "docker-compose config accepted a missing secret"
    );
    assert!(stderr.contains("set FLOODGATE_JWT_SECRET"), "{stderr}");
    let out = compose_config(&cmd, &[("FLOODGATE_JWT_SECRET", DUMMY_SECRET)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_file_matches_the_code() {
    let Some(config) = normalized() else { return };
    let root = root();
    let registry = registry();
    let services = config["services"].as_object().expect("services");
    let stages = dockerfile_stages();
    let mut bad: Vec<String> = Vec::new();

    // The Dockerfile: its context copies exist and survive .dockerignore; its binaries
    // are real bin targets.
    let ignore: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .expect(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let mut real_bins = cargo_bins(&root.join("Cargo.toml"));
    real_bins.extend(cargo_bins(&root.join("ops/loadtest/Cargo.toml")));
    for stage in &stages {
        for src in &stage.context_copies {
            if !root.join(src).exists() {
                bad.push(format!(
                    "Dockerfile stage {}: COPY {src}: no such path",
                    stage.name
                ));
            }
            if src != "." && ignored(&ignore, src) {
                bad.push(format!(
                    "Dockerfile stage {}: COPY {src}: dropped by .dockerignore",
                    stage.name
                ));
            }
        }
        for bin in &stage.built {
            if !real_bins.contains(bin) {
                bad.push(format!(
                    "Dockerfile stage {}: {bin} is not a bin target",
                    stage.name
                ));
            }
        }
    }

    let mut by_binary: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut ports: BTreeMap<&str, u16> = BTreeMap::new();
    for (name, svc) in services {
        // Variables.
        for var in environment(svc)
            .keys()
            .filter(|k| k.starts_with("FLOODGATE_"))
        {
            if !registry.contains_key(var.as_str()) {
                bad.push(format!(
                    "{name}: {var} is not a floodgate variable (config::VARS)"
                ));
            }
        }
        // Mounted host paths.
        for src in bind_sources(svc) {
            if !src.starts_with(&root) {
                bad.push(format!(
                    "{name}: mounts {} from outside the repository",
                    src.display()
                ));
            } else if !src.exists() {
                bad.push(format!(
                    "{name}: mounts {}, which does not exist",
                    src.display()
                ));
            }
        }
        // Programs: built by the Dockerfile into the image this service runs.
        let build = svc.get("build");
        let program = program(svc);
        if let Some(build) = build {
            let context = PathBuf::from(text(&build["context"]));
            if context != root {
                bad.push(format!(
                    "{name}: builds from {}, not the repository",
                    context.display()
                ));
            }
            let target = build
                .get("target")
                .map(text)
                .unwrap_or_else(|| stages.last().expect("a stage").name.clone());
            if !stages.iter().any(|s| s.name == target) {
                bad.push(format!("{name}: no Dockerfile stage {target}"));
            }
            let bins = image_bins(&stages, &target);
            match &program {
                Some(p) if bins.contains(p) => {}
                other => bad.push(format!(
                    "{name}: runs {other:?}, not one of {bins:?} (Dockerfile target {target})"
                )),
            }
        }
        // The floodgate services' ports and health checks.
        let Some(&(binary, addr_var)) = SERVICES
            .iter()
            .find(|(b, _)| program.as_deref() == Some(*b))
        else {
            continue;
        };
        by_binary.entry(binary).or_default().push(name.as_str());
        let port = service_port(svc, addr_var, &registry);
        ports.insert(name.as_str(), port);
        for (host, target) in published(svc) {
            if target != port {
                bad.push(format!(
                    "{name}: publishes {host}:{target}, but {addr_var} listens on {port}"
                ));
            }
        }
        for p in exposed(svc) {
            if p != port {
                bad.push(format!(
                    "{name}: exposes {p}, but {addr_var} listens on {port}"
                ));
            }
        }
        match healthcheck(svc) {
            None => bad.push(format!("{name}: no health check")),
            Some(test) => match test.iter().find(|a| a.starts_with("http://")) {
                None => bad.push(format!("{name}: health check {test:?} has no URL")),
                Some(url) => {
                    if url_port(url) != Some(port) {
                        bad.push(format!(
                            "{name}: health check {url}, but {addr_var} listens on {port}"
                        ));
                    }
                    if !["/readyz", "/healthz"].contains(&url_path(url).as_str()) {
                        bad.push(format!(
                            "{name}: health check {url}: not /readyz or /healthz"
                        ));
                    }
                }
            },
        }
    }
    for (binary, _) in SERVICES {
        if !by_binary.contains_key(binary) {
            bad.push(format!("no compose service runs {binary}"));
        }
    }
    if by_binary.get("floodgate-worker").map_or(0, Vec::len) < 2 {
        bad.push("fewer than two workers".into());
    }

    // The live page's ingress URL is ingress's published port.
    if let (Some(notifier), Some(ingress)) = (services.get("notifier"), services.get("ingress")) {
        let url = environment(notifier)
            .get("FLOODGATE_PUBLIC_INGRESS_URL")
            .cloned()
            .unwrap_or_else(|| registry["FLOODGATE_PUBLIC_INGRESS_URL"].to_owned());
        let host_ports: Vec<u16> = published(ingress).iter().map(|(h, _)| *h).collect();
        if !url_port(&url).is_some_and(|p| host_ports.contains(&p)) {
            bad.push(format!(
                "notifier: FLOODGATE_PUBLIC_INGRESS_URL={url}, but ingress publishes {host_ports:?}"
            ));
        }
    }

    // Start-up order.
    for (name, svc) in services {
        let deps = svc.get("depends_on").and_then(Value::as_object);
        for (dep, how) in deps.into_iter().flatten() {
            let condition = how.get("condition").map(text).unwrap_or_default();
            match services.get(dep) {
                None => bad.push(format!("{name}: depends on {dep}, which is not a service")),
                Some(d) if condition == "service_healthy" && healthcheck(d).is_none() => {
                    bad.push(format!(
                        "{name}: waits for {dep} to be healthy, but it has no health check"
                    ));
                }
                _ => {}
            }
        }
        // Runs to completion: never restarted, or restarted only until it succeeds.
        let restart = svc.get("restart").map(text);
        let one_shot = matches!(restart.as_deref(), Some("no" | "on-failure"))
            || svc.get("profiles").is_some();
        if !one_shot && healthcheck(svc).is_none() {
            bad.push(format!(
                "{name}: a long-running service without a health check"
            ));
        }
        let waits_for = |dep: &str, condition: &str| {
            deps.and_then(|d| d.get(dep))
                .and_then(|h| h.get("condition"))
                .is_some_and(|c| text(c) == condition)
        };
        if ports.contains_key(name.as_str())
            && !waits_for("migrate", "service_completed_successfully")
        {
            bad.push(format!("{name}: starts before `migrate` has completed"));
        }
        if name == "reconcile" {
            for &svc in ports.keys() {
                if !waits_for(svc, "service_healthy") {
                    bad.push(format!("reconcile: runs before {svc} is ready"));
                }
            }
        }
    }
    if words(services.get("migrate").and_then(|s| s.get("command"))) != ["floodgate", "migrate"] {
        bad.push("`migrate` does not run `floodgate migrate`".into());
    }
    // A migration that fails once (PostgreSQL not yet taking connections) must not leave
    // every service waiting for it for good.
    if services
        .get("migrate")
        .and_then(|s| s.get("restart"))
        .map(text)
        .as_deref()
        != Some("on-failure")
    {
        bad.push("`migrate` is not restarted on failure".into());
    }
    if words(services.get("reconcile").and_then(|s| s.get("command")))
        != ["floodgate", "reconcile", "--if-unloaded"]
    {
        bad.push("`reconcile` does not run `floodgate reconcile --if-unloaded`".into());
    }

    // Prometheus: every job file prometheus.yml names is here, every target is a compose
    // service on its metrics port, and each floodgate job lists every service of its binary.
    let targets_dir = root.join("ops/prometheus/targets-compose");
    let mut files: BTreeSet<String> = std::fs::read_dir(&targets_dir)
        .expect("ops/prometheus/targets-compose")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let prometheus_yml = root.join("ops/prometheus/prometheus.yml");
    if prometheus_yml.exists() {
        let prom = yaml_file(&prometheus_yml);
        for job in prom["scrape_configs"].as_array().expect("scrape_configs") {
            for sd in job
                .get("file_sd_configs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for f in sd["files"].as_array().expect("files") {
                    let f = text(f);
                    match f.strip_prefix("targets/") {
                        Some(file) if files.contains(file) => {}
                        _ => bad.push(format!(
                            "prometheus.yml reads {f}, which targets-compose/ lacks"
                        )),
                    }
                }
            }
        }
    }
    files.retain(|f| f.ends_with(".yml"));
    for file in &files {
        let job = file.trim_end_matches(".yml");
        let mut hosts = BTreeSet::new();
        let groups = yaml_file(&targets_dir.join(file));
        for group in groups
            .as_array()
            .unwrap_or_else(|| panic!("{file}: a list of target groups"))
        {
            for target in group["targets"].as_array().expect("targets") {
                let target = text(target);
                let (host, port) = target.rsplit_once(':').expect("host:port");
                let port: u16 = port.parse().expect("a port");
                hosts.insert(host.to_owned());
                let Some(svc) = services.get(host) else {
                    bad.push(format!(
                        "targets-compose/{file}: {host} is not a compose service"
                    ));
                    continue;
                };
                let serves = ports
                    .get(host)
                    .map_or_else(|| exposed(svc), |p| BTreeSet::from([*p]));
                if !serves.contains(&port) {
                    bad.push(format!(
                        "targets-compose/{file}: {target}, but {host} serves {serves:?}"
                    ));
                }
            }
        }
        if let Some(names) = by_binary.get(job) {
            let names: BTreeSet<String> = names.iter().map(|n| (*n).to_owned()).collect();
            if names != hosts {
                bad.push(format!(
                    "targets-compose/{file}: scrapes {hosts:?}, compose runs {job} as {names:?}"
                ));
            }
        }
    }
    for binary in by_binary.keys() {
        if !files.contains(&format!("{binary}.yml")) {
            bad.push(format!("targets-compose/ has no {binary}.yml"));
        }
    }

    // The image's default health check finds each service's port from the same variables.
    let script = std::fs::read_to_string(root.join("ops/docker/healthcheck"))
        .expect("ops/docker/healthcheck");
    for (binary, var) in SERVICES {
        let default = registry.get(var).copied().unwrap_or_default();
        if !script.contains(&format!("${{{var}:-{default}}}")) {
            bad.push(format!(
                "ops/docker/healthcheck: no ${{{var}:-{default}}} for {binary}"
            ));
        }
    }

    assert!(
        bad.is_empty(),
        "docker-compose.yml or the Dockerfile disagree with the code:\n  {}",
        bad.join("\n  ")
    );
}

/// The health checks' paths and Prometheus's `/metrics` on the real services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_scrapes_answer_on_the_real_services() {
    let Some(config) = normalized() else { return };
    let app = TestApp::spawn_with(Options {
        worker: true,
        notifier: true,
        ..Options::default()
    })
    .await;
    let base_of = |binary: &str| match binary {
        "floodgate-ingress" => Some(app.base.clone()),
        "floodgate-worker" => app.worker_url.clone(),
        "floodgate-notifier" => app.notifier.clone(),
        _ => None,
    };
    let mut checked = 0;
    for (name, svc) in config["services"].as_object().expect("services") {
        let Some(base) = program(svc).and_then(|p| base_of(&p)) else {
            continue;
        };
        let test = healthcheck(svc).unwrap_or_else(|| panic!("{name}: no health check"));
        let url = test
            .iter()
            .find(|a| a.starts_with("http://"))
            .expect("a URL");
        for path in [url_path(url), "/metrics".to_owned()] {
            let r = reqwest::get(format!("{base}{path}")).await.expect("GET");
            assert_eq!(r.status(), 200, "{name}: GET {path} on the real service");
        }
        checked += 1;
    }
    assert!(checked >= 4, "checked {checked} services");
    app.shut_down();
}
