//! A throwaway Synapse on loopback, for trying handoff (`handoff sandbox`) and for the end-to-end
//! tests. Synapse comes from PyPI at a pinned version, installed once into a virtualenv under the
//! cache folder and reused afterwards.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde::Deserialize;

use crate::registration;

mod federation;
pub mod postgres;
pub use federation::{Federation, FederationNames, Side, run_federated};

pub const SYNAPSE_VERSION: &str = "1.163.2";
pub const SERVER_NAME: &str = "localhost";
pub const SHARED_SECRET: &str = "handoff-sandbox-shared-secret";
/// Synapse's PostgreSQL driver, installed into its venv beside it.
const PSYCOPG2: &str = "psycopg2-binary==2.9.11";

/// A folder of handoff's under the user's cache folder (`$XDG_CACHE_HOME` or `~/.cache`).
pub fn cache_dir(name: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("handoff").join(name)
}

/// The virtualenv holding Synapse: `$HANDOFF_SYNAPSE_VENV`, else `~/.cache/handoff/synapse-<version>`.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("HANDOFF_SYNAPSE_VENV") {
        Some(dir) => PathBuf::from(dir),
        // `-pg`: the venv with psycopg2 has its own folder, so a checkout from before it (whose
        // stamp differs) does not make the shared one again under the other's running Synapses.
        None => cache_dir(&format!("synapse-{SYNAPSE_VERSION}-pg")),
    }
}

/// Installs Synapse into [`venv_dir`] unless it is there; returns the venv's python.
/// With `psycopg2-binary`, Synapse's PostgreSQL driver ([`SynapseDatabase::Postgres`]).
pub fn ensure_synapse_installed() -> Result<PathBuf> {
    let requirement = format!("matrix-synapse=={SYNAPSE_VERSION}");
    // The stamp names the driver too: a venv made before it was added is made again.
    let stamp = format!("{SYNAPSE_VERSION} {PSYCOPG2}");
    ensure_venv(&venv_dir(), &stamp, &[&requirement, PSYCOPG2], &format!("Synapse {SYNAPSE_VERSION}"))
}

/// Makes `venv` a virtualenv with `pip install ARGS` done, from PyPI, unless it already holds
/// that install (its marker file says `stamp`); returns the venv's python. Safe to call from many
/// processes at once: a file lock beside the venv serialises the install.
pub fn ensure_venv(venv: &Path, stamp: &str, pip_args: &[&str], what: &str) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    let marker = venv.join(".handoff-installed");
    let installed = || std::fs::read_to_string(&marker).is_ok_and(|m| m == stamp);
    if installed() {
        return Ok(python);
    }
    let parent = venv.parent().context("venv path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let name = venv.file_name().context("venv path has no name")?.to_string_lossy();
    let lock = File::create(parent.join(format!(".{name}.lock")))?;
    lock.lock().with_context(|| format!("cannot lock the {what} install"))?;
    if installed() {
        return Ok(python);
    }
    eprintln!("handoff: installing {what} from PyPI into {} (once; takes a minute or two)", venv.display());
    let _ = std::fs::remove_dir_all(venv);
    let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run_command(Command::new(&python3).args(["-m", "venv"]).arg(venv), &format!("create the {what} virtualenv"))?;
    run_command(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(pip_args),
        &format!("install {what} with pip"),
    )?;
    std::fs::write(&marker, stamp)?;
    Ok(python)
}

/// Runs a command to its end; a failure says what was being done, with the command's output.
pub fn run_command(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("cannot {what}"))?;
    if !out.status.success() {
        bail!(
            "cannot {what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A port nobody listens on right now at 127.0.0.1; see [`free_port_on`].
pub fn free_port() -> u16 {
    free_port_on(std::net::Ipv4Addr::LOCALHOST)
}

/// A port nobody listens on right now at `host` (any loopback address can be bound on Linux),
/// to be listened on a few seconds later by a process started meanwhile.
///
/// Why not the kernel's pick (`bind(:0)`): that comes from the ephemeral range, the one every
/// outgoing connection takes its source port from, so in the seconds before the server binds
/// it a client connection of another test (or of Synapse) may take it ("Address already in
/// use", seen in CI). The ports handed here lie below that range, and one process never hands
/// the same one twice.
pub fn free_port_on(host: std::net::Ipv4Addr) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let below = ephemeral_low().max(LOWEST + 1_000);
    let span = below - LOWEST;
    // Two processes (test binaries, benches) start at different places of the span.
    let _ = NEXT.compare_exchange(0, 1 + rand::random_range(0..span), Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = (LOWEST + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind((host, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {host} below the ephemeral range")
}

/// The low end of the kernel's ephemeral port range (Linux; 32768, its default, elsewhere).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// What a Synapse is started as: its server name, whether it federates, and YAML appended to
/// its config. The default is the sandbox's: `localhost`, no federation.
#[derive(Clone, Debug)]
pub struct SynapseOptions {
    pub server_name: OwnedServerName,
    pub federation: Option<FederationListener>,
    pub database: SynapseDatabase,
    pub extra: String,
}

/// Where a Synapse keeps its data: SQLite in its folder (the default), or a PostgreSQL database
/// on loopback as the superuser `postgres` with trust auth (as [`postgres::Postgres`] starts it),
/// created `ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0`
/// ([`postgres::Postgres::create_database`]), as Synapse requires.
#[derive(Clone, Debug, Default)]
pub enum SynapseDatabase {
    #[default]
    Sqlite,
    Postgres {
        port: u16,
        database: String,
    },
}

impl SynapseDatabase {
    fn yaml(&self, dir: &Path) -> String {
        match self {
            SynapseDatabase::Sqlite => {
                format!("{{name: sqlite3, args: {{database: \"{}/homeserver.db\"}}}}", dir.display())
            }
            SynapseDatabase::Postgres { port, database } => format!(
                "{{name: psycopg2, args: {{user: postgres, host: 127.0.0.1, port: {port}, database: {database:?}, cp_min: 5, cp_max: 10}}}}"
            ),
        }
    }
}

impl Default for SynapseOptions {
    fn default() -> Self {
        SynapseOptions {
            server_name: ServerName::parse(SERVER_NAME).expect("a valid server name"),
            federation: None,
            database: SynapseDatabase::Sqlite,
            extra: String::new(),
        }
    }
}

/// A federation listener over TLS (Synapse requires TLS between servers and checks the
/// certificates against `ca`, the only CA it then trusts for federation).
#[derive(Clone, Debug)]
pub struct FederationListener {
    /// The loopback address it listens on (the server name's host).
    pub host: std::net::IpAddr,
    pub port: u16,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub ca: PathBuf,
}

/// A running Synapse. Dropping it kills the process.
pub struct Synapse {
    child: Option<Child>,
    python: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    pub server_name: OwnedServerName,
}

impl Synapse {
    /// Writes a homeserver config into `dir` with the given registrations and starts Synapse.
    pub async fn start(dir: &Path, app_service_files: &[PathBuf]) -> Result<Synapse> {
        Self::start_on(dir, free_port(), app_service_files).await
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options().create(true).append(true).open(self.dir.join("synapse.log"))?;
        let child = Command::new(&self.python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(self.dir.join("homeserver.yaml"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start Synapse")?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_until_up(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let versions = format!("{}/_matrix/client/versions", self.url);
        loop {
            if let Ok(resp) = reqwest::get(&versions).await
                && resp.status().is_success()
            {
                return Ok(());
            }
            let log = self.dir.join("synapse.log");
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("Synapse exited ({status}); see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("Synapse did not answer within 90 s; see {}", self.dir.join("synapse.log").display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops Synapse (as an outage would); [`Synapse::restart`] brings it back on the same port.
    /// The process ID of the running Synapse (for its CPU time and memory in the benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()?;
        self.wait_until_up().await
    }

    /// Creates a user through the shared-secret registration API; returns its ID and access token.
    pub async fn register_user(&self, localpart: &str, password: &str, admin: bool) -> Result<(OwnedUserId, String)> {
        #[derive(Deserialize)]
        struct Nonce {
            nonce: String,
        }
        #[derive(Deserialize)]
        struct Registered {
            user_id: OwnedUserId,
            access_token: String,
        }
        let http = reqwest::Client::new();
        let endpoint = format!("{}/_synapse/admin/v1/register", self.url);
        let Nonce { nonce } = http.get(&endpoint).send().await?.error_for_status()?.json().await?;
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(SHARED_SECRET.as_bytes())?;
        let role = if admin { "admin" } else { "notadmin" };
        for (i, part) in [nonce.as_str(), localpart, password, role].iter().enumerate() {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        let mac = hex::encode(mac.finalize().into_bytes());
        let resp = http
            .post(&endpoint)
            .json(&serde_json::json!({
                "nonce": nonce, "username": localpart, "password": password, "admin": admin, "mac": mac,
            }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("cannot register {localpart}: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        let r: Registered = resp.json().await?;
        Ok((r.user_id, r.access_token))
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The config of a sandbox Synapse. It sets no rate limit (`rc_*`): Synapse's defaults apply, as on
/// a homeserver in production; a test or benchmark about something else lifts the ones in its
/// way with [`lifted`] in [`SynapseOptions::extra`], saying why beside it.
fn homeserver_yaml(dir: &Path, port: u16, app_service_files: &[PathBuf], options: &SynapseOptions) -> String {
    let d = dir.display();
    let files: Vec<String> = app_service_files.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    let server_name = &options.server_name;
    let federation = match &options.federation {
        None => "federation_domain_whitelist: []\n".to_owned(),
        Some(f) => federation_yaml(f),
    };
    format!(
        r#"server_name: "{server_name}"
pid_file: "{d}/homeserver.pid"
public_baseurl: "http://127.0.0.1:{port}/"
report_stats: false
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources: [{{names: [client], compress: false}}]
{federation}database: {database}
media_store_path: "{d}/media_store"
signing_key_path: "{d}/signing.key"
macaroon_secret_key: "sandbox-macaroon-secret"
form_secret: "sandbox-form-secret"
registration_shared_secret: "{SHARED_SECRET}"
enable_registration: true
enable_registration_without_verification: true
trusted_key_servers: []
suppress_key_server_warning: true
presence: {{enabled: false}}
app_service_config_files: [{files}]
"#,
        files = files.join(", "),
        database = options.database.yaml(dir),
    ) + options.extra.as_str()
}

/// One of Synapse's rate limits (an `rc_*` setting, or one part of it). A sandbox Synapse keeps
/// Synapse's default for every one of them; [`lifted`] lifts the ones named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimit {
    /// `rc_message`: events sent by a user (0.2/s, burst 10 by default).
    Message,
    /// `rc_registration`: registrations per IP address (the shared-secret admin API is not limited).
    Registration,
    /// `rc_login.address`: logins per IP address (0.003/s, burst 5).
    LoginAddress,
    /// `rc_login.account`: logins per account (0.003/s, burst 5).
    LoginAccount,
    /// `rc_login.failed_attempts`: failed logins per account (0.17/s, burst 3).
    LoginFailedAttempts,
    /// `rc_joins.local`: joins by a user to rooms its server is in (0.1/s, burst 10).
    JoinsLocal,
    /// `rc_joins.remote`: joins by a user over federation (0.01/s, burst 10).
    JoinsRemote,
    /// `rc_joins_per_room`: joins into one room, from any user (1/s, burst 10).
    JoinsPerRoom,
    /// `rc_invites.per_room`: invites sent into one room (0.3/s, burst 10).
    InvitesPerRoom,
    /// `rc_invites.per_user`: invites received by one user, from this or another server (0.003/s, burst 5).
    InvitesPerUser,
    /// `rc_invites.per_issuer`: invites sent by one user (0.3/s, burst 10).
    InvitesPerIssuer,
    /// `rc_third_party_invite`.
    ThirdPartyInvite,
    /// `rc_room_creation`: rooms created by a user (0.016/s, burst 10).
    RoomCreation,
    /// `rc_key_requests`: to-device room key requests (20/s, burst 100).
    KeyRequests,
    /// `rc_3pid_validation`.
    ThreepidValidation,
    /// `rc_media_create`: media IDs created by a user (10/s, burst 50).
    MediaCreate,
    /// `rc_presence.per_user`.
    Presence,
    /// `rc_delayed_event_mgmt`.
    DelayedEventManagement,
    /// `rc_admin_redaction`: redactions by server admins (the default is `rc_message`'s).
    AdminRedaction,
    /// `rc_federation`: requests each remote server may make of this one at once and per window
    /// (sleeps past 10 a second, refuses past 50, 3 at a time).
    Federation,
}

impl RateLimit {
    /// Every one: for a benchmark measuring throughput, where any limit would be what it measures.
    pub const ALL: &[RateLimit] = &[
        RateLimit::Message,
        RateLimit::Registration,
        RateLimit::LoginAddress,
        RateLimit::LoginAccount,
        RateLimit::LoginFailedAttempts,
        RateLimit::JoinsLocal,
        RateLimit::JoinsRemote,
        RateLimit::JoinsPerRoom,
        RateLimit::InvitesPerRoom,
        RateLimit::InvitesPerUser,
        RateLimit::InvitesPerIssuer,
        RateLimit::ThirdPartyInvite,
        RateLimit::RoomCreation,
        RateLimit::KeyRequests,
        RateLimit::ThreepidValidation,
        RateLimit::MediaCreate,
        RateLimit::Presence,
        RateLimit::DelayedEventManagement,
        RateLimit::AdminRedaction,
        RateLimit::Federation,
    ];

    /// Its setting in Synapse's config: the `rc_*` key and, for a part of one, the part's key.
    pub fn setting(self) -> (&'static str, Option<&'static str>) {
        use RateLimit::*;
        match self {
            Message => ("rc_message", None),
            Registration => ("rc_registration", None),
            LoginAddress => ("rc_login", Some("address")),
            LoginAccount => ("rc_login", Some("account")),
            LoginFailedAttempts => ("rc_login", Some("failed_attempts")),
            JoinsLocal => ("rc_joins", Some("local")),
            JoinsRemote => ("rc_joins", Some("remote")),
            JoinsPerRoom => ("rc_joins_per_room", None),
            InvitesPerRoom => ("rc_invites", Some("per_room")),
            InvitesPerUser => ("rc_invites", Some("per_user")),
            InvitesPerIssuer => ("rc_invites", Some("per_issuer")),
            ThirdPartyInvite => ("rc_third_party_invite", None),
            RoomCreation => ("rc_room_creation", None),
            KeyRequests => ("rc_key_requests", None),
            ThreepidValidation => ("rc_3pid_validation", None),
            MediaCreate => ("rc_media_create", None),
            Presence => ("rc_presence", Some("per_user")),
            DelayedEventManagement => ("rc_delayed_event_mgmt", None),
            AdminRedaction => ("rc_admin_redaction", None),
            Federation => ("rc_federation", None),
        }
    }
}

/// Synapse config (YAML, for [`SynapseOptions::extra`]) lifting `limits`, and only them: every
/// other rate limit keeps Synapse's default. Each use says why beside it: a test lifts a limit
/// only when it is about something else, and keeps the others.
pub fn lifted(limits: &[RateLimit]) -> String {
    const UNLIMITED: &str = "{per_second: 10000, burst_count: 100000}";
    const FEDERATION_UNLIMITED: &str =
        "{window_size: 1000, sleep_limit: 10000, sleep_delay: 100, reject_limit: 10000, concurrent: 100}";
    // Parts of one setting go together under its key: a key given twice would keep only the last.
    let mut settings: Vec<(&str, Vec<&str>)> = Vec::new();
    for limit in limits {
        let (key, part) = limit.setting();
        let i = settings.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
            settings.push((key, Vec::new()));
            settings.len() - 1
        });
        if let Some(part) = part
            && !settings[i].1.contains(&part)
        {
            settings[i].1.push(part);
        }
    }
    let mut yaml = String::new();
    for (key, parts) in settings {
        let value = if key == "rc_federation" {
            FEDERATION_UNLIMITED.to_owned()
        } else if parts.is_empty() {
            UNLIMITED.to_owned()
        } else {
            let parts: Vec<String> = parts.iter().map(|p| format!("{p}: {UNLIMITED}")).collect();
            format!("{{{}}}", parts.join(", "))
        };
        yaml.push_str(&format!("{key}: {value}\n"));
    }
    yaml
}

/// Synapse's default `ip_range_blacklist` without 127.0.0.0/8: it blocks federation to
/// loopback, and `ip_range_whitelist` is not consulted for IP-literal server names.
const IP_RANGE_BLOCKLIST: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

/// The federation listener and what federating on loopback needs; retries are fast so that a
/// stopped and restarted server catches up within seconds, not Synapse's minutes. Incoming
/// federation traffic keeps Synapse's default rate limit (`rc_federation`), as a real server does.
fn federation_yaml(f: &FederationListener) -> String {
    let blocklist: Vec<String> = IP_RANGE_BLOCKLIST.iter().map(|r| format!("{r:?}")).collect();
    format!(
        r#"  - port: {port}
    bind_addresses: ["{host}"]
    type: http
    tls: true
    x_forwarded: false
    resources: [{{names: [federation], compress: false}}]
tls_certificate_path: {certificate:?}
tls_private_key_path: {private_key:?}
federation_custom_ca_list: [{ca:?}]
ip_range_blacklist: [{blocklist}]
federation:
  max_long_retries: 1000
  max_long_retry_delay: 1s
  max_short_retry_delay: 1s
  destination_min_retry_interval: 1s
  destination_max_retry_interval: 2s
"#,
        host = f.host,
        port = f.port,
        certificate = f.certificate.display().to_string(),
        private_key = f.private_key.display().to_string(),
        ca = f.ca.display().to_string(),
        blocklist = blocklist.join(", "),
    )
}

/// A sandbox directory holding a handoff config (with registrations) and a Synapse that loaded them.
pub struct Sandbox {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub handoff_port: u16,
    pub synapse: Synapse,
}

impl Sandbox {
    /// Writes `bridge-config.yaml` (from the example, pointed at loopback), generates the
    /// registrations, and starts Synapse with them. `edit` may change the config text first.
    pub async fn create(dir: &Path, edit: impl FnOnce(String) -> String) -> Result<Sandbox> {
        Self::create_with(dir, edit, "").await
    }

    /// Like [`Sandbox::create`], with `homeserver_extra` (YAML) appended to Synapse's config.
    pub async fn create_with(
        dir: &Path,
        edit: impl FnOnce(String) -> String,
        homeserver_extra: &str,
    ) -> Result<Sandbox> {
        let options = SynapseOptions { extra: homeserver_extra.to_owned(), ..SynapseOptions::default() };
        Self::create_as(dir, edit, options).await
    }

    /// Like [`Sandbox::create`], with a Synapse started as `options` says; handoff's
    /// `homeserver.domain` (and the permission of its users) is `options.server_name`.
    pub async fn create_as(
        dir: &Path,
        edit: impl FnOnce(String) -> String,
        options: SynapseOptions,
    ) -> Result<Sandbox> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let handoff_port = free_port();
        let synapse_port_placeholder = "SYNAPSE_URL";
        let name = options.server_name.as_str();
        // A name with a port must be quoted in YAML; `localhost` stays as the tests' edits expect it.
        let domain = if name.contains(':') { format!("\"{name}\"") } else { name.to_owned() };
        let config = include_str!("../../bridge-config.yaml")
            .replace("address: http://127.0.0.1:8008", &format!("address: {synapse_port_placeholder}"))
            .replace("domain: example.org", &format!("domain: {domain}"))
            .replace("\"example.org\": user", &format!("\"{name}\": user"))
            .replace("http://127.0.0.1:29340", &format!("http://127.0.0.1:{handoff_port}"))
            .replace("port: 29340", &format!("port: {handoff_port}"));
        let config = edit(config);
        let config_path = dir.join("bridge-config.yaml");
        // Synapse's port is only known once it starts, and it must start with the registrations:
        // reserve the port now and write it in.
        let synapse_dir = dir.join("synapse");
        let port = free_port();
        let config = config.replace(synapse_port_placeholder, &format!("http://127.0.0.1:{port}"));
        std::fs::write(&config_path, config)?;
        registration::generate(&config_path)?;
        let files = [dir.join(registration::MAIN_FILE), dir.join(registration::ACTING_FILE)];
        let synapse = Synapse::start_as(&synapse_dir, port, &files, &options).await?;
        Ok(Sandbox { dir, config_path, handoff_port, synapse })
    }

    /// The bot's user ID, as handoff's config names it.
    pub fn bot_user_id(&self) -> Result<OwnedUserId> {
        Ok(crate::config::Config::load(&self.config_path)?.bot_user_id())
    }
}

impl Synapse {
    /// Like [`Synapse::start`], on a port chosen beforehand.
    pub async fn start_on(dir: &Path, port: u16, app_service_files: &[PathBuf]) -> Result<Synapse> {
        Self::start_configured(dir, port, app_service_files, "").await
    }

    /// Like [`Synapse::start_on`], with `extra` (YAML) appended to its config.
    pub async fn start_configured(
        dir: &Path,
        port: u16,
        app_service_files: &[PathBuf],
        extra: &str,
    ) -> Result<Synapse> {
        let options = SynapseOptions { extra: extra.to_owned(), ..SynapseOptions::default() };
        Self::start_as(dir, port, app_service_files, &options).await
    }

    /// Like [`Synapse::start_on`], started as `options` says (server name, federation).
    pub async fn start_as(
        dir: &Path,
        port: u16,
        app_service_files: &[PathBuf],
        options: &SynapseOptions,
    ) -> Result<Synapse> {
        let python = ensure_synapse_installed()?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let url = format!("http://127.0.0.1:{port}");
        let config_path = dir.join("homeserver.yaml");
        std::fs::write(&config_path, homeserver_yaml(&dir, port, app_service_files, options))?;
        // Off the runtime's thread: the two servers of a federation start side by side.
        let mut generate = tokio::process::Command::new(&python);
        generate.args(["-m", "synapse.app.homeserver", "-c"]).arg(&config_path).arg("--generate-keys");
        let out = generate.output().await.context("cannot generate Synapse's signing key")?;
        if !out.status.success() {
            bail!(
                "cannot generate Synapse's signing key: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let server_name = options.server_name.clone();
        let mut synapse = Synapse { child: None, python, dir, port, url, server_name };
        synapse.spawn()?;
        synapse.wait_until_up().await?;
        Ok(synapse)
    }
}

/// `handoff sandbox`: a Synapse with two test accounts and handoff serving it, until Ctrl-C.
pub async fn run_interactive(dir: Option<PathBuf>, on_postgres: bool) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("handoff-sandbox-{}", std::process::id())),
    };
    // `--postgres`: Synapse and handoff each with a database of one PostgreSQL, as deployed.
    let mut postgres = None;
    let sandbox = if on_postgres {
        std::fs::create_dir_all(&dir)?;
        let server = postgres::Postgres::start(&dir.join("postgres")).await?;
        let synapse_db = server.create_database("synapse").await?;
        let handoff_db = server.create_database("handoff").await?;
        let database = SynapseDatabase::Postgres { port: server.port, database: "synapse".into() };
        println!("  PostgreSQL on 127.0.0.1:{}: {synapse_db} (Synapse), {handoff_db} (handoff)", server.port);
        postgres = Some(server);
        let options = SynapseOptions { database, ..SynapseOptions::default() };
        let on_pg = |c: String| {
            c.replace(
                "database:\n    path: handoff.db",
                &format!("database:\n    type: postgres\n    path: handoff.db\n    uri: {handoff_db}"),
            )
        };
        Sandbox::create_as(&dir, on_pg, options).await?
    } else {
        Sandbox::create(&dir, |c| c).await?
    };
    let mut accounts = Vec::new();
    for name in ["alice", "bob"] {
        let (user, _) = sandbox.synapse.register_user(name, name, false).await?;
        accounts.push(user);
    }
    let bot = UserId::parse(format!("@handoff:{SERVER_NAME}"))?;
    println!();
    println!("Sandbox ready in {}", sandbox.dir.display());
    println!("  homeserver:  {} (server name {SERVER_NAME})", sandbox.synapse.url);
    for user in &accounts {
        println!("  account:     {user}  password: {}", user.localpart());
    }
    println!("  bot:         {bot}  (log in with any Matrix client, start a DM with it, send `help`)");
    println!("  config:      {}", sandbox.config_path.display());
    println!("Press Ctrl-C to stop.");
    println!();
    let config = crate::config::Config::load(&sandbox.config_path)?;
    anyhow::ensure!(
        postgres.is_none() || config.database.kind == crate::config::DatabaseType::Postgres,
        "the sandbox's config no longer has the `database:` section it points at PostgreSQL"
    );
    let served = crate::serve::run(config).await;
    drop(postgres);
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_synapse_keeps_the_default_rate_limits() {
        let yaml = homeserver_yaml(Path::new("/tmp/x"), 8008, &[], &SynapseOptions::default());
        assert!(!yaml.contains("rc_"), "{yaml}");
    }

    #[test]
    fn a_synapse_on_postgresql_is_given_its_database() {
        let database = SynapseDatabase::Postgres { port: 5433, database: "synapse_1".into() };
        let options = SynapseOptions { database, ..SynapseOptions::default() };
        let yaml = homeserver_yaml(Path::new("/tmp/x"), 8008, &[], &options);
        let parsed: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(
            parsed["database"],
            serde_json::json!({"name": "psycopg2", "args": {"user": "postgres", "host": "127.0.0.1", "port": 5433,
                "database": "synapse_1", "cp_min": 5, "cp_max": 10}})
        );
        let sqlite: serde_json::Value =
            serde_norway::from_str(&homeserver_yaml(Path::new("/tmp/x"), 8008, &[], &SynapseOptions::default()))
                .unwrap();
        assert_eq!(
            sqlite["database"],
            serde_json::json!({"name": "sqlite3", "args": {"database": "/tmp/x/homeserver.db"}})
        );
    }

    #[test]
    fn lifted_limits_are_the_named_ones_with_the_parts_of_one_setting_together() {
        use RateLimit::*;
        let yaml = lifted(&[Message, InvitesPerUser, JoinsLocal, InvitesPerRoom, InvitesPerUser]);
        let unlimited = "{per_second: 10000, burst_count: 100000}";
        assert_eq!(
            yaml,
            format!(
                "rc_message: {unlimited}\nrc_invites: {{per_user: {unlimited}, per_room: {unlimited}}}\nrc_joins: {{local: {unlimited}}}\n"
            )
        );
        let parsed: serde_json::Value = serde_norway::from_str(&lifted(RateLimit::ALL)).unwrap();
        let keys: std::collections::BTreeSet<&str> = RateLimit::ALL.iter().map(|l| l.setting().0).collect();
        assert_eq!(parsed.as_object().unwrap().len(), keys.len(), "one key per setting");
        assert_eq!(parsed["rc_login"].as_object().unwrap().len(), 3);
        assert_eq!(parsed["rc_federation"]["reject_limit"], 10000);
    }
}
