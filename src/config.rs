//! `bridge-config.yaml`: the model, its defaults, and error messages that name the key.
//!
//! Loading goes through `serde_path_to_error` (so a bad value names its key) and
//! `serde_ignored` (so a misspelt key is reported instead of silently ignored).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ruma::{OwnedMxcUri, OwnedServerName, OwnedUserId, UserId};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// The value that `generate-registration` replaces with a fresh token.
pub const PLACEHOLDER_TOKEN: &str = "generate";
/// The domain of the example config: `serve` refuses to run with it.
pub const EXAMPLE_DOMAIN: &str = "example.org";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub homeserver: HomeserverConfig,
    #[serde(default)]
    pub appservice: AppserviceConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub handoff: HandoffConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// The directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HomeserverConfig {
    pub address: HttpUrl,
    pub domain: OwnedServerName,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AppserviceConfig {
    pub address: HttpUrl,
    pub hostname: String,
    pub port: Port,
    pub id: String,
    pub bot: BotConfig,
    pub as_token: Secret,
    pub hs_token: Secret,
    pub acting: ActingConfig,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            address: HttpUrl::parse("http://127.0.0.1:29340").expect("a URL"),
            hostname: "127.0.0.1".into(),
            port: Port(29340),
            id: "handoff".into(),
            bot: BotConfig::default(),
            as_token: Secret::placeholder(),
            hs_token: Secret::placeholder(),
            acting: ActingConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BotConfig {
    pub username: String,
    pub displayname: String,
    #[serde(deserialize_with = "empty_as_none")]
    pub avatar: Option<OwnedMxcUri>,
}

impl Default for BotConfig {
    fn default() -> Self {
        Self { username: "handoff".into(), displayname: "Handoff".into(), avatar: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ActingConfig {
    pub as_token: Secret,
    pub hs_token: Secret,
}

impl Default for ActingConfig {
    fn default() -> Self {
        Self { as_token: Secret::placeholder(), hs_token: Secret::placeholder() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// `sled` (embedded, the default) or `postgres`.
    #[serde(rename = "type")]
    pub kind: DatabaseType,
    /// sled's folder. With `postgres`, where the store key (`<path>.key`) and the bot device's
    /// crypto store (`<path>.device/`) live: on local disk either way.
    pub path: PathBuf,
    /// `postgres://user:password@host[:port]/database`, or read from `uri_file` (so the password
    /// need not be in this file).
    pub uri: Option<Secret>,
    pub uri_file: Option<PathBuf>,
    /// Connections to PostgreSQL at most (mautrix's name).
    pub max_open_conns: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseType {
    #[default]
    Sled,
    Postgres,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            kind: DatabaseType::Sled,
            path: PathBuf::from("handoff.db"),
            uri: None,
            uri_file: None,
            max_open_conns: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HandoffConfig {
    pub command_prefix: String,
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
    pub permissions: BTreeMap<String, PermissionLevel>,
    pub notify: NotifyConfig,
    pub max_rooms: usize,
    pub history_messages: usize,
    pub concurrency: Concurrency,
    /// How many transfers run at once; the rest wait in line, in the order they were asked for.
    pub max_transfers: MaxTransfers,
    /// How long a stored bundle is kept before it is deleted.
    #[serde(with = "humantime_serde")]
    pub bundle_retention: Duration,
    /// How long a room waits for another homeserver its move needs (the new account's, or the
    /// room's via servers) before it is reported as not reached: one clock, whatever the failure
    /// (no answer, a refused connection, a 5xx). Such a request can't tell this homeserver away
    /// from the other one, so it ends after this too; every other request to this homeserver is
    /// waited for however long it takes.
    #[serde(with = "humantime_serde")]
    pub federation_patience: Duration,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self {
            command_prefix: "!handoff".into(),
            code_ttl: Duration::from_secs(15 * 60),
            permissions: BTreeMap::new(),
            notify: NotifyConfig::default(),
            max_rooms: 1000,
            history_messages: 50,
            concurrency: Concurrency(DEFAULT_CONCURRENCY),
            max_transfers: MaxTransfers(32),
            bundle_retention: Duration::from_secs(7 * 24 * 3600),
            federation_patience: Duration::from_secs(10 * 60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NotifyConfig {
    pub sender: NotifySender,
    pub template: String,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            sender: NotifySender::Old,
            template: "{old} has moved to {new}. Please use the new account from now on.".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifySender {
    Old,
    New,
    Bot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PermissionLevel {
    None,
    User,
    Admin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LoggingConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Pretty }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: false, listen: SocketAddr::from(([127, 0, 0, 1], 8001)) }
    }
}

/// End-to-end encryption in the bot's DMs (mautrix bridges call this section `encryption` too).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EncryptionConfig {
    /// Give the bot a device of its own, so it reads and writes encrypted DMs.
    pub allow: bool,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self { allow: true }
    }
}

impl Config {
    /// Reads and validates a config file. Every error names the file and the key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config =
            Self::parse(&text).map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })?;
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// Parses config text. The error is one line: `key: what was wrong`.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut unknown = Vec::new();
        let de = serde_norway::Deserializer::from_str(text);
        let mut track = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let ignoring = serde_ignored::Deserializer::new(de, &mut track);
        let config: Config = serde_path_to_error::deserialize(ignoring).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner().to_string();
            // serde_norway already names the key in some messages.
            if key == "." || key.is_empty() || inner.starts_with(&format!("{key}: ")) {
                inner
            } else {
                format!("{key}: {inner}")
            }
        })?;
        if !unknown.is_empty() {
            return Err(format!(
                "unknown key{} {} (see the example bridge-config.yaml for the keys handoff reads)",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            ));
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let bot = &self.appservice.bot.username;
        if bot.is_empty() || !bot.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/')) {
            return Err(format!(
                "appservice.bot.username: expected a user ID localpart (lower-case letters, digits, ._=-/), found {bot:?}"
            ));
        }
        if self.appservice.id.is_empty() {
            return Err("appservice.id: expected a non-empty registration ID".into());
        }
        if self.handoff.command_prefix.trim().is_empty() {
            return Err("handoff.command_prefix: expected a non-empty prefix such as \"!handoff\"".into());
        }
        if self.handoff.code_ttl < Duration::from_secs(30) {
            return Err(format!(
                "handoff.code_ttl: expected at least 30s, found {}",
                humantime::format_duration(self.handoff.code_ttl)
            ));
        }
        if self.handoff.max_rooms == 0 {
            return Err("handoff.max_rooms: expected at least 1".into());
        }
        for key in self.handoff.permissions.keys() {
            if key != "*"
                && UserId::parse(key.as_str()).is_err()
                && <&ruma::ServerName>::try_from(key.as_str()).is_err()
            {
                return Err(format!(
                    "handoff.permissions: expected `*`, a server name or a user ID as key, found {key:?}"
                ));
            }
        }
        let db = &self.database;
        match (db.kind, &db.uri, &db.uri_file) {
            (DatabaseType::Postgres, None, None) => {
                return Err("database.uri: `type: postgres` needs `uri: postgres://user:password@host/database` (or `uri_file`)".into());
            }
            (DatabaseType::Postgres, Some(_), Some(_)) => {
                return Err("database.uri and database.uri_file: give one of them, not both".into());
            }
            (DatabaseType::Postgres, Some(uri), None)
                if !(uri.expose().starts_with("postgres://") || uri.expose().starts_with("postgresql://")) =>
            {
                return Err("database.uri: expected a postgres:// or postgresql:// URI".into());
            }
            (DatabaseType::Sled, Some(_), _) | (DatabaseType::Sled, _, Some(_)) => {
                return Err("database.uri: set `type: postgres` to use it (the default, sled, keeps `path`)".into());
            }
            _ => {}
        }
        if db.max_open_conns == 0 {
            return Err("database.max_open_conns: expected at least 1".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            return Err(format!(
                "logging.level: expected error, warn, info, debug, trace or a tracing filter, found {:?}",
                self.logging.level
            ));
        }
        Ok(())
    }

    /// What `serve` needs beyond a well-formed file: real tokens and a real domain.
    pub fn check_ready_to_serve(&self) -> Result<(), String> {
        if self.homeserver.domain.as_str() == EXAMPLE_DOMAIN {
            return Err(format!(
                "homeserver.domain is still {EXAMPLE_DOMAIN:?}: set it to your homeserver's server name"
            ));
        }
        for (key, token) in self.tokens() {
            if token.is_placeholder() {
                return Err(format!(
                    "{key} is still {PLACEHOLDER_TOKEN:?}: run `handoff generate-registration -c CONFIG` first"
                ));
            }
        }
        Ok(())
    }

    /// The four tokens, keyed by their config path.
    pub fn tokens(&self) -> [(&'static str, &Secret); 4] {
        [
            ("appservice.as_token", &self.appservice.as_token),
            ("appservice.hs_token", &self.appservice.hs_token),
            ("appservice.acting.as_token", &self.appservice.acting.as_token),
            ("appservice.acting.hs_token", &self.appservice.acting.hs_token),
        ]
    }

    pub fn bot_user_id(&self) -> OwnedUserId {
        UserId::parse_with_server_name(self.appservice.bot.username.as_str(), &self.homeserver.domain)
            .expect("validated localpart and server name make a user ID")
    }

    pub fn database_path(&self) -> PathBuf {
        self.base_dir.join(&self.database.path)
    }

    /// PostgreSQL's URI, from `database.uri` or the file `database.uri_file` names (trimmed).
    pub fn database_uri(&self) -> Result<Option<Secret>, String> {
        match (&self.database.uri, &self.database.uri_file) {
            (Some(uri), _) => Ok(Some(uri.clone())),
            (None, Some(file)) => {
                let path = self.base_dir.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("database.uri_file: cannot read {}: {e}", path.display()))?;
                Ok(Some(Secret::new(text.trim().to_owned())))
            }
            (None, None) => Ok(None),
        }
    }

    /// The bot device's crypto store (a directory of SQLite files), beside the database.
    pub fn device_store_path(&self) -> PathBuf {
        let mut name = self.database_path().into_os_string();
        name.push(".device");
        PathBuf::from(name)
    }

    /// Whether any user of `homeserver.domain` may use the bot: an admin who changed only the
    /// domain of the example config (which names `example.org`) gets a bot that refuses everyone.
    pub fn lets_in_local_users(&self) -> bool {
        let domain = &self.homeserver.domain;
        let anyone = UserId::parse_with_server_name("someone", domain).expect("a valid user ID");
        self.permission(&anyone) >= PermissionLevel::User
            || self.handoff.permissions.iter().any(|(key, level)| {
                *level >= PermissionLevel::User && UserId::parse(key.as_str()).is_ok_and(|u| u.server_name() == domain)
            })
    }

    /// The level of `user`: the exact user ID wins over its server name, which wins over `*`.
    pub fn permission(&self, user: &UserId) -> PermissionLevel {
        let perms = &self.handoff.permissions;
        if perms.is_empty() {
            return if user.server_name() == self.homeserver.domain {
                PermissionLevel::User
            } else {
                PermissionLevel::None
            };
        }
        perms
            .get(user.as_str())
            .or_else(|| perms.get(user.server_name().as_str()))
            .or_else(|| perms.get("*"))
            .copied()
            .unwrap_or(PermissionLevel::None)
    }
}

/// A token, password or passphrase. `secrecy` keeps it: wiped from memory when dropped, and its
/// `Debug` never shows the value, so it can't leak into logs. Compared in constant time.
#[derive(Clone)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value.into())
    }
    fn placeholder() -> Self {
        Secret::new(PLACEHOLDER_TOKEN.into())
    }
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
    pub fn is_placeholder(&self) -> bool {
        self.expose().is_empty() || self.expose() == PLACEHOLDER_TOKEN
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(self.expose().as_bytes(), other.expose().as_bytes()).into()
    }
}

impl Eq for Secret {}

/// Written where a secret is meant to be kept (the sealed store, a bundle file, the config).
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// An `http://` or `https://` URL with a host: a homeserver's address (the config's, a session's,
/// the one a bundle names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(url::Url);

impl HttpUrl {
    /// Parses `s`, refusing any other scheme and a URL without a host.
    pub fn parse(s: &str) -> Result<HttpUrl, String> {
        let refused = || format!("expected an http:// or https:// URL, found {s:?}");
        let url = url::Url::parse(s).map_err(|_| refused())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(refused());
        }
        Ok(HttpUrl(url))
    }

    /// The address without a trailing slash, ready for `{address}/_matrix/...`.
    pub fn as_str(&self) -> &str {
        self.0.as_str().trim_end_matches('/')
    }

    pub fn url(&self) -> &url::Url {
        &self.0
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HttpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<HttpUrl, String> {
        HttpUrl::parse(s)
    }
}

/// Written as read: without the trailing slash.
impl Serialize for HttpUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HttpUrl::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// A TCP port, 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RangeVisitor { what: "a port number 1-65535", min: 1, max: 65535 }).map(|n| Port(n as u16))
    }
}

/// A number read from the config that must lie in a range, refused with the range named.
macro_rules! ranged {
    ($(#[$doc:meta])* $name:ident, $what:literal, $min:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name(pub usize);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let what = concat!($what, " ", $min, "-", $max);
                d.deserialize_any(RangeVisitor { what, min: $min, max: $max }).map(|n| $name(n as usize))
            }
        }
    };
}

ranged!(
    /// `handoff.concurrency`: how many rooms are worked on at once.
    Concurrency, "a number of rooms", 1, 64
);

/// `handoff.concurrency` by default; the device side moves as many rooms at once.
pub const DEFAULT_CONCURRENCY: usize = 16;
ranged!(
    /// `handoff.max_transfers`: transfers running at once.
    MaxTransfers, "a number of transfers", 1, 10000
);

/// Accepts an integer in `min..=max` and says, for anything else, what it expected and found.
/// By hand: serde's own integer errors name neither the range nor a string's value.
struct RangeVisitor {
    what: &'static str,
    min: u64,
    max: u64,
}

impl RangeVisitor {
    fn found<E: de::Error>(&self, found: impl fmt::Display) -> E {
        E::custom(format!("expected {}, found {found}", self.what))
    }
}

impl Visitor<'_> for RangeVisitor {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if (self.min..=self.max).contains(&v) { Ok(v) } else { Err(self.found(v)) }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(self.found(v)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(self.found(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        Err(self.found(format_args!("{v:?}")))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<u64, E> {
        Err(self.found(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Err(self.found("nothing"))
    }
}

fn empty_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OwnedMxcUri>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => {
            let uri = OwnedMxcUri::from(s);
            if uri.validate().is_err() {
                return Err(de::Error::custom(format!("expected an mxc://server/media URI or \"\", found {s:?}")));
            }
            Ok(Some(uri))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../bridge-config.yaml");

    #[test]
    fn example_config_loads_with_defaults_and_is_not_ready() {
        let config = Config::parse(EXAMPLE).unwrap();
        assert_eq!(config.appservice.port, Port(29340));
        assert_eq!(config.handoff.code_ttl, Duration::from_secs(900));
        assert_eq!(config.handoff.command_prefix, "!handoff");
        let err = config.check_ready_to_serve().unwrap_err();
        assert!(err.contains("homeserver.domain"), "{err}");
    }

    #[test]
    fn bad_port_names_key_and_value() {
        let text = EXAMPLE.replace("port: 29340", "port: abc");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.starts_with("appservice.port: expected a port number 1-65535, found \"abc\""), "{err}");
        let text = EXAMPLE.replace("port: 29340", "port: 70000");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("appservice.port: expected a port number 1-65535, found 70000"), "{err}");
    }

    #[test]
    fn unknown_keys_are_reported() {
        let text = EXAMPLE.replace("    concurrency: 16", "    concurrency: 16\n    concurency: 3");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("unknown key handoff.concurency"), "{err}");
    }

    #[test]
    fn a_homeserver_address_is_an_http_url_with_a_host() {
        for refused in ["", "not a url", "localhost:8008", "ftp://example.org", "http://", "file:///etc/passwd"] {
            assert!(HttpUrl::parse(refused).is_err(), "{refused:?}");
        }
        let url = HttpUrl::parse("https://matrix.example.org/").unwrap();
        assert_eq!(url.as_str(), "https://matrix.example.org");
        assert_eq!(serde_json::to_string(&url).unwrap(), "\"https://matrix.example.org\"");
        assert_eq!(HttpUrl::parse("http://127.0.0.1:8008/base/").unwrap().to_string(), "http://127.0.0.1:8008/base");
    }

    #[test]
    fn missing_homeserver_is_named() {
        let err = Config::parse("database:\n  path: x\n").unwrap_err();
        assert!(err.contains("homeserver"), "{err}");
    }

    #[test]
    fn bad_values_name_their_keys() {
        for (from, to, key) in [
            (
                "code_ttl: 15m",
                "code_ttl: soon",
                "handoff.code_ttl: invalid value: string \"soon\", expected a duration",
            ),
            ("bundle_retention: 7d", "bundle_retention: 7", "handoff.bundle_retention"),
            ("sender: old", "sender: nobody", "handoff.notify.sender"),
            ("address: http://127.0.0.1:8008", "address: localhost:8008", "homeserver.address"),
            ("format: pretty", "format: xml", "logging.format"),
            ("concurrency: 16", "concurrency: 0", "handoff.concurrency"),
            ("max_transfers: 32", "max_transfers: 0", "handoff.max_transfers"),
            ("\"example.org\": user", "\"example.org\": superuser", "handoff.permissions"),
        ] {
            let text = EXAMPLE.replace(from, to);
            assert_ne!(text, EXAMPLE, "{from}");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.starts_with(key), "{key}: {err}");
        }
    }

    #[test]
    fn permissions_most_specific_wins() {
        let text = EXAMPLE.replace(
            "        \"example.org\": user\n",
            "        \"*\": user\n        \"evil.org\": none\n        \"@boss:evil.org\": admin\n",
        );
        let config = Config::parse(&text).unwrap();
        let level = |u: &str| config.permission(&UserId::parse(u).unwrap());
        assert_eq!(level("@a:other.org"), PermissionLevel::User);
        assert_eq!(level("@a:evil.org"), PermissionLevel::None);
        assert_eq!(level("@boss:evil.org"), PermissionLevel::Admin);
    }

    #[test]
    fn empty_permissions_mean_local_users() {
        let text = EXAMPLE
            .replace("        \"example.org\": user\n", "")
            .replace("    permissions:\n", "    permissions: {}\n");
        let config = Config::parse(&text).unwrap();
        let level = |u: &str| config.permission(&UserId::parse(u).unwrap());
        assert_eq!(level("@a:example.org"), PermissionLevel::User);
        assert_eq!(level("@a:elsewhere.org"), PermissionLevel::None);
    }

    #[test]
    fn a_map_that_lets_no_local_user_in_is_noticed() {
        // The example names example.org; an admin who changes only the domain locks everyone out.
        let moved = Config::parse(&EXAMPLE.replace("domain: example.org", "domain: my.org")).unwrap();
        assert!(!moved.lets_in_local_users());
        assert!(Config::parse(EXAMPLE).unwrap().lets_in_local_users());
        let one_user = EXAMPLE
            .replace("domain: example.org", "domain: my.org")
            .replace("\"example.org\": user", "\"@boss:my.org\": admin");
        assert!(Config::parse(&one_user).unwrap().lets_in_local_users());
        let star =
            EXAMPLE.replace("domain: example.org", "domain: my.org").replace("\"example.org\": user", "\"*\": user");
        assert!(Config::parse(&star).unwrap().lets_in_local_users());
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("supersecret".into());
        assert!(!format!("{s:?}").contains("supersecret"));
    }

    /// `database.type: postgres` takes a URI (or a file holding it: the password stays out of
    /// this file); each mistake names its key. The URI never shows in a debug print.
    #[test]
    fn postgres_needs_a_uri_and_says_which_key_is_wrong() {
        let example = include_str!("../bridge-config.yaml");
        let with = |db: &str| Config::parse(&example.replace("database:\n    path: handoff.db", db));
        let ok = with("database:\n    type: postgres\n    uri: postgres://handoff:pw@db/handoff").unwrap();
        assert_eq!(ok.database.kind, DatabaseType::Postgres);
        assert_eq!(ok.database_uri().unwrap().unwrap().expose(), "postgres://handoff:pw@db/handoff");
        assert!(!format!("{:?}", ok.database).contains(":pw@"), "the password in a debug print");
        for (db, key) in [
            ("database:\n    type: postgres", "database.uri: `type: postgres` needs"),
            ("database:\n    type: postgres\n    uri: mysql://x", "expected a postgres://"),
            ("database:\n    uri: postgres://x/y", "set `type: postgres`"),
            ("database:\n    type: postgres\n    uri: postgres://x/y\n    uri_file: f", "not both"),
            ("database:\n    type: oracle", "database.type"),
        ] {
            let err = with(db).unwrap_err();
            assert!(err.contains(key), "{db:?}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db-uri"), "postgres://handoff:pw@db/handoff\n").unwrap();
        let mut from_file = with("database:\n    type: postgres\n    uri_file: db-uri").unwrap();
        from_file.base_dir = dir.path().to_owned();
        assert_eq!(from_file.database_uri().unwrap().unwrap().expose(), "postgres://handoff:pw@db/handoff");
    }
}
