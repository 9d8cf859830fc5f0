//! Two sandboxes, A and B, whose Synapses federate with each other over TLS on loopback: the test
//! bed for moves to an account on another homeserver. Server names are IP literals with the
//! federation port, each side on its own loopback address (`127.0.0.1:<port>` and
//! `127.0.0.2:<port>`: a server ACL tells them apart, as it matches hosts, not ports): no
//! `.well-known` or SRV lookup, nothing leaves the machine, and parallel runs don't collide.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ruma::{OwnedServerName, ServerName};

use super::{FederationListener, Sandbox, SynapseOptions, ensure_synapse_installed, free_port_on, run_command};

/// One of the two homeservers of a [`Federation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    /// The side's loopback address: its federation listens there, and its server name is it.
    pub fn host(self) -> std::net::Ipv4Addr {
        match self {
            Side::A => std::net::Ipv4Addr::new(127, 0, 0, 1),
            Side::B => std::net::Ipv4Addr::new(127, 0, 0, 2),
        }
    }

    /// `a` or `b`: the side's folder and file names.
    pub fn lowercase(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// The server names of both sides, known before either starts (a config may name the other side).
#[derive(Clone, Debug)]
pub struct FederationNames {
    pub a: OwnedServerName,
    pub b: OwnedServerName,
}

impl FederationNames {
    pub fn of(&self, side: Side) -> &ServerName {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
}

/// Two sandboxes whose Synapses federate. Dropping it stops both Synapses (each [`Sandbox`] owns
/// its own); the folder is the caller's.
pub struct Federation {
    pub a: Sandbox,
    pub b: Sandbox,
    /// The CA made for this run, the only one either server trusts for federation.
    pub ca: PathBuf,
}

impl Federation {
    /// Creates both sandboxes in `dir/a` and `dir/b` (certificates in `dir/tls`) and starts both
    /// Synapses side by side.
    pub async fn create(dir: &Path) -> Result<Federation> {
        Self::create_with(dir, |_, _, config| config, |_| String::new()).await
    }

    /// Like [`Federation::create`]; `edit` may change each side's handoff config text first,
    /// and `homeserver_extra` gives the YAML appended to each side's Synapse config (both keep
    /// Synapse's default rate limits unless it lifts some, see [`super::lifted`]).
    pub async fn create_with(
        dir: &Path,
        edit: impl Fn(Side, &FederationNames, String) -> String,
        homeserver_extra: impl Fn(Side) -> String,
    ) -> Result<Federation> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let port_a = free_port_on(Side::A.host());
        let port_b = free_port_on(Side::B.host());
        let name = |side: Side, port: u16| ServerName::parse(format!("{}:{port}", side.host())).expect("an IP literal");
        let names = FederationNames { a: name(Side::A, port_a), b: name(Side::B, port_b) };
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        make_certificates(&tls, &[Side::A, Side::B])?;
        let ca = tls.join("ca.pem");
        let options = |side: Side, port: u16| SynapseOptions {
            server_name: names.of(side).to_owned(),
            federation: Some(FederationListener {
                host: side.host().into(),
                port,
                certificate: tls.join(format!("{}.pem", side.lowercase())),
                private_key: tls.join(format!("{}.key", side.lowercase())),
                ca: ca.clone(),
            }),
            extra: homeserver_extra(side),
            ..SynapseOptions::default()
        };
        let (dir_a, dir_b) = (dir.join(Side::A.lowercase()), dir.join(Side::B.lowercase()));
        let (a, b) = tokio::try_join!(
            Sandbox::create_as(&dir_a, |c| edit(Side::A, &names, c), options(Side::A, port_a)),
            Sandbox::create_as(&dir_b, |c| edit(Side::B, &names, c), options(Side::B, port_b)),
        )?;
        Ok(Federation { a, b, ca })
    }

    pub fn names(&self) -> FederationNames {
        FederationNames { a: self.a.synapse.server_name.clone(), b: self.b.synapse.server_name.clone() }
    }

    pub fn side(&self, side: Side) -> &Sandbox {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    pub fn side_mut(&mut self, side: Side) -> &mut Sandbox {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }
}

/// Writes a throwaway CA (`ca.pem`; its key is never written) and, for each side, a certificate
/// `<side>.pem` + `<side>.key` for the side's IP, with Synapse's venv Python: its `cryptography`
/// package is there wherever Synapse is, `openssl` may not be.
fn make_certificates(out: &Path, sides: &[Side]) -> Result<()> {
    let python = ensure_synapse_installed()?;
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(CERTIFICATES_PY).arg(out);
    for side in sides {
        cmd.arg(format!("{}={}", side.lowercase(), side.host()));
    }
    run_command(&mut cmd, "make the federation's TLS certificates")
}

const CERTIFICATES_PY: &str = r#"
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

out, servers = sys.argv[1], sys.argv[2:]
now = datetime.datetime.now(datetime.timezone.utc)
valid_from, valid_to = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)

def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)

def write(path, data):
    with open(path, "wb") as f:
        f.write(data)

ca_key = key()
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handoff sandbox federation CA")])
ca = (
    x509.CertificateBuilder()
    .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
    .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_to)
    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False), critical=True)
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
    .sign(ca_key, hashes.SHA256())
)
write(f"{out}/ca.pem", ca.public_bytes(serialization.Encoding.PEM))

for server in servers:
    server, ip = server.split("=")
    k = key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name).public_key(k.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write(f"{out}/{server}.pem", cert.public_bytes(serialization.Encoding.PEM))
    write(f"{out}/{server}.key", k.private_bytes(serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
"#;

/// `handoff sandbox --federated`: two federating Synapses, two accounts on each, and a handoff
/// serving each (two `handoff serve` children of this executable: each has its own log, and
/// nothing process-wide is shared between them), until Ctrl-C.
pub async fn run_federated(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("handoff-federation-{}", std::process::id())),
    };
    let federation = Federation::create(&dir).await?;
    let exe = std::env::current_exe().context("cannot find the handoff executable")?;
    let mut children = Children(Vec::new());
    for side in [Side::A, Side::B] {
        let sandbox = federation.side(side);
        let log_path = sandbox.dir.join("handoff.log");
        let log = std::fs::File::options().create(true).append(true).open(&log_path)?;
        let child = Command::new(&exe)
            .args(["serve", "-c"])
            .arg(&sandbox.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start handoff serve")?;
        children.0.push((side, child, log_path));
    }
    let mut accounts = Vec::new();
    for side in [Side::A, Side::B] {
        for name in ["alice", "bob"] {
            let (user, _) = federation.side(side).synapse.register_user(name, name, false).await?;
            accounts.push((side, user));
        }
    }
    for (i, side) in [Side::A, Side::B].into_iter().enumerate() {
        children.wait_healthy(i, federation.side(side).handoff_port).await?;
    }
    println!();
    println!("Federated sandbox ready in {} (TLS CA {})", dir.display(), federation.ca.display());
    for (side, _, log) in &children.0 {
        let sandbox = federation.side(*side);
        println!("{side:?}:");
        println!("  homeserver:  {} (server name {})", sandbox.synapse.url, sandbox.synapse.server_name);
        for (_, user) in accounts.iter().filter(|(s, _)| s == side) {
            println!("  account:     {user}  password: {}", user.localpart());
        }
        println!("  bot:         {}", sandbox.bot_user_id()?);
        println!("  config:      {}", sandbox.config_path.display());
        println!("  handoff log: {}", log.display());
    }
    println!("Log in with any Matrix client, start a DM with a bot of the same server, send `help`.");
    println!("Press Ctrl-C to stop.");
    println!();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        exited = children.first_exit() => {
            let (side, status, log) = exited?;
            bail!("handoff of side {side:?} exited ({status}); see {}", log.display());
        }
    }
    children.interrupt();
    children.wait_all(Duration::from_secs(15)).await;
    Ok(())
}

/// The `handoff serve` children; those still running when dropped are killed.
struct Children(Vec<(Side, Child, PathBuf)>);

impl Children {
    async fn wait_healthy(&mut self, i: usize, port: u16) -> Result<()> {
        let health = format!("http://127.0.0.1:{port}/health");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(r) = reqwest::get(&health).await
                && r.status().is_success()
            {
                return Ok(());
            }
            let (side, child, log) = &mut self.0[i];
            if let Some(status) = child.try_wait()? {
                bail!("handoff of side {side:?} exited ({status}) at start-up; see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("handoff of side {side:?} not healthy within 90 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn first_exit(&mut self) -> Result<(Side, std::process::ExitStatus, PathBuf)> {
        loop {
            for (side, child, log) in &mut self.0 {
                if let Some(status) = child.try_wait()? {
                    return Ok((*side, status, log.clone()));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A Ctrl-C in a terminal reaches them too, a SIGINT sent to this process alone does not:
    /// tell them, so that they stop as they do on Ctrl-C (a killed one is killed at the drop).
    fn interrupt(&self) {
        for (_, child, _) in &self.0 {
            let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).stderr(Stdio::null()).status();
        }
    }

    async fn wait_all(&mut self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if self.0.iter_mut().all(|(_, c, _)| matches!(c.try_wait(), Ok(Some(_)) | Err(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
