//! Private server instances for fault tests: their own port and data directory, started
//! and stopped by the test, so killing them disturbs nothing else on the machine.
//!
//! The clustered ones ([`PrivateRedisCluster`], [`PrivateRabbitCluster`],
//! [`PrivatePgPair`], all three at once with [`PrivateCluster`]) are run by `ops/cluster`
//! (the script `ops/stack up --cluster` uses too) on a free range of ports and a
//! temporary directory, and are torn down on drop, a panicking test included.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, up: bool, timeout: Duration, what: &str) {
    let until = Instant::now() + timeout;
    loop {
        let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if open == up {
            return;
        }
        assert!(
            Instant::now() < until,
            "{what} on port {port} did not {} within {timeout:?}",
            if up { "start" } else { "stop" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "floodgate-{name}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A redis-server that keeps nothing on disk.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(10), "redis");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then start empty on the same port.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_port(self.port, false, Duration::from_secs(10), "redis");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A RabbitMQ node of its own (own node name, ports and database directory).
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRabbit {
    pub fn start() -> Self {
        let port = free_port();
        let dir = tempdir("rabbit");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // Debian's rabbitmq-server drops to the rabbitmq user when started as root.
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir));
        }
        let mut r = Self {
            node: format!("fgtest{port}@localhost"),
            port,
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    fn env(&self, cmd: &mut Command) {
        let dist = free_port();
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("none"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.dir.join("none-advanced.config"),
            )
            .env(
                "PATH",
                format!(
                    "/usr/sbin:/usr/lib/rabbitmq/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("rabbitmq-server");
        self.env(&mut cmd);
        let log = std::fs::File::create(self.dir.join("stdout.log")).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(90), "rabbitmq");
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the node (as an operator would), then starts it again with its data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        let mut cmd = Command::new("rabbitmqctl");
        self.env(&mut cmd);
        cmd.args(["-n", &self.node, "shutdown"]);
        let _ = cmd.output();
        if let Some(mut c) = self.child.take() {
            let until = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_port(self.port, false, Duration::from_secs(30), "rabbitmq");
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL cluster of its own, made with initdb (run as the `postgres` user when the
/// tests run as root, as PostgreSQL refuses to run as root).
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    running: bool,
}

fn pg_bindir() -> PathBuf {
    let out = Command::new("pg_config").arg("--bindir").output();
    if let Ok(o) = out
        && o.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if p.join("initdb").exists() && p.join("pg_ctl").exists() {
            return p;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = tempdir("pg");
        let bin = pg_bindir();
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let pg = Self {
            port: free_port(),
            dir,
            bin,
            running: false,
        };
        run(pg
            .as_owner(&pg.bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(pg.dir.join("data")));
        let mut pg = pg;
        pg.start_server();
        pg
    }

    fn as_owner(&self, program: &Path) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub fn start_server(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        run(self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "start"]));
        self.running = true;
    }

    /// Fast shutdown: connections are dropped, as in a crash of the database server.
    pub fn stop_server(&mut self) {
        run(self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"]));
        self.running = false;
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/floodgate", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------ clusters

/// `ops/cluster` of this checkout.
fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/cluster")
}

/// Ranges handed out by [`free_port_range`] in this process, so two tests running at
/// once never pick overlapping ranges (a range is checked free, not held).
static TAKEN_RANGES: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());

/// The first of `count` consecutive ports on 127.0.0.1 that are all free now, below the
/// kernel's ephemeral range (so outgoing connections do not take them meanwhile).
pub fn free_port_range(count: u16) -> u16 {
    let mut taken = TAKEN_RANGES.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..500 {
        // A random start: ranges of tests in other processes (other test binaries of a
        // parallel run) rarely meet, and a range found busy is skipped anyway.
        let start = 15_000 + (uuid::Uuid::new_v4().as_u128() % 15_000) as u16;
        let end = start + count;
        if taken.iter().any(|&(s, e)| start < e && s < end) {
            continue;
        }
        if (start..end).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            taken.push((start, end));
            return start;
        }
    }
    panic!("no {count} consecutive free ports between 15000 and 30000");
}

/// One engine of `ops/cluster` under a base port and a directory of its own; `down`
/// and the directory removed on drop.
struct ClusterEngine {
    engine: &'static str,
    base: u16,
    dir: PathBuf,
}

impl ClusterEngine {
    fn up(engine: &'static str, ports: u16) -> Self {
        let e = Self {
            engine,
            base: free_port_range(ports),
            dir: tempdir(&format!("cluster-{engine}")),
        };
        let started = Instant::now();
        e.run(&["up"]);
        eprintln!(
            "ops/cluster {engine} up (ports {}..{}) in {:.1?}",
            e.base,
            e.base + ports - 1,
            started.elapsed()
        );
        e
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cluster_script());
        c.arg("--base-port")
            .arg(self.base.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .arg(self.engine)
            .args(args);
        c
    }

    /// Runs `ops/cluster ENGINE ARGS`, panicking with its output if it fails; its stdout.
    fn run(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "ops/cluster {} {} failed:\n{}{}",
            self.engine,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `nodes`: one line of whitespace-separated fields per node.
    fn lines(&self, args: &[&str]) -> Vec<Vec<String>> {
        self.run(args)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|f| !f.is_empty())
            .collect()
    }
}

impl Drop for ClusterEngine {
    fn drop(&mut self) {
        let out = self.command(&["down"]).stdin(Stdio::null()).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("ops/cluster {} down failed: {out:?}", self.engine);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis node's role and state as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisNode {
    pub index: usize,
    pub port: u16,
    pub master: bool,
    /// Answers and is not flagged failed.
    pub up: bool,
    /// The index of a replica's master.
    pub master_index: Option<usize>,
}

/// A Redis Cluster of 6 nodes (3 masters, 3 replicas, `cluster-node-timeout 2000`) on
/// loopback. Node `i` listens on `port(i)`; a `kill -9` of a master has its replica take
/// over in about 4 s.
pub struct PrivateRedisCluster {
    engine: ClusterEngine,
}

impl PrivateRedisCluster {
    pub const NODES: usize = 6;

    /// Starts the nodes and creates the cluster (about 3 s).
    pub fn start() -> Self {
        Self {
            engine: ClusterEngine::up("redis", 2 * Self::NODES as u16),
        }
    }

    /// The seed list FLOODGATE_REDIS_URL takes: every node, comma-separated.
    pub fn url(&self) -> String {
        (0..Self::NODES)
            .map(|i| self.node_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn port(&self, i: usize) -> u16 {
        assert!(i < Self::NODES, "redis node {i} of {}", Self::NODES);
        self.engine.base + i as u16
    }

    pub fn ports(&self) -> Vec<u16> {
        (0..Self::NODES).map(|i| self.port(i)).collect()
    }

    /// One node alone (for a plain connection: CLUSTER INFO, ROLE...).
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.port(i))
    }

    /// Every node's role and state, as a live node sees them.
    pub fn nodes(&self) -> Vec<RedisNode> {
        self.engine
            .lines(&["nodes"])
            .into_iter()
            .map(|f| RedisNode {
                index: f[0].parse().unwrap(),
                port: f[1].parse().unwrap(),
                master: f[2] == "master",
                up: f[3] == "up",
                master_index: f.get(4).and_then(|m| m.parse().ok()),
            })
            .collect()
    }

    /// The indexes of the live masters.
    pub fn masters(&self) -> Vec<usize> {
        self.nodes()
            .into_iter()
            .filter(|n| n.master && n.up)
            .map(|n| n.index)
            .collect()
    }

    /// The live master that owns `key`'s hash slot: the one that does not answer MOVED.
    pub fn master_of_key(&self, key: &str) -> usize {
        let masters = self.masters();
        for &m in &masters {
            let out = redis_cli(self.port(m), &["EXISTS", key]);
            if !out.starts_with("MOVED") && !out.starts_with("ERR") {
                return m;
            }
        }
        panic!("no live master owns {key} (masters {masters:?})");
    }

    /// The replica of master `i`, if it has a live one.
    pub fn replica_of(&self, i: usize) -> Option<usize> {
        self.nodes()
            .into_iter()
            .find(|n| !n.master && n.up && n.master_index == Some(i))
            .map(|n| n.index)
    }

    /// `kill -9` of node `i`.
    pub fn kill_node(&self, i: usize) {
        self.engine.run(&["kill-node", &i.to_string()]);
    }

    /// Starts node `i` again (same node id): it rejoins, as a replica if its replica took
    /// over meanwhile, and returns once it agrees with the cluster on its role.
    pub fn start_node(&self, i: usize) {
        self.engine.run(&["start-node", &i.to_string()]);
    }

    /// Waits until `replica` is a master and every live node says cluster_state:ok
    /// (after its master was killed); returns how long that took from now.
    pub fn wait_promoted(&self, replica: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let promoted = self
                .nodes()
                .iter()
                .any(|n| n.index == replica && n.master && n.up);
            if promoted
                && self
                    .nodes()
                    .iter()
                    .filter(|n| n.up)
                    .all(|n| redis_cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "redis node {replica} not promoted within {timeout:?}: {:?}",
                self.nodes()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `redis-cli -p PORT ARGS` (no cluster redirection): its output, errors included.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A three-node RabbitMQ cluster (no plugins, guest/guest) on loopback. Node `i` takes
/// AMQP on `port(i)`. Starting takes 15-30 s (RabbitMQ boots slowly on two cores).
pub struct PrivateRabbitCluster {
    engine: ClusterEngine,
}

impl PrivateRabbitCluster {
    pub const NODES: usize = 3;

    pub fn start() -> Self {
        Self {
            engine: ClusterEngine::up("rabbitmq", 2 * Self::NODES as u16),
        }
    }

    /// The node list FLOODGATE_AMQP_URL takes: every node's URI, comma-separated.
    pub fn url(&self) -> String {
        (0..Self::NODES)
            .map(|i| self.node_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn port(&self, i: usize) -> u16 {
        assert!(i < Self::NODES, "rabbitmq node {i} of {}", Self::NODES);
        self.engine.base + i as u16
    }

    pub fn node_url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port(i))
    }

    /// Which nodes run (the AMQP port answers).
    pub fn running(&self) -> Vec<bool> {
        self.engine
            .lines(&["nodes"])
            .into_iter()
            .map(|f| f[3] == "running")
            .collect()
    }

    /// Every quorum queue of vhost `/` and the index of the node holding its leader.
    pub fn leaders(&self) -> BTreeMap<String, usize> {
        self.engine
            .lines(&["leaders"])
            .into_iter()
            .map(|f| (f[0].clone(), f[1].parse().unwrap()))
            .collect()
    }

    /// The node holding `queue`'s leader (None: no such quorum queue, or no leader now).
    pub fn leader_of(&self, queue: &str) -> Option<usize> {
        self.leaders().get(queue).copied()
    }

    /// `rabbitmq-queues rebalance quorum`: spreads the leaders over the nodes.
    pub fn rebalance(&self) {
        self.engine.run(&["rebalance"]);
    }

    /// `kill -9` of node `i`'s Erlang VM.
    pub fn kill_node(&self, i: usize) {
        self.engine.run(&["kill-node", &i.to_string()]);
    }

    /// A graceful stop of node `i` (`rabbitmqctl stop`).
    pub fn stop_node(&self, i: usize) {
        self.engine.run(&["stop-node", &i.to_string()]);
    }

    /// Starts node `i` again with its data; returns once it runs in the cluster
    /// (10-15 s).
    pub fn start_node(&self, i: usize) {
        self.engine.run(&["start-node", &i.to_string()]);
    }
}

/// A PostgreSQL primary and its streaming replica (pg_basebackup -R -X stream), with a
/// `floodgate` database, on loopback.
pub struct PrivatePgPair {
    engine: ClusterEngine,
}

/// The name the scale-out plan uses too.
pub type PrivatePgReplica = PrivatePgPair;

impl PrivatePgPair {
    /// initdb, primary, base backup, replica (about 5 s).
    pub fn start() -> Self {
        Self {
            engine: ClusterEngine::up("postgres", 2),
        }
    }

    /// FLOODGATE_DATABASE_URL: the primary.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/floodgate",
            self.primary_port()
        )
    }

    /// FLOODGATE_DATABASE_REPLICA_URL: the replica.
    pub fn replica_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/floodgate",
            self.replica_port()
        )
    }

    pub fn primary_port(&self) -> u16 {
        self.engine.base
    }

    pub fn replica_port(&self) -> u16 {
        self.engine.base + 1
    }

    /// Promotes the replica to a primary (pg_ctl promote).
    pub fn promote(&self) {
        self.engine.run(&["promote"]);
    }

    /// Stops the primary at once (pg_ctl -m immediate: like a crash).
    pub fn kill_primary(&self) {
        self.engine.run(&["kill-node", "0"]);
    }

    /// Stops the replica at once.
    pub fn kill_replica(&self) {
        self.engine.run(&["kill-node", "1"]);
    }

    /// (primary, replica): each node's role now (`primary`/`replica`) and whether it is up.
    pub fn nodes(&self) -> Vec<(String, bool)> {
        self.engine
            .lines(&["nodes"])
            .into_iter()
            .map(|f| (f[2].clone(), f[3] == "up"))
            .collect()
    }
}

/// The whole cluster topology (Redis Cluster, RabbitMQ cluster, PostgreSQL pair),
/// started in parallel (RabbitMQ sets the pace).
pub struct PrivateCluster {
    pub redis: PrivateRedisCluster,
    pub rabbit: PrivateRabbitCluster,
    pub pg: PrivatePgPair,
}

impl PrivateCluster {
    pub fn start() -> Self {
        std::thread::scope(|s| {
            let rabbit = s.spawn(PrivateRabbitCluster::start);
            let redis = s.spawn(PrivateRedisCluster::start);
            let pg = s.spawn(PrivatePgPair::start);
            // Join all before unwrapping, so a failed engine still lets the others drop.
            let (redis, rabbit, pg) = (redis.join(), rabbit.join(), pg.join());
            match (redis, rabbit, pg) {
                (Ok(redis), Ok(rabbit), Ok(pg)) => Self { redis, rabbit, pg },
                (r, q, p) => {
                    let why = [r.err(), q.err(), p.err()]
                        .into_iter()
                        .flatten()
                        .map(|e| {
                            e.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_default()
                        })
                        .collect::<Vec<_>>()
                        .join("\n");
                    panic!("cluster start failed:\n{why}");
                }
            }
        })
    }

    /// The FLOODGATE_* variables of this topology.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLOODGATE_REDIS_URL", self.redis.url()),
            ("FLOODGATE_AMQP_URL", self.rabbit.url()),
            ("FLOODGATE_DATABASE_URL", self.pg.url()),
            ("FLOODGATE_DATABASE_REPLICA_URL", self.pg.replica_url()),
        ]
    }
}
