//! The device side's commands: `login`, `logout`, `export`, `import`, `undo`. Each works as a Matrix
//! client of the person's own account ([`Session`]); its error is one line and exit code 1.
//!
//! Secrets (passwords, passphrases, tokens, recovery keys) are asked without echo at a terminal,
//! or read from a file the flag names, or (where said) one line of stdin; never from the command
//! line itself, where other users of the machine could read them.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use ruma::{OwnedUserId, UserId};

use super::{fail, init_logging, runtime};
use crate::bundle::{Bundle, Only};
use crate::client::import::{Import, ImportOptions, ImportReport, Progress, RoomOutcome, RoomResult};
use crate::client::pace::{Joins, TimeLeft};
use crate::client::session::{self, Credential, Session};
use crate::client::undo::DeviceUndo;
use crate::client::{self, ExportOptions, room_keys};
use crate::config::{LogFormat, Secret};
use crate::homeserver::RateLimited;
use crate::transfer::UndoRoom;
use crate::transfer::plan::Requirements;
use crate::transfer::undo::{Kept, RoomUndo};

/// An import that finished with rooms or settings it could not move.
const INCOMPLETE: u8 = 3;

#[derive(Subcommand)]
pub enum Command {
    /// Log in to your account from this device; the session is kept for the next commands.
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
    Logout {
        /// The account (needed when more than one is logged in here).
        user: Option<OwnedUserId>,
    },
    /// Capture your account (logged in with `login`) into a bundle file encrypted with a passphrase.
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
        #[arg(long, conflicts_with = "recovery_key")]
        room_keys: Option<PathBuf>,
        /// Carry every key of the account's key backup, unlocked with its recovery key (asked, or
        /// read from FILE with --recovery-key=FILE).
        #[arg(long, num_args = 0..=1, require_equals = true, value_name = "FILE")]
        recovery_key: Option<Option<PathBuf>>,
        /// Put a single-use login token in the bundle: `handoff import` on a new device then
        /// logs in to this same account without the password. The homeserver may ask for the
        /// password once, here.
        #[arg(long)]
        login_token: bool,
        /// Read the password that --login-token may need from stdin.
        #[arg(long, requires = "login_token")]
        password_stdin: bool,
        /// Read the bundle's passphrase from this file instead of asking (twice).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Apply a bundle file to the account logged in here: rejoin its rooms, carry tags, DMs,
    /// settings, profile and room keys.
    #[command(
        after_help = "Exit codes: 0 everything moved; 1 an error (see the message; running the same import again \
        picks up where it stopped); 2 bad usage; 3 finished, but some rooms or settings were not moved (listed)."
    )]
    Import {
        /// The bundle file, from `handoff export --out` or the bot's `export --file`.
        file: PathBuf,
        /// The account to import into (needed when more than one is logged in here).
        #[arg(long = "as")]
        as_user: Option<OwnedUserId>,
        /// Read the bundle's passphrase (or transfer code) from this file instead of asking.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// The homeserver of the bundle's account, when its server name does not lead to it
        /// (`.well-known`): its login token, its password and --old-access-token go there only.
        #[arg(long)]
        homeserver: Option<String>,
        /// Read the password, when the bundle's login token is refused, from stdin instead of asking.
        #[arg(long)]
        password_stdin: bool,
        /// Only part of the bundle: favourites, dms or rooms.
        #[arg(long)]
        only: Option<Only>,
        /// At most this many rooms (highest priority first).
        #[arg(long)]
        max_rooms: Option<usize>,
        /// Set the old account's display name and avatar even where this account has its own
        /// (without it, its own are kept and the report says so).
        #[arg(long)]
        profile_from_old: bool,
        /// Show the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Post no move notice in the rooms.
        #[arg(long)]
        no_notify: bool,
        /// The old account is logged in here too (`handoff login @old:server`): it invites the
        /// new one into rooms that need an invite, and carries its rank.
        #[arg(long, conflicts_with = "old_access_token")]
        old: Option<OwnedUserId>,
        /// The same with the old account's access token (asked, or read from FILE with
        /// --old-access-token=FILE).
        #[arg(long, num_args = 0..=1, require_equals = true, value_name = "FILE")]
        old_access_token: Option<Option<PathBuf>>,
        /// Also put the room keys into the new account's key backup, unlocked with its recovery
        /// key (asked, or read from FILE with --recovery-key=FILE), so its other devices get them.
        #[arg(long, num_args = 0..=1, require_equals = true, value_name = "FILE")]
        recovery_key: Option<Option<PathBuf>>,
        /// The passphrase of an Element key export carried in the bundle (asked when needed).
        #[arg(long)]
        room_keys_passphrase_file: Option<PathBuf>,
        /// Print the report (or, with --dry-run, the plan) as JSON on stdout, and no progress.
        #[arg(long)]
        json: bool,
        /// Accept a file whose passphrase asks for more scrypt work than handoff's own (17), up to
        /// 22 (4 GiB of memory): for a file you made yourself on your own machine (`age -p`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=22))]
        max_work_factor: Option<u8>,
    },
    /// Take back the last `handoff import` into an account logged in here: leave the rooms it
    /// joined (its tags taken off, its notices redacted, the rank it gave lowered first) and put
    /// back the settings it changed, each only where it still holds what the import wrote.
    #[command(after_help = "Exit codes: 0 undone; 1 an error (run it again: it goes on where it stopped); \
        3 finished, but some rooms could not be left (listed: run it again to retry them).")]
    Undo {
        /// The account imported into (needed when more than one is logged in here).
        #[arg(long = "as")]
        as_user: Option<OwnedUserId>,
        /// Show what would change, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also leave the rooms the account wrote in since the import.
        #[arg(long)]
        all: bool,
        /// The old account is logged in here too: where the new account may not lower the rank the
        /// import gave it, the old one takes it back.
        #[arg(long)]
        old: Option<OwnedUserId>,
        /// Print what would change (with --dry-run) or what was done as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub fn main(data_dir: Option<PathBuf>, command: Command) -> ExitCode {
    // HANDOFF_LOG: a log filter for the device side (`debug` times each stage of an import).
    let level = std::env::var("HANDOFF_LOG").unwrap_or_else(|_| "warn".into());
    let _ = init_logging(&level, LogFormat::Pretty);
    let work = async move {
        let data = session::data_dir(data_dir)?;
        match command {
            Command::Login { user, homeserver, password_stdin, access_token } => {
                login(&data, &user, homeserver.as_deref(), password_stdin, access_token).await
            }
            Command::Logout { user } => {
                let user = Session::logout(&data, user.as_deref()).await?;
                println!("Logged {user} out; its session is removed from this device.");
                Ok(ExitCode::SUCCESS)
            }
            Command::Export {
                out,
                as_user,
                only,
                history,
                room_keys,
                recovery_key,
                login_token,
                password_stdin,
                passphrase_file,
            } => {
                let export = Export {
                    out,
                    as_user,
                    options: ExportOptions { only, history, room_keys: None },
                    room_keys,
                    recovery_key,
                    login_token,
                    password_stdin,
                    passphrase_file,
                };
                export.run(&data).await
            }
            Command::Import {
                file,
                as_user,
                passphrase_file,
                homeserver,
                password_stdin,
                only,
                max_rooms,
                profile_from_old,
                dry_run,
                no_notify,
                old,
                old_access_token,
                recovery_key,
                room_keys_passphrase_file,
                json,
                max_work_factor,
            } => {
                let import = ImportCmd {
                    policy: crate::bundle::file::Policy::device(max_work_factor),
                    file,
                    as_user,
                    passphrase_file,
                    homeserver,
                    password_stdin,
                    requirements: Requirements { only, max_rooms, history: 0, profile_from_old },
                    dry_run,
                    notify: !no_notify,
                    old,
                    old_access_token,
                    recovery_key,
                    room_keys_passphrase_file,
                    json,
                };
                import.run(&data).await
            }
            Command::Undo { as_user, dry_run, all, old, json } => {
                undo(&data, as_user.as_deref(), dry_run, all, old.as_deref(), json).await
            }
        }
    };
    match runtime().block_on(work) {
        Ok(code) => code,
        Err(e) => fail(1, e),
    }
}

/// A secret: from `file` when given, else asked without echo at a terminal, else (with
/// `stdin_ok`) one line of stdin. `how` is the flag that gives it without a terminal, named when
/// it cannot be asked.
fn secret(prompt: &str, file: Option<&Path>, stdin_ok: bool, how: &str) -> Result<Secret> {
    let value = match file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        None if std::io::stdin().is_terminal() || !stdin_ok => rpassword::prompt_password(prompt)
            .map_err(|e| anyhow::anyhow!("cannot ask for the {} (not a terminal? {e}): use {how}", what(prompt)))?,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line
        }
    };
    let value = value.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(!value.is_empty(), "nothing given for the {}", what(prompt));
    Ok(Secret::new(value))
}

/// What a prompt asks for, within a sentence: "Recovery key of @a:b: " → "recovery key of @a:b".
fn what(prompt: &str) -> String {
    let prompt = prompt.trim_end_matches(": ");
    let mut chars = prompt.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "secret".to_owned(),
    }
}

/// `--flag[=FILE]`: `None` not given, `Some(None)` ask, `Some(Some(file))` read it. `flag` is its
/// name, for the error when it cannot be asked.
fn optional_secret(value: &Option<Option<PathBuf>>, prompt: &str, flag: &str) -> Result<Option<Secret>> {
    let how = format!("{flag}=FILE");
    value.as_ref().map(|file| secret(prompt, file.as_deref(), false, &how)).transpose()
}

async fn login(
    data: &Path,
    user: &UserId,
    homeserver: Option<&str>,
    from_stdin: bool,
    access_token: bool,
) -> Result<ExitCode> {
    let what = if access_token { "Access token" } else { "Password" };
    let value = if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        rpassword::prompt_password(format!("{what} for {user}: "))
            .map_err(|e| anyhow::anyhow!("cannot ask for the {} ({e}): use --password-stdin", what.to_lowercase()))?
    };
    anyhow::ensure!(!value.is_empty(), "no {} given", what.to_lowercase());
    let value = Secret::new(value);
    let credential = if access_token { Credential::AccessToken(value) } else { Credential::Password(value) };
    let session = Session::login(data, user, homeserver, credential).await?;
    println!(
        "Logged in as {} on {} (device {}); the session is kept in {}.",
        session.user_id,
        session.homeserver,
        session.device_id,
        data.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The bundle's passphrase, asked twice, or read from a file.
fn new_passphrase(file: Option<&Path>) -> Result<Secret> {
    let passphrase = match file {
        Some(_) => secret("", file, false, "--passphrase-file")?,
        None => {
            let how = "--passphrase-file FILE";
            let first = secret("Passphrase for the bundle file: ", None, false, how)?;
            let again = secret("The same passphrase again: ", None, false, how)?;
            anyhow::ensure!(first == again, "the two passphrases differ; nothing was written");
            first
        }
    };
    anyhow::ensure!(passphrase.expose().chars().count() >= 8, "the passphrase is too short: use at least 8 characters");
    Ok(passphrase)
}

struct Export {
    out: PathBuf,
    as_user: Option<OwnedUserId>,
    options: ExportOptions,
    room_keys: Option<PathBuf>,
    recovery_key: Option<Option<PathBuf>>,
    login_token: bool,
    password_stdin: bool,
    passphrase_file: Option<PathBuf>,
}

impl Export {
    async fn run(mut self, data: &Path) -> Result<ExitCode> {
        let out = &self.out;
        anyhow::ensure!(!out.exists(), "{} exists already: choose another --out", out.display());
        // What can be wrong with the input fails before anything is asked or read.
        self.options.room_keys = self.room_keys.as_deref().map(client::read_room_keys).transpose()?;
        let passphrase = new_passphrase(self.passphrase_file.as_deref())?;
        let recovery_key = optional_secret(&self.recovery_key, "Recovery key: ", "--recovery-key")?;
        let session = Session::open(data, self.as_user.as_deref()).await?;
        let mut keys_from_backup = None;
        if let Some(key) = &recovery_key {
            room_keys::recover(&session, key).await?;
        }
        let mut exported = client::export(&session, &self.options).await?;
        if recovery_key.is_some() {
            let rooms = exported.bundle.rooms.iter().filter(|r| r.encrypted).map(|r| r.room_id.as_ref());
            let (mut export, count) = room_keys::from_backup(&session, rooms, &passphrase).await?;
            export.bundle_passphrase = true;
            exported.bundle.room_keys = Some(export);
            keys_from_backup = Some(count);
        }
        if self.login_token {
            let stdin = self.password_stdin;
            let prompt = format!("Password for {}: ", session.user_id);
            let token = session.login_token(|| secret(&prompt, None, stdin, "--password-stdin")).await?;
            exported.bundle.login_token = Some(token);
        }
        let sealed = crate::bundle::file::seal_with_passphrase(&exported.bundle, passphrase.expose());
        // Written whole beside it, then put in place only if nothing is there (never overwriting,
        // never leaving half a file).
        let mut file = crate::registration::private_file_beside(out)?;
        file.write_all(&sealed)
            .and_then(|_| file.as_file().sync_all())
            .with_context(|| format!("cannot write {}", out.display()))?;
        file.persist_noclobber(out).map_err(|e| anyhow::anyhow!("cannot create {}: {}", out.display(), e.error))?;
        println!("Wrote the bundle of {} to {}, encrypted with your passphrase.", session.user_id, out.display());
        println!("{}", exported.bundle.summary().on_device());
        match keys_from_backup {
            Some(n) => {
                println!("{n} room key(s) from your key backup travel inside it, encrypted with the same passphrase.")
            }
            None if exported.bundle.room_keys.is_some() => {
                println!("Your key export travels inside it, still encrypted with its own passphrase.")
            }
            None => {}
        }
        if let Some(token) = &exported.bundle.login_token {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(token.expires_at.get().into());
            println!(
                "A single-use login token is inside, valid until {}: run `handoff import` on the new device before then.",
                humantime::format_rfc3339_seconds(at)
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

struct ImportCmd {
    file: PathBuf,
    as_user: Option<OwnedUserId>,
    passphrase_file: Option<PathBuf>,
    homeserver: Option<String>,
    password_stdin: bool,
    requirements: Requirements,
    dry_run: bool,
    notify: bool,
    old: Option<OwnedUserId>,
    old_access_token: Option<Option<PathBuf>>,
    recovery_key: Option<Option<PathBuf>>,
    room_keys_passphrase_file: Option<PathBuf>,
    json: bool,
    policy: crate::bundle::file::Policy,
}

impl ImportCmd {
    async fn run(self, data: &Path) -> Result<ExitCode> {
        let started = std::time::Instant::now();
        let bytes = std::fs::read(&self.file).with_context(|| format!("cannot read {}", self.file.display()))?;
        let passphrase =
            secret("Passphrase (or transfer code) of the bundle: ", self.passphrase_file.as_deref(), false, {
                "--passphrase-file FILE"
            })?;
        let opened = crate::bundle::file::open_typed(&bytes, passphrase.expose(), &self.policy)
            .map_err(|e| crate::bundle::file::explain(e, &self.file))?;
        // Said before the plan and the moves, so the dry run and the real one both say it.
        if !opened.dropped.is_empty() {
            eprintln!("{}", crate::bundle::border::describe(&opened.dropped));
        }
        let bundle = opened.bundle;
        let session = self.session(data, &bundle).await?;
        let old = match (&self.old, &self.old_access_token) {
            (Some(user), _) => {
                anyhow::ensure!(
                    *user == bundle.source.user_id,
                    "the bundle is {}'s, not {user}'s: name its account with --old",
                    bundle.source.user_id
                );
                Some(client::import::old_from_session(&Session::open(data, Some(user)).await?).await?)
            }
            (None, Some(file)) => {
                let old_user = &bundle.source.user_id;
                let how = "--old-access-token=FILE";
                let token = secret(&format!("Access token of {old_user}: "), file.as_deref(), false, how)?;
                let address = bundle_homeserver(&bundle, self.homeserver.as_deref()).await?;
                Some(client::import::old_from_token(old_user, address.as_str().trim_end_matches('/'), &token).await?)
            }
            (None, None) => None,
        };
        let recovery_key =
            optional_secret(&self.recovery_key, &format!("Recovery key of {}: ", session.user_id), "--recovery-key")?;
        let mut key_passphrases = Vec::new();
        if let Some(keys) = &bundle.room_keys
            && !self.dry_run
        {
            if keys.bundle_passphrase {
                key_passphrases.push(passphrase.clone());
            } else {
                let prompt = "Passphrase of the key export in the bundle: ";
                let how = "--room-keys-passphrase-file FILE";
                key_passphrases.push(secret(prompt, self.room_keys_passphrase_file.as_deref(), false, how)?);
            }
        }
        let options = ImportOptions {
            requirements: self.requirements.clone(),
            notify: self.notify,
            old,
            recovery_key,
            key_passphrases,
        };
        tracing::debug!(ms = started.elapsed().as_millis(), "the bundle opened and the sessions ready");
        let import = Import::new(&session, &bundle, options).await?;
        let plan = import.plan().await?;
        tracing::debug!(ms = started.elapsed().as_millis(), "planned");
        if self.dry_run {
            if self.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.table());
                println!(
                    "{}",
                    crate::wording::joins_at_defaults(&Joins::of(&plan, &session.user_id), &session.user_id)
                );
                println!("Nothing was changed (--dry-run).");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let progress = Bar::new(!self.json && std::io::stderr().is_terminal());
        let report = import.run(&plan, &progress).await?;
        progress.done();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report);
        }
        Ok(if report.complete() { ExitCode::SUCCESS } else { ExitCode::from(INCOMPLETE) })
    }

    /// The session to import into: the one named or kept here, or, for a bundle that carries a
    /// login token of an account not logged in here, a new session of that account made with it.
    async fn session(&self, data: &Path, bundle: &Bundle) -> Result<Session> {
        let owner = &bundle.source.user_id;
        let Some(token) = &bundle.login_token else {
            return Session::open(data, self.as_user.as_deref()).await;
        };
        if self.as_user.as_ref().is_some_and(|u| u != owner) || Session::exists(data, owner) {
            return Session::open(data, self.as_user.as_deref()).await;
        }
        let address = bundle_homeserver(bundle, self.homeserver.as_deref()).await?;
        let address = Some(address.as_str());
        match Session::login(data, owner, address, Credential::LoginToken(token.token.clone())).await {
            Ok(session) => {
                eprintln!("Logged in as {owner} on this device with the bundle's login token.");
                Ok(session)
            }
            Err(e) if self.password_stdin || std::io::stdin().is_terminal() => {
                eprintln!("handoff: {e:#}; log in with your password instead.");
                let prompt = format!("Password for {owner}: ");
                let password = secret(&prompt, None, self.password_stdin, "--password-stdin")?;
                Session::login(data, owner, address, Credential::Password(password)).await
            }
            Err(e) => {
                bail!("{e:#}: run the import again with --password-stdin, or log in with `handoff login {owner}` first")
            }
        }
    }
}

/// The homeserver of the bundle's account, the only one its secrets (the login token, the
/// password, the old account's access token) may go to: the one given with `--homeserver`, else
/// the one its server name leads to. The address written in the bundle is only compared: a bundle
/// edited to name another server would collect them there.
async fn bundle_homeserver(bundle: &Bundle, given: Option<&str>) -> Result<reqwest::Url> {
    let owner = &bundle.source.user_id;
    let written = &bundle.source.homeserver_url;
    if let Some(given) = given {
        return reqwest::Url::parse(given).with_context(|| format!("--homeserver {given} is not a URL"));
    }
    let found = session::find_homeserver(owner.server_name()).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot find the homeserver of {owner} ({e}); nothing was sent: pass its address with --homeserver URL \
             (the bundle names {written}: pass that if you trust it)"
        )
    })?;
    anyhow::ensure!(
        session::same_homeserver(&found, written),
        "the bundle names {written} as the homeserver of {owner}, but {} leads to {found}: nothing was sent. \
         If you trust {written}, pass --homeserver {written}",
        owner.server_name()
    );
    Ok(found)
}

fn print_report(report: &ImportReport) {
    let moved = report.count(|o| *o == RoomOutcome::Moved);
    println!(
        "Imported the bundle of {} into {}: {moved} of {} room(s) moved.",
        report.old,
        report.new,
        report.rooms.len()
    );
    let invites: Vec<&RoomResult> = report.rooms.iter().filter(|r| r.outcome == RoomOutcome::NeedsInvite).collect();
    if !invites.is_empty() {
        println!(
            "{} room(s) need an invite: ask someone there to invite {}, or run the import again with --old {} (the old account logged in here too):",
            invites.len(),
            report.new,
            report.old
        );
        for r in invites {
            println!("  - {} ({})", r.label(), r.room_id);
        }
    }
    for r in &report.rooms {
        match &r.outcome {
            RoomOutcome::Skipped(why) => println!("  skipped {}: {why}", r.label()),
            RoomOutcome::Failed(why) => println!("  failed {}: {why} (run the import again to retry)", r.label()),
            _ => {}
        }
        for note in &r.notes {
            println!("  {}: {note}", r.label());
        }
    }
    for s in &report.settings {
        if s.ok {
            println!("  {}: {}", s.step, s.detail);
        } else {
            println!("  {} failed: {}", s.step, s.detail);
        }
    }
    if let Some(keys) = &report.room_keys {
        println!(
            "Room keys: {} of {} imported into this device{}.",
            keys.imported,
            keys.total,
            if keys.backed_up { " and uploaded to your key backup" } else { "" }
        );
    }
    if report.left_out > 0 {
        println!("{} room(s) of the bundle were left out by --only / --max-rooms.", report.left_out);
    }
}

/// The import's progress on stderr: a bar over the rooms, a spinner's message for the other
/// steps; nothing when stderr is not a terminal or with `--json`.
struct Bar {
    bar: Option<ProgressBar>,
    left: std::sync::Mutex<Option<TimeLeft>>,
}

impl Bar {
    fn new(shown: bool) -> Bar {
        let bar = shown.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg:30!} [{bar:30}] {pos}/{len} rooms {prefix}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Bar { bar, left: std::sync::Mutex::new(None) }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn step(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_owned());
        }
    }
    fn rooms(&self, total: usize, at_defaults: Duration) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_message("rooms");
            let left = TimeLeft::new(total, at_defaults, Instant::now());
            bar.set_prefix(time_left(left.left(Instant::now())));
            *self.left.lock().expect("lock") = Some(left);
        }
    }
    fn room(&self, result: &RoomResult) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            let now = Instant::now();
            if let Some(left) = self.left.lock().expect("lock").as_mut() {
                left.room_done(now);
                bar.set_prefix(time_left(left.left(now)));
            }
            // The homeserver asked to wait lately: the rooms go at its rate.
            let limited = RateLimited::last().is_some_and(|l| now - l.at < RECENTLY_LIMITED);
            bar.set_message(if limited { "rooms, at the server's rate" } else { "rooms" });
            if let RoomOutcome::Failed(why) = &result.outcome {
                bar.println(format!("failed {}: {why}", result.label()));
            }
        }
    }
}

/// How long after a rate limit's wait the bar says the rooms go at the server's rate.
const RECENTLY_LIMITED: Duration = Duration::from_secs(120);

/// The bar's time left, to the minute past a minute (the rate it comes from moves).
fn time_left(left: Duration) -> String {
    match left.as_secs() {
        0 => String::new(),
        s if s < 60 => format!("(about {s}s left)"),
        s => format!("(about {} left)", humantime::format_duration(Duration::from_secs(s / 60 * 60))),
    }
}

/// `handoff undo`: the last import into the account, taken back.
async fn undo(
    data: &Path,
    as_user: Option<&UserId>,
    dry_run: bool,
    all: bool,
    old: Option<&UserId>,
    json: bool,
) -> Result<ExitCode> {
    let session = Session::open(data, as_user).await?;
    let old = match old {
        Some(user) => {
            let old = client::import::old_from_session(&Session::open(data, Some(user)).await?).await?;
            Some((old.user, old.hs))
        }
        None => None,
    };
    let undo = DeviceUndo::open(&session, old).await?;
    let record = undo.record();
    let plan = undo.plan(all).await?;
    let name = |room: &ruma::RoomId| {
        let named = record.rooms.get(room).and_then(|r| r.name.clone());
        named.unwrap_or_else(|| room.to_string())
    };
    let (back, kept) = plan.settings.as_ref().map(|s| s.names()).unwrap_or_default();
    if dry_run {
        if json {
            let rooms: Vec<serde_json::Value> = plan
                .rooms
                .iter()
                .map(|(room, named, what)| match what {
                    RoomUndo::Leave { .. } => serde_json::json!({"room_id": room, "name": named, "undo": "leave"}),
                    RoomUndo::Kept(why) => {
                        serde_json::json!({"room_id": room, "name": named, "undo": "keep", "why": why})
                    }
                })
                .collect();
            let settings = serde_json::json!({"restore": back, "keep": kept});
            let out = serde_json::json!({"old": record.old, "new": record.new, "rooms": rooms, "settings": settings});
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "Undoing the import from {} into {} would leave {} room(s) it joined (taking off the tags it set, redacting its notices, lowering the rank it gave first).",
            record.old,
            record.new,
            plan.leaving()
        );
        for (room, _, what) in &plan.rooms {
            if let RoomUndo::Kept(why) = what
                && *why != Kept::NotMoved
            {
                println!("  stays: {} ({})", name(room), why.text("--all"));
            }
        }
        if !back.is_empty() {
            println!("Settings that would go back to what you had before: {}.", back.join(", "));
        }
        if !kept.is_empty() {
            println!("Settings you changed since the import, which would stay: {}.", kept.join(", "));
        }
        println!("Nothing was changed (--dry-run).");
        return Ok(ExitCode::SUCCESS);
    }
    let shown = !json && std::io::stderr().is_terminal();
    let report = undo
        .run(&plan, all, |room, step| {
            if shown && let UndoRoom::Left { .. } = step {
                eprintln!("left {}", name(room));
            }
        })
        .await?;
    if json {
        let out = serde_json::json!({"old": record.old, "new": record.new, "report": report});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "Undid the import from {} into {}: left {} room(s), redacted {} move notice(s).",
            record.old,
            record.new,
            report.left.len(),
            report.redacted
        );
        let s = &report.settings;
        if !s.restored.is_empty() {
            println!("Put back as you had them before the import: {}.", s.restored.join(", "));
        }
        if !s.kept.is_empty() {
            println!("Kept, changed since the import: {}.", s.kept.join(", "));
        }
        if !s.failed.is_empty() {
            println!("Could not put back: {}.", s.failed.join(", "));
        }
        for (room, why) in &report.kept {
            println!("  stays: {} ({})", name(room), why.text("--all"));
        }
        for (room, why) in &report.rank_kept {
            println!("  left {}, but the rank the import gave stays in its power levels: {why}", name(room));
        }
        for (room, why) in &report.failed {
            println!("  not left: {}: {why} (run `handoff undo` again to retry)", name(room));
        }
        println!("Messages you sent in the rooms are not deleted.");
    }
    Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(INCOMPLETE) })
}
