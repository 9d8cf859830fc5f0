//! `handoff serve`: start-up checks, the HTTP server, and a clean stop.
//!
//! Start-up, in order, each failure one line that says what to fix:
//! config ready → store opens → homeserver reachable → bot registered (proves the homeserver
//! knows our `as_token`) → profile set → the bot's device (if allowed; a failure is logged, not
//! fatal) → listening → ping (proves the homeserver reaches us with
//! the right `hs_token`). With `metrics.enabled`, a second listener on `metrics.listen` serves
//! `/metrics` and `/health`; it is bound before anything else, so a wrong address stops at once.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ruma::api::client::account::register::{self, LoginType};
use ruma::api::client::account::whoami;
use ruma::api::client::appservice::request_ping;
use ruma::api::client::profile::set_profile_field;
use ruma::api::error::ErrorKind;
use ruma::profile::ProfileFieldValue;
use tokio::net::TcpListener;

use crate::appservice::{self, AppState};
use crate::bot::Bot;
use crate::bot::device::Encryption;
use crate::bot::outbox::Outbox;
use crate::bot::progress::ChatReporter;
use crate::config::Config;
use crate::homeserver::{Homeserver, HsError, Retry};
use crate::metrics;
use crate::registration;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::transfer::engine::Engine;
use crate::transfer::journal::Journal;

pub async fn run(config: Config) -> Result<()> {
    config.check_ready_to_serve().map_err(anyhow::Error::msg)?; // also checked by the CLI, for exit code 2
    if !config.lets_in_local_users() {
        tracing::warn!(
            domain = %config.homeserver.domain,
            "handoff.permissions lets no user of homeserver.domain in: the bot will refuse everyone here (add `\"{}\": user`)",
            config.homeserver.domain
        );
    }
    // On a database several instances share, one leads: the others stand by here, taking the
    // homeserver's transactions into the shared inbox (the leader queues them), and the first to
    // ask takes over once the leader's session is gone.
    let store = open_store(&config).await?;
    let (mut standby, mut lead_watch, mut took_over) = (None, None, false);
    if store.is_shared() {
        let edge = Standby::start(&config, &store).await?;
        let standing_by = || {
            took_over = true;
            tracing::info!(
                "another handoff serve leads this database: standing by (taking transactions into the shared inbox) until it stops"
            )
        };
        let lead = tokio::select! {
            lead = store.lead(&config.appservice.id, standing_by) => lead?,
            _ = shutdown_signal() => {
                edge.stop().await;
                return Ok(());
            }
        };
        let lead = lead.context("a shared database has a lead")?;
        tracing::info!(epoch = lead.epoch(), "leading the database");
        lead_watch = Some(tokio::spawn(async move {
            let why = lead.lost().await;
            // Another instance may lead already: not one more write from this one.
            tracing::error!(reason = %why, "lost the lead of the database: stopping at once (a standby takes over)");
            std::process::exit(1);
        }));
        standby = Some(edge);
    }
    // Bound and installed first: start-up's own homeserver requests are counted too.
    let metrics_listener = if config.metrics.enabled {
        let listen = config.metrics.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (check metrics.listen)"))?;
        Some((listener, metrics::install()?))
    } else {
        None
    };
    let config = Arc::new(config);

    let address = config.homeserver.address.as_str();
    let http = reqwest::Client::builder()
        .user_agent(concat!("handoff/", env!("CARGO_PKG_VERSION")))
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let registration =
        Homeserver::connect(address, config.appservice.as_token.expose(), http.clone()).await.map_err(|e| {
            anyhow::anyhow!("{e} (check homeserver.address = {address}, and that the homeserver is running)")
        })?;
    let bot_user = config.bot_user_id();
    register_bot(&registration, &config).await?;
    // Everything the bot does, it does as the bot (a user of the registration's namespace).
    let hs = registration.as_user(bot_user.clone());
    set_bot_profile(&hs, &config).await;

    let acting = registration.with_token(config.appservice.acting.as_token.expose()).await?;
    check_acting(&acting).await?;
    let encryption = match registration_sender_is_bot(&registration, &config).await {
        true => Encryption::Unavailable(format!(
            "the homeserver still has the registration in which the bot is the sender_localpart, and Synapse lets no sender /sync: re-run `handoff generate-registration` and restart the homeserver with the new {}",
            registration::MAIN_FILE
        )),
        false => Encryption::start(&config, &hs, &store).await,
    };
    // Bound once the device is up: until the server serves, the homeserver's pushes are refused
    // at once (and retried) rather than left hanging.
    let bind = (config.appservice.hostname.as_str(), config.appservice.port.0);
    let listener = listen(&config, standby.is_some()).await?;

    let outbox = Outbox::new(hs.clone(), encryption.device().cloned());
    let journal = Journal::new(store.clone());
    let reporter = Arc::new(ChatReporter::new(&outbox));
    let shutdown = Shutdown::new();
    let engine =
        Engine::new(config.clone(), acting.clone(), store.clone(), journal.clone(), reporter, shutdown.clone());
    let bot = Arc::new(Bot::new(
        config.clone(),
        outbox,
        acting,
        store.clone(),
        journal.clone(),
        engine.clone(),
        shutdown.clone(),
    ));
    spawn_upkeep(&shutdown, store.clone(), journal, config.handoff.bundle_retention);
    match bot.sweep_revoked().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(dropped = n, "dropped offers and pending imports of users no longer permitted"),
        Err(e) => tracing::warn!(error = %e, "cannot check pending offers against the permissions"),
    }
    bot.watch_auto_starts();
    bot.watch_shared_inbox();
    // Before the server takes new transactions: an event accepted from now on is queued by its
    // transaction alone, never a second time by the replay.
    match bot.replay_inbox().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "handling events accepted before the last stop"),
        Err(e) => tracing::error!(error = %e, "cannot read the inbox"),
    }
    if let Some(device) = encryption.device() {
        // What the device decrypts enters the inbox like a transaction's events.
        let (taker, teller) = (Arc::clone(&bot), Arc::clone(&bot));
        device.spawn_sync(
            &shutdown,
            store.clone(),
            move |event| {
                let bot = Arc::clone(&taker);
                async move { bot.accept_decrypted(event).await }
            },
            move |unreadable| {
                let bot = Arc::clone(&teller);
                async move { bot.tell_unreadable(unreadable).await }
            },
        );
    }
    let health = appservice::Health::start(store.clone(), hs.clone(), &shutdown).await;
    let state = AppState {
        hs_token: config.appservice.hs_token.clone(),
        role: appservice::Role::Leader { bot: Arc::clone(&bot), encryption: Arc::new(encryption) },
        health,
    };
    // Stopped with the main server (below), not on its own: a scrape is never worth waiting for.
    let metrics_server = metrics_listener.map(|(listener, handle)| {
        let app = metrics::router(handle).merge(appservice::health_router(state.clone())).fallback(metrics::not_found);
        tracing::info!(listen = %config.metrics.listen, "serving /metrics and /health");
        tokio::spawn(async move { axum::serve(listener, app).await })
    });
    let app = appservice::router(state);
    let server =
        tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await });
    if let Some(edge) = standby.take() {
        // The leader's server takes the transactions from now on.
        edge.stop().await;
    }

    let stop_metrics = || {
        if let Some(m) = &metrics_server {
            m.abort();
        }
    };
    if took_over {
        // The instance that led before may still listen beside this one (frozen, or on its way
        // out), and the kernel may hand it the homeserver's ping, which it never answers. A
        // failed ping here says nothing of the config (the leader before checked it), and
        // stopping for it would leave no instance at all: the takeover neither waits for it
        // nor stops for it.
        ping_after_takeover(&shutdown, hs.clone(), Arc::clone(&config));
    } else if let Err(e) = ping(&hs, &config).await {
        server.abort();
        stop_metrics();
        return Err(e);
    }
    tracing::info!(bot = %bot_user, listen = %format!("{}:{}", bind.0, bind.1), "handoff is running");
    match engine.resume_all().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(transfers = n, "resumed unfinished transfers"),
        Err(e) => tracing::error!(error = %e, "cannot read unfinished transfers"),
    }

    let served = server.await;
    stop_metrics();
    // The HTTP server has answered its last request. Transfers are stopped at once (they resume
    // at the next start); events in hand get a few seconds to finish, the rest stay in the inbox.
    let transfers = engine.stop_all();
    let unfinished = shutdown.stop(STOP_PATIENCE).await;
    bot.release_in_hand().await;
    let flushed = store.flush().await;
    // Stopped: the lead ends with the process, and a database that goes first is no news.
    if let Some(watch) = lead_watch {
        watch.abort();
    }
    served.context("server task failed")??;
    flushed?;
    if transfers + unfinished == 0 {
        tracing::info!("stopped cleanly; the store is flushed");
    } else {
        tracing::info!(
            transfers_interrupted = transfers,
            tasks_unfinished = unfinished,
            "stopped; the store is flushed, and what was interrupted resumes at the next start"
        );
    }
    Ok(())
}

/// Whether the homeserver's main registration is one from before the bot had a device, whose
/// `sender_localpart` is the bot: the device could log in but never sync.
async fn registration_sender_is_bot(registration: &Homeserver, config: &Config) -> bool {
    if !config.encryption.allow {
        return false;
    }
    match registration.with_retry(Retry::NONE).send(whoami::v3::Request::new()).await {
        Ok(me) if me.user_id == config.bot_user_id() => {
            tracing::error!(
                "the homeserver loaded an old {}: the bot is its sender_localpart, so the bot can't have a device (Synapse lets no sender /sync). Re-run `handoff generate-registration` and restart the homeserver; until then the bot works in unencrypted DMs only",
                registration::MAIN_FILE
            );
            true
        }
        _ => false,
    }
}

/// The acting registration must be loaded too: ask who its token is.
async fn check_acting(acting: &Homeserver) -> Result<()> {
    match acting.with_retry(Retry::NONE).send(whoami::v3::Request::new()).await {
        Ok(_) => Ok(()),
        Err(HsError::Matrix { kind: ErrorKind::UnknownToken(_), .. }) => bail!(
            "the homeserver does not know appservice.acting.as_token: add {} to app_service_config_files in the homeserver config and restart it",
            registration::ACTING_FILE
        ),
        Err(e) => Err(anyhow::anyhow!("cannot check the acting registration: {e}")),
    }
}

/// How long a stop waits for the events in hand.
const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Upkeep, until the stop: deletes what is past `handoff.bundle_retention` at start-up and then
/// hourly, and samples the store's size for `/metrics` every minute.
fn spawn_upkeep(shutdown: &Shutdown, store: Store, journal: Journal, retention: std::time::Duration) {
    let (stop, sampled) = (shutdown.clone(), store.clone());
    shutdown.spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.begun() => return,
                _ = every.tick() => {}
            }
            match sampled.size_on_disk().await {
                Ok(bytes) => metrics::store_size(bytes),
                Err(e) => tracing::debug!(error = %e, "cannot read the store's size"),
            }
        }
    });
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = stop.begun() => return,
                _ = every.tick() => {}
            }
            match store.purge(retention).await {
                Ok(gone) if gone.bundles + gone.codes > 0 => {
                    tracing::info!(bundles = gone.bundles, codes = gone.codes, "purged expired bundles and codes")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "purging old bundles failed"),
            }
            match journal.purge(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(transfers = n, "purged finished transfers"),
                Err(e) => tracing::warn!(error = %e, "purging old transfers failed"),
            }
        }
    });
}

async fn register_bot(hs: &Homeserver, config: &Config) -> Result<()> {
    let mut req = register::v3::Request::new();
    req.username = Some(config.appservice.bot.username.clone());
    req.login_type = Some(LoginType::ApplicationService);
    req.inhibit_login = true;
    match hs.with_retry(Retry::NONE).send(req).await {
        Ok(_) => {
            tracing::info!(bot = %config.bot_user_id(), "registered the bot user");
            Ok(())
        }
        Err(e) if matches!(e.kind(), Some(ErrorKind::UserInUse)) => Ok(()),
        Err(HsError::Matrix { kind: ErrorKind::UnknownToken(_), .. }) => bail!(
            "the homeserver does not know appservice.as_token: add {} to app_service_config_files in the homeserver config and restart it (after generate-registration, both must hold the same tokens)",
            registration::MAIN_FILE
        ),
        Err(e) => Err(anyhow::anyhow!("cannot register the bot user {}: {e}", config.bot_user_id())),
    }
}

/// The display name and avatar are cosmetic: a failure is logged, not fatal.
async fn set_bot_profile(hs: &Homeserver, config: &Config) {
    let bot = config.bot_user_id();
    let name = ProfileFieldValue::DisplayName(config.appservice.bot.displayname.clone());
    if let Err(e) = hs.send(set_profile_field::v3::Request::new(bot.clone(), name)).await {
        tracing::warn!(error = %e, "cannot set the bot's display name");
    }
    if let Some(avatar) = &config.appservice.bot.avatar {
        let avatar = ProfileFieldValue::AvatarUrl(avatar.clone());
        if let Err(e) = hs.send(set_profile_field::v3::Request::new(bot, avatar)).await {
            tracing::warn!(error = %e, "cannot set the bot's avatar");
        }
    }
}

async fn ping(hs: &Homeserver, config: &Config) -> Result<()> {
    let req = request_ping::v1::Request::new(config.appservice.id.clone());
    match hs.with_retry(Retry::NONE).send(req).await {
        Ok(resp) => {
            tracing::info!(duration_ms = resp.duration.as_millis() as u64, "the homeserver reached handoff");
            Ok(())
        }
        Err(e) => {
            let advice = match e.kind() {
                Some(ErrorKind::Forbidden) => format!(
                    "the homeserver's registration for this as_token does not have id {:?}: check appservice.id against {}",
                    config.appservice.id,
                    registration::MAIN_FILE
                ),
                Some(ErrorKind::ConnectionFailed) | Some(ErrorKind::ConnectionTimeout) => format!(
                    "the homeserver cannot reach handoff at {}: check appservice.address (it must be reachable from the homeserver) and appservice.hostname/port",
                    config.appservice.address
                ),
                Some(ErrorKind::BadStatus(_)) => format!(
                    "the homeserver reached handoff but was refused: appservice.hs_token differs from hs_token in the registration the homeserver loaded ({}); re-run generate-registration and restart the homeserver",
                    registration::MAIN_FILE
                ),
                Some(ErrorKind::UrlNotSet) => format!(
                    "the homeserver's registration has no url: set appservice.address and re-generate {}",
                    registration::MAIN_FILE
                ),
                _ => "check the homeserver logs".to_owned(),
            };
            bail!("ping to the homeserver failed ({e}): {advice}")
        }
    }
}

/// How many times a takeover's ping is tried, and how long apart.
const TAKEOVER_PINGS: u32 = 5;
const TAKEOVER_PING_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// [`ping`] after a takeover, in the background: tried until it succeeds ([`TAKEOVER_PINGS`]
/// times at most, a new connection each time), and a warning if it never does. A ping that the
/// kernel gives the old leader's listener fails when that process exits, or after the
/// homeserver's timeout while it is frozen.
fn ping_after_takeover(shutdown: &Shutdown, hs: Homeserver, config: Arc<Config>) {
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        for attempt in 1..=TAKEOVER_PINGS {
            let failed = tokio::select! {
                _ = stop.begun() => return,
                pinged = ping(&hs, &config) => match pinged {
                    Ok(()) => return,
                    Err(e) => e,
                },
            };
            if attempt == TAKEOVER_PINGS {
                tracing::warn!(
                    error = %failed,
                    attempts = attempt,
                    "the homeserver's pings did not reach this instance since it took the lead (the instance that led before may still be listening on the same port); going on"
                );
                return;
            }
            tracing::debug!(error = %failed, attempt, "the homeserver's ping after the takeover failed; trying again");
            tokio::select! {
                _ = stop.begun() => return,
                _ = tokio::time::sleep(TAKEOVER_PING_PAUSE) => {}
            }
        }
    });
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the request in flight, then stopping"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the request in flight, then stopping"),
    }
}

/// Listens on `appservice.hostname:port`. `shared`: beside the other instances of a shared
/// database on this host (`SO_REUSEPORT`: the kernel spreads the homeserver's connections over
/// every instance that listens, a standby's included, and sends them all to those left when one
/// stops).
async fn listen(config: &Config, shared: bool) -> Result<TcpListener> {
    let (host, port) = (config.appservice.hostname.as_str(), config.appservice.port.0);
    let cannot = || format!("cannot listen on {host}:{port} (check appservice.hostname and appservice.port)");
    if !shared {
        return TcpListener::bind((host, port)).await.with_context(cannot);
    }
    let address = tokio::net::lookup_host((host, port)).await.with_context(cannot)?.next().with_context(cannot)?;
    let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address).with_context(cannot)?;
    socket.listen(1024).with_context(cannot)
}

/// A standby's edge: it takes the homeserver's transactions into the shared inbox while another
/// instance leads, and answers `/health` as a standby.
struct Standby {
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
    shutdown: Shutdown,
}

impl Standby {
    async fn start(config: &Config, store: &Store) -> Result<Standby> {
        let address = config.homeserver.address.as_str();
        let http = reqwest::Client::builder()
            .user_agent(concat!("handoff/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        let registration =
            Homeserver::connect(address, config.appservice.as_token.expose(), http).await.map_err(|e| {
                anyhow::anyhow!("{e} (check homeserver.address = {address}, and that the homeserver is running)")
            })?;
        // The bot's account, for `/health`'s check (made once; a first start may be a standby's).
        register_bot(&registration, config).await?;
        let listener = listen(config, true).await?;
        let shutdown = Shutdown::new();
        let health =
            appservice::Health::start(store.clone(), registration.as_user(config.bot_user_id()), &shutdown).await;
        let intake =
            crate::bot::intake::Intake::new(store.clone(), config.bot_user_id(), config.handoff.command_prefix.clone());
        let state = AppState {
            hs_token: config.appservice.hs_token.clone(),
            role: appservice::Role::Standby(Arc::new(intake)),
            health,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let app = appservice::router(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        let (host, port) = (&config.appservice.hostname, config.appservice.port.0);
        tracing::info!(listen = %format!("{host}:{port}"), "taking transactions as a standby");
        Ok(Standby { server, stop, shutdown })
    }

    /// Stops taking transactions here (the requests in flight finish).
    async fn stop(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(STOP_PATIENCE, self.server).await.is_err() {
            tracing::warn!("the standby's edge did not stop in time");
        }
        self.shutdown.stop(STOP_PATIENCE).await;
    }
}

/// The store the config names: sled at `database.path`, or PostgreSQL at `database.uri` (its
/// schema migrated), sealed with the key at `<database.path>.key` either way.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(match config.database.kind {
        crate::config::DatabaseType::Sled => Store::open(&config.database_path())?,
        crate::config::DatabaseType::Postgres => {
            let uri = config.database_uri().map_err(anyhow::Error::msg)?.context("database.uri is not set")?;
            let key = crate::store::key_path_for(&config.database_path());
            Store::connect_postgres(uri.expose(), config.database.max_open_conns, &key).await?
        }
    })
}
