//! The device side's login: a person's own session, made with matrix-sdk, kept on disk so the
//! next `handoff` command does not log in again.
//!
//! Each account has a folder of its own under the data directory (`--data-dir`, or
//! `$HANDOFF_DATA_DIR`, or `$XDG_DATA_HOME/handoff`, or `~/.local/share/handoff`):
//! `accounts/<user ID>/session.json` (mode 0600: the homeserver, device ID, access token and the
//! passphrase of the crypto store) and `store/`, matrix-sdk's SQLite stores encrypted with that
//! passphrase. The folder is mode 0700; `handoff logout` ends the session and removes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::store::RoomLoadSettings;
use matrix_sdk::{Client, SessionMeta, SessionTokens};
use reqwest::Url;
use ruma::api::client::account::whoami;
use ruma::api::error::ErrorKind;
use ruma::{OwnedDeviceId, OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Serialize};

use crate::bot::device::sdk_error;
use crate::bundle::LoginToken;
use crate::config::{HttpUrl, Secret};
use crate::homeserver::{Homeserver, HsError};

/// What the device is called in the account's device list.
const DEVICE_NAME: &str = "handoff (command line)";

/// What the person signs in with.
pub enum Credential {
    Password(Secret),
    /// An access token from another client; its device becomes this session's.
    AccessToken(Secret),
    /// A single-use login token another session of the same account made
    /// (`handoff export --login-token`).
    LoginToken(Secret),
}

/// The session file.
#[derive(Serialize, Deserialize)]
struct Saved {
    user_id: OwnedUserId,
    device_id: OwnedDeviceId,
    homeserver: HttpUrl,
    access_token: Secret,
    passphrase: Secret,
}

/// A logged-in session on this device.
pub struct Session {
    pub client: Client,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub homeserver: HttpUrl,
    access_token: Secret,
    /// The passphrase of this session's stores, which also seals what handoff keeps beside them.
    passphrase: Secret,
    /// This account's folder on this device.
    dir: PathBuf,
}

/// The data directory: the flag, then `$HANDOFF_DATA_DIR`, then the XDG default.
pub fn data_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = flag.or_else(|| std::env::var_os("HANDOFF_DATA_DIR").map(PathBuf::from)) {
        return Ok(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(xdg).join("handoff"));
    }
    let home = std::env::var_os("HOME").context("no home directory: pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/handoff"))
}

fn account_dir(data: &Path, user: &UserId) -> PathBuf {
    // A user ID is safe as one path component once its slashes (none are allowed, but) are out.
    data.join("accounts").join(user.as_str().replace('/', "_"))
}

impl Session {
    /// Logs `user` in as a new device of this command line and keeps the session.
    pub async fn login(
        data: &Path,
        user: &UserId,
        homeserver: Option<&str>,
        credential: Credential,
    ) -> Result<Session> {
        let dir = account_dir(data, user);
        if dir.join("session.json").exists() {
            bail!("{user} is already logged in here (run `handoff logout {user}` first to log in again)");
        }
        let homeserver = match homeserver {
            Some(url) => url.parse().map_err(|e| anyhow::anyhow!("--homeserver: {e}"))?,
            None => discover(user).await?,
        };
        create_private_dir(&dir)?;
        let passphrase = Secret::new(hex::encode(rand::random::<[u8; 32]>()));
        // Whether this login makes its own device (and so ends it if it fails half-way).
        let new_device = !matches!(credential, Credential::AccessToken(_));
        let made = async {
            let client = build(&homeserver, &dir, &passphrase).await?;
            let (device_id, access_token) = match credential {
                Credential::Password(password) => {
                    let login = client
                        .matrix_auth()
                        .login_username(user.as_str(), password.expose())
                        .initial_device_display_name(DEVICE_NAME)
                        .await
                        .map_err(|e| match e.client_api_error_kind() {
                            Some(ErrorKind::Forbidden) => {
                                anyhow::anyhow!("wrong user ID or password for {user} on {homeserver}")
                            }
                            _ => anyhow::anyhow!("cannot log in to {homeserver}: {}", sdk_error(e)),
                        })?;
                    (login.device_id, Secret::new(login.access_token))
                }
                Credential::AccessToken(token) => {
                    let me = whoami_of(&homeserver, &token).await?;
                    if me.user_id != user {
                        bail!("that access token is {}'s, not {user}'s", me.user_id);
                    }
                    let device_id = me
                        .device_id
                        .context("that access token has no device (an appservice token?): log in with a password")?;
                    restore(&client, user, &device_id, &token).await?;
                    (device_id, token)
                }
                Credential::LoginToken(token) => {
                    let login = client
                        .matrix_auth()
                        .login_token(token.expose())
                        .initial_device_display_name(DEVICE_NAME)
                        .await
                        .map_err(|e| match e.client_api_error_kind() {
                            Some(ErrorKind::Forbidden) => anyhow::anyhow!(
                                "the login token in the bundle has expired or was used already (they are single-use and last minutes)"
                            ),
                            _ => anyhow::anyhow!("cannot log in to {homeserver}: {}", sdk_error(e)),
                        })?;
                    if login.user_id != user {
                        bail!("the login token is {}'s, not {user}'s", login.user_id);
                    }
                    (login.device_id, Secret::new(login.access_token))
                }
            };
            let kept = async {
                // One sync: the device's keys go up, so the account's other devices know it.
                client.sync_once(SyncSettings::default().timeout(Duration::ZERO)).await.map_err(sdk_error)?;
                let saved = Saved {
                    user_id: user.to_owned(),
                    device_id: device_id.clone(),
                    homeserver: homeserver.clone(),
                    access_token: access_token.clone(),
                    passphrase: passphrase.clone(),
                };
                crate::registration::write_private(&dir.join("session.json"), &serde_json::to_string_pretty(&saved)?)
            };
            if let Err(e) = kept.await {
                // The homeserver made a device this login won't keep: end it.
                if new_device {
                    let _ = client.matrix_auth().logout().await;
                }
                return Err(e);
            }
            Ok::<_, anyhow::Error>(Session {
                client,
                user_id: user.to_owned(),
                device_id,
                homeserver: homeserver.clone(),
                access_token,
                passphrase: passphrase.clone(),
                dir: dir.clone(),
            })
        };
        match made.await {
            Ok(session) => Ok(session),
            Err(e) => {
                // Nothing half-made stays behind: the next login starts clean.
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The session kept for `user` (or the only one kept, without `user`).
    pub async fn open(data: &Path, user: Option<&UserId>) -> Result<Session> {
        let dir = match user {
            Some(user) => account_dir(data, user),
            None => only_account(data)?,
        };
        let path = dir.join("session.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let who = user.map(|u| u.to_string()).unwrap_or_else(|| "@you:your.server".into());
                bail!("not logged in: run `handoff login {who}` first")
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let saved: Saved = serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
        let client = build(&saved.homeserver, &dir, &saved.passphrase).await?;
        restore(&client, &saved.user_id, &saved.device_id, &saved.access_token).await?;
        Ok(Session {
            client,
            user_id: saved.user_id,
            device_id: saved.device_id,
            homeserver: saved.homeserver,
            access_token: saved.access_token,
            passphrase: saved.passphrase,
            dir,
        })
    }

    /// A single-use login token of this account (`POST /login/get_token`), for a new device of
    /// the same account. The homeserver may ask to confirm the password first: `password` is
    /// called then.
    pub async fn login_token(&self, password: impl FnOnce() -> Result<Secret>) -> Result<LoginToken> {
        use ruma::api::client::session::get_login_token;
        use ruma::api::client::uiaa::{AuthData, MatrixUserIdentifier, Password, UserIdentifier};
        let unsupported = |e: &matrix_sdk::HttpError| {
            matches!(
                e.client_api_error_kind(),
                Some(ErrorKind::Unrecognized | ErrorKind::Forbidden | ErrorKind::NotFound)
            )
        };
        let refused = || {
            anyhow::anyhow!(
                "{} does not let a session make login tokens (Synapse: `login_via_existing_session`): log in on the new device with your password instead",
                self.homeserver
            )
        };
        let mut req = get_login_token::v1::Request::new();
        let response = match self.client.send(req.clone()).await {
            Ok(r) => r,
            Err(e) if e.as_uiaa_response().is_some() => {
                let session = e.as_uiaa_response().and_then(|i| i.session.clone());
                let mut auth = Password::new(
                    UserIdentifier::Matrix(MatrixUserIdentifier::new(self.user_id.to_string())),
                    password()?.expose().to_owned(),
                );
                auth.session = session;
                req.auth = Some(AuthData::Password(auth));
                self.client.send(req).await.map_err(|e| match e.as_uiaa_response() {
                    Some(_) => anyhow::anyhow!("wrong password for {}: no login token was made", self.user_id),
                    None if unsupported(&e) => refused(),
                    None => anyhow::anyhow!("cannot make a login token: {e}"),
                })?
            }
            Err(e) if unsupported(&e) => return Err(refused()),
            Err(e) => bail!("cannot make a login token: {e}"),
        };
        let expires = std::time::SystemTime::now() + response.expires_in;
        Ok(LoginToken {
            token: Secret::new(response.login_token),
            expires_at: ruma::MilliSecondsSinceUnixEpoch::from_system_time(expires)
                .unwrap_or_else(ruma::MilliSecondsSinceUnixEpoch::now),
        })
    }

    /// Whether a session of `user` is kept here.
    pub fn exists(data: &Path, user: &UserId) -> bool {
        account_dir(data, user).join("session.json").exists()
    }

    /// This account's folder on this device (mode 0700).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A key for what handoff keeps in this account's folder beside the session (what an import
    /// wrote, for `handoff undo`), from the stores' passphrase: a file copied off the folder
    /// alone reads as noise.
    pub fn sealing_key(&self, purpose: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::new()
            .chain_update(b"handoff device key\0")
            .chain_update(purpose.as_bytes())
            .chain_update([0])
            .chain_update(self.passphrase.expose().as_bytes())
            .finalize()
            .into()
    }

    /// Ends the session on the homeserver (which deletes this device) and removes its folder.
    pub async fn logout(data: &Path, user: Option<&UserId>) -> Result<OwnedUserId> {
        let session = Session::open(data, user).await?;
        let dir = account_dir(data, &session.user_id);
        match session.client.matrix_auth().logout().await {
            Ok(_) => {}
            // Already ended elsewhere: the folder still goes.
            Err(e) if matches!(e.client_api_error_kind(), Some(ErrorKind::UnknownToken { .. })) => {}
            Err(e) => bail!("cannot log out of {}: {} (nothing was removed)", session.homeserver, sdk_error(e.into())),
        }
        let user = session.user_id.clone();
        drop(session);
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        Ok(user)
    }

    /// A client of the homeserver with this session's token, for the typed requests the bundle
    /// and the planner make.
    pub async fn homeserver(&self) -> Result<Homeserver, HsError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("handoff/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| HsError::Protocol(e.to_string()))?;
        Homeserver::connect_user(self.homeserver.as_str(), self.access_token.expose(), http).await
    }
}

/// The homeserver of `user`'s server, from its `.well-known` (matrix-sdk's discovery).
pub async fn discover(user: &UserId) -> Result<HttpUrl> {
    let server = user.server_name();
    let url = find_homeserver(server).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot find the homeserver of {server} ({e}): pass its address with --homeserver https://matrix.{server}"
        )
    })?;
    HttpUrl::parse(url.as_str()).map_err(|e| anyhow::anyhow!("{server} leads to a homeserver handoff cannot use: {e}"))
}

/// The homeserver `server` leads to (`.well-known/matrix/client`, else the server itself), as
/// matrix-sdk finds it; nothing but that discovery is sent.
pub async fn find_homeserver(server: &ServerName) -> Result<Url, matrix_sdk::ClientBuildError> {
    Ok(Client::builder().server_name(server).build().await?.homeserver())
}

/// Whether `written` (an address from a bundle) names the homeserver at `found`: the same scheme,
/// host, port and path, whatever a trailing slash or the default port's spelling.
pub fn same_homeserver(found: &Url, written: &HttpUrl) -> bool {
    let written = written.url();
    found.scheme() == written.scheme()
        && found.host_str() == written.host_str()
        && found.port_or_known_default() == written.port_or_known_default()
        && found.path().trim_end_matches('/') == written.path().trim_end_matches('/')
}

async fn build(homeserver: &HttpUrl, dir: &Path, passphrase: &Secret) -> Result<Client> {
    Client::builder()
        .homeserver_url(homeserver.as_str())
        .sqlite_store(dir.join("store"), Some(passphrase.expose()))
        .build()
        .await
        .with_context(|| format!("cannot open the session's store in {}", dir.display()))
}

async fn restore(client: &Client, user: &UserId, device: &OwnedDeviceId, token: &Secret) -> Result<()> {
    let session = MatrixSession {
        meta: SessionMeta { user_id: user.to_owned(), device_id: device.clone() },
        tokens: SessionTokens { access_token: token.expose().to_owned(), refresh_token: None },
    };
    client.matrix_auth().restore_session(session, RoomLoadSettings::default()).await.map_err(sdk_error)?;
    Ok(())
}

async fn whoami_of(homeserver: &HttpUrl, token: &Secret) -> Result<whoami::v3::Response> {
    let hs = Homeserver::connect_user(homeserver.as_str(), token.expose(), reqwest::Client::new())
        .await
        .with_context(|| format!("cannot reach {homeserver}"))?;
    hs.send(whoami::v3::Request::new()).await.map_err(|e| match e.kind() {
        Some(ErrorKind::UnknownToken { .. }) => anyhow::anyhow!("{homeserver} does not know that access token"),
        _ => anyhow::anyhow!("cannot check the access token: {e}"),
    })
}

/// The one account logged in here, for commands that don't name one.
fn only_account(data: &Path) -> Result<PathBuf> {
    let accounts = data.join("accounts");
    let dirs: Vec<PathBuf> = match std::fs::read_dir(&accounts) {
        Ok(entries) => {
            entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("session.json").exists()).collect()
        }
        Err(_) => Vec::new(),
    };
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("not logged in: run `handoff login @you:your.server` first"),
        _ => bail!("more than one account is logged in here: name one with --as @you:your.server"),
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_address_is_the_found_homeserver_only_when_it_names_the_same_server() {
        let found = Url::parse("https://matrix.example.org").unwrap();
        for same in ["https://matrix.example.org", "https://matrix.example.org/", "https://MATRIX.example.org:443"] {
            assert!(same_homeserver(&found, &same.parse().unwrap()), "{same}");
        }
        for other in [
            "http://matrix.example.org",
            "https://matrix.example.org:8448",
            "https://matrix.example.org.evil.net",
            "https://evil.net/matrix.example.org",
            "https://127.0.0.1:8008",
        ] {
            assert!(!same_homeserver(&found, &other.parse().unwrap()), "{other}");
        }
    }
}
