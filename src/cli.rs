//! The command line: the service's side (`serve`, `generate-registration`, `sandbox`, `inspect`)
//! and the device side (`login`, `logout`, `export`), which works as a Matrix client of the
//! person's own account.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "e2ee")]
use ruma::OwnedUserId;

#[cfg(feature = "e2ee")]
use crate::bundle::Only;
use crate::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "handoff",
    version,
    about = "Move your Matrix rooms, DMs, contacts, preferences and keys to another client or account."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Where the device side keeps its sessions (default: $HANDOFF_DATA_DIR, else
    /// $XDG_DATA_HOME/handoff, else ~/.local/share/handoff).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the appservice: the bot, the transfer engine and the HTTP endpoints the homeserver calls.
    Serve {
        /// The config file.
        #[arg(short, long, default_value = "bridge-config.yaml")]
        config: PathBuf,
    },
    /// Fill `generate` tokens in the config and write the two registration files beside it.
    GenerateRegistration {
        /// The config file.
        #[arg(short, long, default_value = "bridge-config.yaml")]
        config: PathBuf,
    },
    /// Show what a bundle file holds (asks for the transfer code or passphrase).
    Inspect {
        /// The bundle file (`.age`), as the bot sent it with `export --file`.
        file: PathBuf,
        /// Read the code or passphrase from this file instead of asking.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Print the whole bundle as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Log in to your account from this device; the session is kept for the next commands.
    #[cfg(feature = "e2ee")]
    Login {
        /// Your Matrix ID, e.g. @you:example.org.
        user: OwnedUserId,
        /// The homeserver's address, when its server name does not lead to it (`.well-known`).
        #[arg(long)]
        homeserver: Option<String>,
        /// Read the password (or, with --access-token, the token) from stdin instead of asking.
        #[arg(long)]
        password_stdin: bool,
        /// Log in with an access token from another client instead of a password.
        #[arg(long)]
        access_token: bool,
    },
    /// End the session kept on this device (its device is deleted from the account).
    #[cfg(feature = "e2ee")]
    Logout {
        /// The account (needed when more than one is logged in here).
        user: Option<OwnedUserId>,
    },
    /// Capture your account (logged in with `login`) into a bundle file encrypted with a passphrase.
    #[cfg(feature = "e2ee")]
    Export {
        /// The bundle file to write (never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The account to export (needed when more than one is logged in here).
        #[arg(long = "as")]
        as_user: Option<OwnedUserId>,
        /// Only part of the account: favourites, dms or rooms.
        #[arg(long)]
        only: Option<Only>,
        /// Also copy the last N messages of each room.
        #[arg(long, default_value_t = 0)]
        history: usize,
        /// An Element key-export file (Settings → Security → Export E2E room keys) to carry in the
        /// bundle, still encrypted with its own passphrase.
        #[arg(long)]
        room_keys: Option<PathBuf>,
        /// Read the bundle's passphrase from this file instead of asking (twice).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Try handoff on this machine: set up a throwaway Synapse and run handoff against it.
    Sandbox {
        /// Where the sandbox keeps its homeserver, config and database (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Two federating Synapses (over TLS, on loopback), each with its own handoff.
        #[arg(long)]
        federated: bool,
    },
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            if let Err(e) = config.check_ready_to_serve() {
                return fail(2, e);
            }
            if let Err(e) = init_logging(&config.logging.level, config.logging.format) {
                return fail(2, e);
            }
            match runtime().block_on(crate::serve::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    fail(1, e)
                }
            }
        }
        Cmd::GenerateRegistration { config } => match crate::registration::generate(&config) {
            Ok(g) => {
                if g.tokens_generated > 0 {
                    println!("Wrote {} new tokens into {}", g.tokens_generated, config.display());
                }
                println!("Wrote {}", g.main.display());
                println!("Wrote {}", g.acting.display());
                println!(
                    "Add both files to app_service_config_files in the homeserver config, restart the homeserver, then run: handoff serve -c {}",
                    config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(2, e),
        },
        Cmd::Inspect { file, passphrase_file, json } => match inspect(&file, passphrase_file.as_deref(), json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, e),
        },
        #[cfg(feature = "e2ee")]
        Cmd::Login { user, homeserver, password_stdin, access_token } => {
            let _ = init_logging("warn", LogFormat::Pretty);
            device_side(login(cli.data_dir, &user, homeserver.as_deref(), password_stdin, access_token))
        }
        #[cfg(feature = "e2ee")]
        Cmd::Logout { user } => {
            let _ = init_logging("warn", LogFormat::Pretty);
            device_side(async move {
                let data = crate::session::data_dir(cli.data_dir)?;
                let user = crate::session::Session::logout(&data, user.as_deref()).await?;
                println!("Logged {user} out; its session is removed from this device.");
                Ok(())
            })
        }
        #[cfg(feature = "e2ee")]
        Cmd::Export { out, as_user, only, history, room_keys, passphrase_file } => {
            let _ = init_logging("warn", LogFormat::Pretty);
            device_side(async move {
                let data = crate::session::data_dir(cli.data_dir)?;
                // A wrong key file fails before anything else is asked or read.
                let room_keys = room_keys.as_deref().map(crate::local::read_room_keys).transpose()?;
                let options = crate::local::ExportOptions { only, history, room_keys };
                export(&data, as_user.as_deref(), &out, &options, passphrase_file.as_deref()).await
            })
        }
        Cmd::Sandbox { dir, federated } => {
            let _ = init_logging("info", LogFormat::Pretty);
            let run = match federated {
                true => runtime().block_on(crate::sandbox::run_federated(dir)),
                false => runtime().block_on(crate::sandbox::run_interactive(dir)),
            };
            match run {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, e),
            }
        }
    }
}

/// Runs a device-side command: its error is one line, exit code 1.
#[cfg(feature = "e2ee")]
fn device_side(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    match runtime().block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, e),
    }
}

#[cfg(feature = "e2ee")]
async fn login(
    data_dir: Option<PathBuf>,
    user: &ruma::UserId,
    homeserver: Option<&str>,
    from_stdin: bool,
    access_token: bool,
) -> anyhow::Result<()> {
    use crate::session::{Credential, Session};
    let data = crate::session::data_dir(data_dir)?;
    let what = if access_token { "Access token" } else { "Password" };
    let secret = if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        rpassword::prompt_password(format!("{what} for {user}: "))
            .map_err(|e| anyhow::anyhow!("cannot ask for the {} ({e}): use --password-stdin", what.to_lowercase()))?
    };
    anyhow::ensure!(!secret.is_empty(), "no {} given", what.to_lowercase());
    let secret = crate::config::Secret::new(secret);
    let credential = if access_token { Credential::AccessToken(secret) } else { Credential::Password(secret) };
    let session = Session::login(&data, user, homeserver, credential).await?;
    println!(
        "Logged in as {} on {} (device {}); the session is kept in {}.",
        session.user_id,
        session.homeserver,
        session.device_id,
        data.display()
    );
    Ok(())
}

#[cfg(feature = "e2ee")]
async fn export(
    data: &std::path::Path,
    user: Option<&ruma::UserId>,
    out: &std::path::Path,
    options: &crate::local::ExportOptions,
    passphrase_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    anyhow::ensure!(!out.exists(), "{} exists already: choose another --out", out.display());
    let passphrase = match passphrase_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        None => {
            let first = rpassword::prompt_password("Passphrase for the bundle file: ")
                .context("cannot ask for the passphrase (use --passphrase-file)")?;
            let again = rpassword::prompt_password("The same passphrase again: ")?;
            anyhow::ensure!(first == again, "the two passphrases differ; nothing was written");
            first
        }
    };
    anyhow::ensure!(passphrase.chars().count() >= 8, "the passphrase is too short: use at least 8 characters");
    let session = crate::session::Session::open(data, user).await?;
    let exported = crate::local::export(&session, options).await?;
    let sealed = crate::bundle::file::seal(&exported.bundle, &passphrase);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    file.write_all(&sealed).and_then(|_| file.sync_all()).with_context(|| format!("cannot write {}", out.display()))?;
    println!("Wrote the bundle of {} to {}, encrypted with your passphrase.", session.user_id, out.display());
    println!("{}", exported.bundle.summary());
    if exported.bundle.room_keys.is_some() {
        println!("Your key export travels inside it, still encrypted with its own passphrase.");
    }
    Ok(())
}

fn inspect(file: &std::path::Path, passphrase_file: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let passphrase = match passphrase_file {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => rpassword::prompt_password("Transfer code or passphrase: ")
            .context("cannot ask for the passphrase (use --passphrase-file)")?,
    };
    // A transfer code may be typed in any case and spacing; a passphrase is used as it is.
    let attempt = |p: &str| crate::bundle::file::open(&bytes, p);
    let bundle = match crate::code::TransferCode::parse(&passphrase) {
        Ok(code) => attempt(&code.display()).or_else(|_| attempt(&passphrase)),
        Err(_) => attempt(&passphrase),
    }
    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if json {
        let value: serde_json::Value = serde_json::from_slice(&bundle.to_json())?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let s = &bundle.source;
    println!(
        "Bundle of {} from {} ({}), made {} by {}",
        s.user_id,
        s.server_name,
        s.homeserver_url,
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(s.exported_at.get().into())
        ),
        s.client
    );
    println!("{}", bundle.summary());
    Ok(())
}

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("handoff: error: {e:#}");
    ExitCode::from(code)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

/// matrix-sdk (the bot's device) logs every 404 it expects as an error, and a lot at info: quiet
/// unless the admin's filter names it.
const DEVICE_LOGS: &str =
    "matrix_sdk=warn,matrix_sdk_base=warn,matrix_sdk_crypto=warn,matrix_sdk_sqlite=warn,matrix_sdk::http_client=off";

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = if level.contains("matrix_sdk") {
        tracing_subscriber::EnvFilter::try_new(level)?
    } else {
        tracing_subscriber::EnvFilter::try_new(format!("{level},{DEVICE_LOGS}"))?
    };
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, not in log files or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    // A panic's message can quote what it was working on (a command with a code, a file's
    // content): the log gets where it happened, never the message.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(%location, "a task panicked (its message is withheld: it may quote user data); the service goes on");
    }));
    Ok(())
}
