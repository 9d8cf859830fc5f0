//! The command line: the service's side (`serve`, `generate-registration`, `sandbox`, `inspect`)
//! and the device side ([`device`]: `login`, `logout`, `export`, `import`), which works as a
//! Matrix client of the person's own account.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

#[cfg(feature = "e2ee")]
mod device;

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
    /// Copy the embedded (sled) store into the PostgreSQL database the config names
    /// (`database.type: postgres`), which must be empty. Stop `handoff serve` first.
    CopyStore {
        /// The config file, naming the PostgreSQL database (and the store key, `<database.path>.key`).
        #[arg(short, long, default_value = "bridge-config.yaml")]
        config: PathBuf,
        /// The sled database to copy (default: `database.path`).
        #[arg(long)]
        from: Option<PathBuf>,
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
        /// Accept a file whose passphrase asks for more scrypt work than handoff's own (17), up to
        /// 22 (4 GiB of memory): for a file you made yourself on your own machine (`age -p`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=22))]
        max_work_factor: Option<u8>,
    },
    #[cfg(feature = "e2ee")]
    #[command(flatten)]
    Device(device::Command),
    /// Try handoff on this machine: set up a throwaway Synapse and run handoff against it.
    Sandbox {
        /// Where the sandbox keeps its homeserver, config and database (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Two federating Synapses (over TLS, on loopback), each with its own handoff.
        #[arg(long)]
        federated: bool,
        /// Synapse and handoff on PostgreSQL (one server started in the sandbox's folder), as
        /// homeservers are deployed; SQLite and sled otherwise.
        #[arg(long, conflicts_with = "federated")]
        postgres: bool,
    },
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config, 3 an import that finished
/// with rooms or settings it could not move (listed).
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
        Cmd::CopyStore { config, from } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            match runtime().block_on(copy_store(&config, from)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, e),
            }
        }
        Cmd::Inspect { file, passphrase_file, json, max_work_factor } => match inspect(
            &file,
            passphrase_file.as_deref(),
            json,
            &crate::bundle::file::Policy::device(max_work_factor),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, e),
        },
        #[cfg(feature = "e2ee")]
        Cmd::Device(command) => device::main(cli.data_dir, command),
        Cmd::Sandbox { dir, federated, postgres } => {
            let _ = init_logging("info", LogFormat::Pretty);
            let run = match federated {
                true => runtime().block_on(crate::sandbox::run_federated(dir)),
                false => runtime().block_on(crate::sandbox::run_interactive(dir, postgres)),
            };
            match run {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, e),
            }
        }
    }
}

/// `handoff copy-store`: the sled store into the config's PostgreSQL, every record as it is (sealed
/// with the same key), so transfers in progress resume there at the next `serve`.
async fn copy_store(config: &Config, from: Option<PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context;
    if config.database.kind != crate::config::DatabaseType::Postgres {
        anyhow::bail!(
            "set `database.type: postgres` and `database.uri` in the config first: that is where the store goes"
        );
    }
    let from = from.unwrap_or_else(|| config.database_path());
    // The destination seals with `<database.path>.key`: the source's key must be that one (checked
    // before anything is made).
    let (source_key, key) = (crate::store::key_path_for(&from), crate::store::key_path_for(&config.database_path()));
    let source_bytes =
        std::fs::read(&source_key).with_context(|| format!("cannot read the store key {}", source_key.display()))?;
    if std::fs::read(&key).ok() != Some(source_bytes) {
        anyhow::bail!(
            "{} and {} differ: the copy stays sealed with the source's key, so database.path must name the source's folder (or copy its .key file there)",
            source_key.display(),
            key.display()
        );
    }
    let source = crate::store::Store::open(&from)?;
    let to = crate::serve::open_store(config).await?;
    let copied = source.copy_into(&to).await.context("copying the store")?;
    for (tree, n) in copied {
        println!("{tree}: {n}");
    }
    println!(
        "Copied {} into PostgreSQL. Start `handoff serve -c` with this config: it resumes every transfer there.",
        from.display()
    );
    Ok(())
}

fn inspect(
    file: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
    json: bool,
    policy: &crate::bundle::file::Policy,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let passphrase = match passphrase_file {
        // The line, not its ending: a passphrase may start or end with a space.
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        None => rpassword::prompt_password("Transfer code or passphrase: ")
            .context("cannot ask for the passphrase (use --passphrase-file)")?,
    };
    let opened = crate::bundle::file::open_typed(&bytes, &passphrase, policy)
        .map_err(|e| crate::bundle::file::explain(e, file))?;
    let bundle = opened.bundle;
    if json {
        let mut bundle = bundle;
        // The file's owner may read it; a terminal, a log or a pasted issue should not.
        if let Some(token) = &mut bundle.login_token {
            token.token = crate::config::Secret::new("<redacted>".into());
        }
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
    println!("{}", bundle.summary().on_device());
    if !opened.dropped.is_empty() {
        println!("{}", crate::bundle::border::describe(&opened.dropped));
    }
    Ok(())
}

pub(crate) fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("handoff: error: {e:#}");
    ExitCode::from(code)
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A room's move nests deep futures (its seat, the budget's hold, deadlines, matrix-sdk's
        // requests): a debug build overflowed tokio's 2 MiB worker stack in a received move.
        .thread_stack_size(8 << 20)
        .build()
        .expect("tokio runtime")
}

/// matrix-sdk (the bot's device) logs every 404 it expects as an error, and a lot at info: quiet
/// unless the admin's filter names it.
const DEVICE_LOGS: &str =
    "matrix_sdk=warn,matrix_sdk_base=warn,matrix_sdk_crypto=warn,matrix_sdk_sqlite=warn,matrix_sdk::http_client=off";

pub(crate) fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
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
