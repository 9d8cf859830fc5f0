//! The only client of the homeserver: typed ruma requests, acting as a user through the acting
//! registration, and waiting out `M_LIMIT_EXCEEDED` and brief outages. Every attempt is counted
//! and timed in [`crate::metrics`] under its endpoint's path template.
//!
//! Requests go through a [`Transport`]: HTTP, or in unit tests an in-memory homeserver
//! ([`fake`]), so the stages that use this client run their real code against it.

#[cfg(test)]
pub mod fake;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::{FutureExt, TryFutureExt};
use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::authenticated_media::get_content;
use ruma::api::client::discovery::get_supported_versions;
use ruma::api::client::media::create_content;
use ruma::api::client::session::login::{self, v3::ApplicationService, v3::LoginInfo};
use ruma::api::client::session::logout;
use ruma::api::client::uiaa::UiaaResponse;
use ruma::api::client::uiaa::{MatrixUserIdentifier, UserIdentifier};
use ruma::api::error::{ErrorKind, FromHttpResponseError};
use ruma::api::{AppserviceUserIdentity, IncomingResponse, OutgoingRequest, SupportedVersions};
use ruma::events::room::MediaSource;
use ruma::events::room::message::{FileInfo, FileMessageEventContent, MessageType, RoomMessageEventContent};
use ruma::{MxcUri, OwnedDeviceId, OwnedUserId, UserId};
use ruma_client::{SupportedPathBuilder, TokenMode};

use crate::attachment::{self, AttachmentError};
use crate::metrics::{self, Outcome, Problem};

type Client = ruma_client::Client<Transport>;

/// How requests reach the homeserver: over HTTP, or to the in-memory [`fake::Fake`] (unit tests
/// only: no test-only path in the code that sends).
#[derive(Clone)]
pub(crate) enum Transport {
    Http(reqwest::Client),
    #[cfg(test)]
    Fake(fake::Fake),
}

impl Transport {
    /// The HTTP client, for what ruma's client can't do (a download read chunk by chunk).
    fn http(&self) -> Result<&reqwest::Client, HsError> {
        match self {
            Transport::Http(http) => Ok(http),
            #[cfg(test)]
            Transport::Fake(_) => Err(HsError::Protocol("the fake homeserver serves no media".into())),
        }
    }
}

/// A request that got no answer is [`HsError::Unreachable`] from the start.
impl ruma_client::HttpClient for Transport {
    type RequestBody = Vec<u8>;
    type ResponseBody = Vec<u8>;
    type Error = HsError;

    async fn send_http_request(&self, req: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, HsError> {
        match self {
            Transport::Http(http) => {
                let req = reqwest::Request::try_from(req).map_err(cannot_reach)?;
                let mut res = http.execute(req).await.map_err(cannot_reach)?;
                let mut answer = http::Response::builder().status(res.status()).version(res.version());
                if let Some(headers) = answer.headers_mut() {
                    std::mem::swap(headers, res.headers_mut());
                }
                let body = res.bytes().await.map_err(cannot_reach)?;
                answer.body(body.into()).map_err(|e| HsError::Protocol(e.to_string()))
            }
            #[cfg(test)]
            Transport::Fake(fake) => fake.answer(req).await,
        }
    }
}

/// What went wrong talking to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum HsError {
    #[error("cannot reach the homeserver: {0}")]
    Unreachable(String),
    #[error("the homeserver answered {status} {errcode}: {message}")]
    Matrix { status: http::StatusCode, kind: ErrorKind, errcode: String, message: String },
    #[error("unexpected answer from the homeserver: {0}")]
    Protocol(String),
}

impl HsError {
    pub fn kind(&self) -> Option<&ErrorKind> {
        match self {
            HsError::Matrix { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// The homeserver answered with a server error (5xx): it is there, but it (or a server it
    /// had to reach) could not do it.
    pub fn is_server_answer(&self) -> bool {
        matches!(self, HsError::Matrix { status, .. } if status.is_server_error())
    }

    /// Worth trying again later: the server was away, overloaded or rate-limiting.
    pub fn is_transient(&self) -> bool {
        match self {
            HsError::Unreachable(_) => true,
            HsError::Matrix { status, kind, .. } => {
                matches!(kind, ErrorKind::LimitExceeded(_)) || status.is_server_error()
            }
            HsError::Protocol(_) => false,
        }
    }

    /// What `/health` says of it: a category, never an address.
    pub fn problem(&self) -> Problem {
        match self {
            HsError::Unreachable(_) => Problem::HomeserverUnreachable,
            HsError::Matrix { status, .. } if status.is_server_error() => Problem::HomeserverUnreachable,
            HsError::Matrix {
                kind: ErrorKind::UnknownToken(_) | ErrorKind::MissingToken | ErrorKind::Forbidden,
                ..
            } => Problem::TokenRefused,
            HsError::Matrix { status, .. } if *status == http::StatusCode::UNAUTHORIZED => Problem::TokenRefused,
            HsError::Matrix { .. } | HsError::Protocol(_) => Problem::HomeserverError,
        }
    }

    /// How the request ended, for [`metrics::homeserver_request`].
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            HsError::Unreachable(_) => Outcome::Unreachable,
            HsError::Matrix { kind: ErrorKind::LimitExceeded(_), .. } => Outcome::RateLimited,
            HsError::Matrix { status, .. } if status.is_server_error() => Outcome::ServerError,
            HsError::Matrix { .. } => Outcome::Refused,
            HsError::Protocol(_) => Outcome::Invalid,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        let HsError::Matrix { kind: ErrorKind::LimitExceeded(data), .. } = self else {
            return None;
        };
        match data.retry_after.as_ref()? {
            ruma::api::error::RetryAfter::Delay(d) => Some(*d),
            ruma::api::error::RetryAfter::DateTime(t) => {
                Some(t.duration_since(std::time::SystemTime::now()).unwrap_or_default())
            }
        }
    }
}

/// The error types of ruma's endpoints, seen as a Matrix error where there is one.
pub trait EndpointError: ruma::api::EndpointError + std::fmt::Display {
    fn matrix_error(&self) -> Option<&ruma::api::error::Error>;
}

impl EndpointError for ruma::api::error::Error {
    fn matrix_error(&self) -> Option<&ruma::api::error::Error> {
        Some(self)
    }
}

impl EndpointError for UiaaResponse {
    fn matrix_error(&self) -> Option<&ruma::api::error::Error> {
        match self {
            UiaaResponse::MatrixError(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: EndpointError> From<ruma_client::Error<HsError, E>> for HsError {
    fn from(err: ruma_client::Error<HsError, E>) -> Self {
        match err {
            ruma_client::Error::Response(e) => e,
            ruma_client::Error::FromHttpResponse(FromHttpResponseError::Server(e)) => match e.matrix_error() {
                Some(e) => {
                    let (kind, message) = match &e.body {
                        ruma::api::error::ErrorBody::Standard(b) => (b.kind.clone(), b.message.clone()),
                        other => (ErrorKind::Unknown, format!("{other:?}")),
                    };
                    HsError::Matrix { status: e.status_code, errcode: kind.errcode().to_string(), kind, message }
                }
                None => HsError::Protocol(e.to_string()),
            },
            other => HsError::Protocol(other.to_string()),
        }
    }
}

/// reqwest's Display hides the cause ("error sending request"); show the root one.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// How hard to try before giving up on a request.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all, including the first.
    pub attempts: u32,
    /// The first wait after a transient failure; doubles each time.
    pub backoff: Duration,
    /// No single wait is longer than this.
    pub max_wait: Duration,
    /// Whether the homeserver's own 5xx answers are retried. A request that makes it reach
    /// another server (an invite to a remote user, a join through via servers) is answered 5xx
    /// when that server is away: its caller decides how long that one is worth waiting for.
    pub server_errors: bool,
    /// The one clock of a request, from its first attempt: whatever fails (no answer in time, a
    /// refused connection, a 5xx, a rate limit), nothing is tried or waited for after it, and an
    /// attempt still running then is cut off. `None`: as long as the attempts last.
    pub deadline: Option<Duration>,
}

impl Retry {
    /// For start-up checks: one attempt, so a wrong address fails at once.
    pub const NONE: Retry =
        Retry { attempts: 1, backoff: Duration::ZERO, max_wait: Duration::ZERO, server_errors: true, deadline: None };
    /// For ordinary work such as bot replies.
    pub const DEFAULT: Retry = Retry {
        attempts: 6,
        backoff: Duration::from_millis(250),
        max_wait: Duration::from_secs(30),
        server_errors: true,
        deadline: None,
    };

    /// The same, leaving the homeserver's 5xx answers to the caller ([`Retry::server_errors`]).
    pub const fn without_server_errors(self) -> Retry {
        Retry { server_errors: false, ..self }
    }

    /// The same, giving up `deadline` after the first attempt ([`Retry::deadline`]).
    pub const fn within(self, deadline: Duration) -> Retry {
        Retry { deadline: Some(deadline), ..self }
    }
}

/// The longest a single request may take, whatever the HTTP client it was given: a homeserver
/// that accepts the connection and never answers costs this much, not a stuck task.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(60);

/// The last wait a homeserver's rate limit asked of this process (`retry_after_ms`), and when:
/// what a device-side import shows beside its progress. (A process-wide record: one person's
/// command line has one homeserver's limits to show.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub at: std::time::Instant,
    pub wait: Duration,
}

static LAST_RATE_LIMIT: std::sync::Mutex<Option<RateLimited>> = std::sync::Mutex::new(None);

impl RateLimited {
    fn asked(wait: Duration) {
        *LAST_RATE_LIMIT.lock().expect("rate limit lock") = Some(RateLimited { at: std::time::Instant::now(), wait });
    }

    /// The last wait asked, if any was.
    pub fn last() -> Option<RateLimited> {
        *LAST_RATE_LIMIT.lock().expect("rate limit lock")
    }
}

/// The most one request waits in all for the homeserver's rate limits (`retry_after_ms`).
pub const RATE_LIMITS_IN_ALL: Duration = Duration::from_secs(30 * 60);

/// The least time an attempt before a deadline is given: no wait ends later than this before it.
const LAST_ATTEMPT: Duration = Duration::from_millis(500);

/// The one way handoff tries again (backon): a wait that doubles from `first` to `longest`, at
/// most `retries` times, never past `until`; a rate limit's `retry_after_ms` is the next wait,
/// in full and without spending a try ([`RATE_LIMITS_IN_ALL`]). Every wait gives back the budget slot of the room it is for while it lasts
/// ([`crate::budget::away`]), and, being a future, ends the moment its caller drops it (a cancel).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub longest: Duration,
    /// Tries after the first; `None`: no limit but `until`.
    pub retries: Option<usize>,
    pub until: Option<Instant>,
}

impl Backoff {
    pub const fn new(first: Duration, longest: Duration) -> Backoff {
        Backoff { first, longest, retries: None, until: None }
    }

    pub const fn retries(self, retries: usize) -> Backoff {
        Backoff { retries: Some(retries), ..self }
    }

    pub const fn until(self, until: Option<Instant>) -> Backoff {
        Backoff { until, ..self }
    }

    /// The waits themselves, without a deadline (for a caller with a loop of its own).
    pub fn builder(&self) -> backon::ExponentialBuilder {
        let builder =
            backon::ExponentialBuilder::new().with_min_delay(self.first).with_max_delay(self.longest).with_factor(2.0);
        match self.retries {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        }
    }

    /// Runs `attempt` until it succeeds, fails in a way `again` says is not worth another try,
    /// the tries are spent or the next one would start after `until`: then the last error.
    pub async fn run<T, E, F, Fut>(self, attempt: F, mut again: impl FnMut(&E) -> bool) -> Result<T, E>
    where
        E: Transient + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        use backon::Retryable as _;
        let until = self.until;
        // A client that tries once (Retry::NONE) leaves every wait to its caller.
        let once = self.retries == Some(0);
        let mut limited = Duration::ZERO;
        attempt
            .retry(self.builder())
            .when(|e| again(e))
            .adjust(move |e, next| {
                // A rate limit is waited out as the homeserver asks, spending no try, up to
                // RATE_LIMITS_IN_ALL per request (a Synapse at its defaults asks up to 100 s for a
                // join to another server); any other failure spends one.
                let wait = match e.retry_after() {
                    Some(asked) if !once && limited + asked <= RATE_LIMITS_IN_ALL => {
                        limited += asked;
                        RateLimited::asked(asked);
                        asked
                    }
                    _ => next?,
                };
                let Some(until) = until else { return Some(wait) };
                // The last attempt has a moment to be answered in, not none.
                let left = until.saturating_duration_since(Instant::now()).checked_sub(LAST_ATTEMPT)?;
                (!left.is_zero()).then(|| wait.min(left))
            })
            .notify(|e, wait| tracing::debug!(error = %e, ?wait, "transient homeserver error, retrying"))
            .sleep(|wait| crate::budget::away(tokio::time::sleep(wait)))
            .await
    }
}

/// `attempt`, cut off at [`REQUEST_LIMIT`] or at `until` if sooner, as a homeserver that did not
/// answer ([`HsError::Unreachable`]).
pub async fn within<T, E: From<HsError>>(
    until: Option<Instant>,
    attempt: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let limit = until.map_or(REQUEST_LIMIT, |u| u.saturating_duration_since(Instant::now()).min(REQUEST_LIMIT));
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => {
            // For people: to the second (a deadline's remainder is never round).
            let shown = match limit.as_secs_f64().round() as u64 {
                0 => Duration::from_millis(limit.as_millis() as u64),
                secs => Duration::from_secs(secs),
            };
            Err(HsError::Unreachable(format!("no answer within {}", humantime::format_duration(shown))).into())
        }
    }
}

/// A client of the homeserver holding one appservice token.
#[derive(Clone)]
pub struct Homeserver {
    client: Client,
    retry: Retry,
    address: String,
    /// For the requests ruma's client can't make, such as a download read chunk by chunk.
    token: String,
    transport: Transport,
    versions: SupportedVersions,
    /// Whom [`Homeserver::send`] acts as (`?user_id=`); the registration's own user when `None`.
    user: Option<OwnedUserId>,
    /// The token is a user's own (the device side), not an appservice's: it acts as that user
    /// alone, and asserts no identity.
    own: bool,
}

impl Homeserver {
    /// Connects with `as_token`: asks `/versions` once, which also proves the address is right.
    pub async fn connect(address: &str, as_token: &str, http: reqwest::Client) -> Result<Self, HsError> {
        Self::connect_through(address, as_token, Transport::Http(http)).await
    }

    /// [`Homeserver::connect`] through any transport.
    pub(crate) async fn connect_through(address: &str, as_token: &str, transport: Transport) -> Result<Self, HsError> {
        let empty = SupportedVersions::from_parts(&[], &BTreeMap::new());
        let bootstrap: Client = ruma_client::Client::builder()
            .homeserver_url(address.to_owned())
            .supported_matrix_versions(empty)
            .http_client(transport.clone())
            .await?;
        let versions = bootstrap.send_request(get_supported_versions::Request::new()).await?.as_supported_versions();
        Self::build(address, as_token, transport, versions).await
    }

    /// Connects with a user's own `access_token` (from a login on the user's device): every
    /// request is that user's, so [`Homeserver::send_as`] asserts nothing.
    pub async fn connect_user(address: &str, access_token: &str, http: reqwest::Client) -> Result<Self, HsError> {
        Self::connect_user_through(address, access_token, Transport::Http(http)).await
    }

    /// [`Homeserver::connect_user`] through any transport.
    pub(crate) async fn connect_user_through(
        address: &str,
        access_token: &str,
        transport: Transport,
    ) -> Result<Self, HsError> {
        let hs = Self::connect_through(address, access_token, transport).await?;
        let client = ruma_client::Client::builder()
            .homeserver_url(address.to_owned())
            .access_token(Some(access_token.to_owned()))
            .supported_matrix_versions(hs.versions.clone())
            .http_client(hs.transport.clone())
            .await?;
        Ok(Homeserver { client, own: true, ..hs })
    }

    /// The same homeserver with another appservice token (no second `/versions`).
    pub async fn with_token(&self, as_token: &str) -> Result<Self, HsError> {
        Self::build(&self.address, as_token, self.transport.clone(), self.versions.clone()).await
    }

    async fn build(
        address: &str,
        as_token: &str,
        transport: Transport,
        versions: SupportedVersions,
    ) -> Result<Self, HsError> {
        let client = ruma_client::Client::builder()
            .homeserver_url(address.to_owned())
            .access_token(Some(as_token.to_owned()))
            .token_mode(TokenMode::AppService)
            .supported_matrix_versions(versions.clone())
            .http_client(transport.clone())
            .await?;
        Ok(Homeserver {
            client,
            retry: Retry::DEFAULT,
            address: address.to_owned(),
            token: as_token.to_owned(),
            transport,
            versions,
            user: None,
            own: false,
        })
    }

    /// The same client acting as `user` (a user of the registration's namespace) by default.
    pub fn as_user(&self, user: OwnedUserId) -> Self {
        Homeserver { user: Some(user), ..self.clone() }
    }

    pub fn with_retry(&self, retry: Retry) -> Self {
        Homeserver { retry, ..self.clone() }
    }

    /// Sends a request as this client's user ([`Homeserver::as_user`]), or as the registration's
    /// own user (`sender_localpart`).
    pub async fn send<R>(&self, request: R) -> Result<R::IncomingResponse, HsError>
    where
        R: OutgoingRequest + Clone,
        R::EndpointError: EndpointError,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: SupportedPathBuilder,
    {
        match &self.user {
            Some(user) => self.send_as(user, request).await,
            None => self.send_with_token(request).await,
        }
    }

    /// Sends a request with the token alone: as the registration's own user (whoever this client
    /// acts as), or as the user whose own token it is.
    async fn send_with_token<R>(&self, request: R) -> Result<R::IncomingResponse, HsError>
    where
        R: OutgoingRequest + Clone,
        R::EndpointError: EndpointError,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: SupportedPathBuilder,
    {
        // Boxed, here and in `send_as`: a request's future with its retries and deadline is a few
        // KiB, and every step awaiting one would otherwise carry that much inline while it waits
        // for anything (a transfer's whole future held in a crowd that waits for a slot).
        Box::pin(self.retrying(endpoint_of::<R>(&self.client), || self.client.send_request(request.clone()))).await
    }

    /// Sends a request as `user` (identity assertion with `?user_id=`; with a user's own token, as
    /// that user).
    pub async fn send_as<R>(&self, user: &UserId, request: R) -> Result<R::IncomingResponse, HsError>
    where
        R: OutgoingRequest + Clone,
        R::EndpointError: EndpointError,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: SupportedPathBuilder,
    {
        if self.own {
            return self.send_with_token(request).await;
        }
        let endpoint = endpoint_of::<R>(&self.client);
        Box::pin(
            self.retrying(endpoint, || self.client.send_request_as(AppserviceUserIdentity::new(user), request.clone())),
        )
        .await
    }

    /// Logs the registration's own user in with `m.login.application_service`, as a new device or
    /// (with `device`) again as that device. The answer's token belongs to the device, not to the
    /// registration: it is what a client with end-to-end encryption (the bot's device) uses.
    pub async fn login_device(
        &self,
        localpart: &str,
        device: Option<OwnedDeviceId>,
        display_name: &str,
    ) -> Result<login::v3::Response, HsError> {
        let identifier = UserIdentifier::Matrix(MatrixUserIdentifier::new(localpart.to_owned()));
        let mut req = login::v3::Request::new(LoginInfo::ApplicationService(ApplicationService::new(identifier)));
        req.device_id = device;
        req.initial_device_display_name = Some(display_name.to_owned());
        // The user is named in the body: no `?user_id=` beside it.
        self.send_with_token(req).await
    }

    /// Ends the session of a device's `token` (the homeserver deletes that device and its keys).
    pub async fn logout_token(&self, token: &str) -> Result<(), HsError> {
        let client: Client = ruma_client::Client::builder()
            .homeserver_url(self.address.clone())
            .access_token(Some(token.to_owned()))
            .supported_matrix_versions(self.versions.clone())
            .http_client(self.transport.clone())
            .await?;
        let endpoint = endpoint_of::<logout::v3::Request>(&client);
        self.retrying(endpoint, || client.send_request(logout::v3::Request::new())).await?;
        Ok(())
    }

    /// Uploads `bytes` (as this registration's user) as an encrypted attachment and returns the
    /// `m.file` message that shows it.
    ///
    /// The media repository serves the upload to anyone who has its media ID; the key needed to read
    /// it lives only in the returned event, so only the members of the room it is sent to can open it.
    /// Clients (Element and others) decrypt `file` attachments in unencrypted rooms too.
    pub async fn upload_encrypted_file(
        &self,
        name: &str,
        mime: &str,
        bytes: Vec<u8>,
    ) -> Result<RoomMessageEventContent, HsError> {
        let (cipher, key) = attachment::encrypt(&bytes);
        let mut upload = create_content::v3::Request::new(cipher);
        // Neither the real name nor the real type: the repository learns only a size.
        upload.content_type = Some("application/octet-stream".into());
        let url = self.send(upload).await?.content_uri;
        Ok(file_message(name, mime, bytes.len(), MediaSource::Encrypted(Box::new(key.into_file(url)))))
    }

    /// Downloads the file of `source` as this registration's user, decrypting (and checking) an
    /// encrypted attachment. Reads at most `max` bytes, whatever the homeserver or the event says
    /// the size is: a longer body is cut off with [`DownloadError::TooLarge`].
    pub async fn download(&self, source: &MediaSource, max: u64) -> Result<Vec<u8>, DownloadError> {
        let url = match source {
            MediaSource::Plain(url) => url,
            MediaSource::Encrypted(file) => &file.url,
        };
        let endpoint = metrics::endpoint::<get_content::v1::Request>(Cow::Borrowed(&self.versions));
        let until = self.until();
        let bytes = self
            .with_retries(until, || {
                let start = Instant::now();
                within(until, self.download_once(url, max)).inspect(move |result| {
                    let outcome = match result {
                        Ok(_) => Outcome::Ok,
                        Err(DownloadError::Hs(e)) => e.outcome(),
                        Err(DownloadError::TooLarge { .. }) => Outcome::Invalid,
                        // Nothing was sent.
                        Err(DownloadError::BadUrl(_) | DownloadError::Attachment(_)) => return,
                    };
                    metrics::homeserver_request(endpoint, outcome, start.elapsed());
                })
            })
            .await?;
        match source {
            MediaSource::Plain(_) => Ok(bytes),
            MediaSource::Encrypted(file) => Ok(attachment::decrypt(&bytes, file)?),
        }
    }

    async fn download_once(&self, url: &MxcUri, max: u64) -> Result<Vec<u8>, DownloadError> {
        let request =
            get_content::v1::Request::from_uri(url).map_err(|_| DownloadError::BadUrl(url.as_str().to_owned()))?;
        // ruma builds the request (path for the server's versions, token); reqwest streams the answer.
        let request: http::Request<Vec<u8>> = request
            .try_into_http_request(
                &self.address,
                SendAccessToken::Appservice(&self.token),
                std::borrow::Cow::Borrowed(&self.versions),
            )
            .map_err(|e| HsError::Protocol(e.to_string()))?;
        let request = reqwest::Request::try_from(request).map_err(|e| HsError::Protocol(describe_reqwest(&e)))?;
        let mut response = self.transport.http()?.execute(request).await.map_err(cannot_reach)?;
        let status = response.status();
        if !status.is_success() {
            let body = read_capped(&mut response, ERROR_BODY_MAX).await?.unwrap_or_default();
            let answer =
                http::Response::builder().status(status).body(body).map_err(|e| HsError::Protocol(e.to_string()))?;
            return Err(match get_content::v1::Response::try_from_http_response(answer) {
                Err(e) => HsError::from(ruma_client::Error::<HsError, _>::FromHttpResponse(e)),
                Ok(_) => HsError::Protocol(format!("the homeserver answered {status} with a file")),
            }
            .into());
        }
        // A declared length is enough to refuse; it is never enough to accept.
        if response.content_length().is_some_and(|n| n > max) {
            return Err(DownloadError::TooLarge { max });
        }
        read_capped(&mut response, max).await?.ok_or(DownloadError::TooLarge { max })
    }

    /// The one path of ruma requests: each attempt counted and timed under `endpoint`.
    async fn retrying<T, E, F, Fut>(&self, endpoint: &'static str, mut attempt: F) -> Result<T, HsError>
    where
        E: EndpointError,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ruma_client::Error<HsError, E>>>,
    {
        let until = self.until();
        self.with_retries(until, || {
            let start = Instant::now();
            within(until, attempt().map_err(HsError::from)).inspect(move |result| {
                let outcome = result.as_ref().map_or_else(HsError::outcome, |_| Outcome::Ok);
                metrics::homeserver_request(endpoint, outcome, start.elapsed());
            })
        })
        .await
    }

    /// The clock of one request under this client's [`Retry`], from now.
    fn until(&self) -> Option<Instant> {
        self.retry.deadline.map(|d| Instant::now() + d)
    }

    /// Tries again what is worth it: transient failures (5xx only if [`Retry::server_errors`]),
    /// as often as [`Retry::attempts`] and as long as [`Retry::deadline`] allow.
    async fn with_retries<T, E, F, Fut>(&self, until: Option<Instant>, attempt: F) -> Result<T, E>
    where
        E: Transient + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let retry = self.retry;
        Backoff::new(retry.backoff, retry.max_wait)
            .retries(retry.attempts.saturating_sub(1) as usize)
            .until(until)
            .run(attempt, |e| e.is_transient() && (retry.server_errors || !e.server_answer()))
            .await
    }
}

/// The metrics label of `R` as `client` sends it: the path template for the homeserver's versions.
fn endpoint_of<R>(client: &Client) -> &'static str
where
    R: OutgoingRequest,
    R::PathBuilder: SupportedPathBuilder,
{
    metrics::endpoint::<R>(R::PathBuilder::get_path_builder_input(client))
}

/// An error that may be worth another attempt ([`Backoff::run`]).
pub trait Transient {
    /// The server was away, overloaded or rate-limiting.
    fn is_transient(&self) -> bool;
    /// The wait the server asked for, if it did.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    /// A 5xx answer of the homeserver ([`HsError::is_server_answer`]).
    fn server_answer(&self) -> bool {
        false
    }
}

impl Transient for HsError {
    fn is_transient(&self) -> bool {
        HsError::is_transient(self)
    }
    fn retry_after(&self) -> Option<Duration> {
        HsError::retry_after(self)
    }
    fn server_answer(&self) -> bool {
        self.is_server_answer()
    }
}

impl Transient for DownloadError {
    fn is_transient(&self) -> bool {
        matches!(self, DownloadError::Hs(e) if e.is_transient())
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            DownloadError::Hs(e) => e.retry_after(),
            _ => None,
        }
    }
    fn server_answer(&self) -> bool {
        matches!(self, DownloadError::Hs(e) if e.is_server_answer())
    }
}

/// Why a file could not be downloaded.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("the file is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("{0:?} is not a media address (mxc://server/id)")]
    BadUrl(String),
    #[error(transparent)]
    Attachment(#[from] AttachmentError),
    #[error(transparent)]
    Hs(#[from] HsError),
}

/// A Matrix error body is small; a longer one is cut, not read.
const ERROR_BODY_MAX: u64 = 64 << 10;

/// The body, chunk by chunk, or `None` as soon as more than `max` bytes have arrived.
async fn read_capped(response: &mut reqwest::Response, max: u64) -> Result<Option<Vec<u8>>, HsError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(cannot_reach)? {
        if (body.len() + chunk.len()) as u64 > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn cannot_reach(e: reqwest::Error) -> HsError {
    HsError::Unreachable(describe_reqwest(&e))
}

/// The `m.file` message for an uploaded file: the real name and type, the plaintext's size.
fn file_message(name: &str, mime: &str, size: usize, source: MediaSource) -> RoomMessageEventContent {
    let mut info = FileInfo::new();
    info.mimetype = Some(mime.into());
    info.size = ruma::UInt::try_from(size).ok();
    let mut file = FileMessageEventContent::new(name.into(), source);
    file.filename = Some(name.into());
    file.info = Some(Box::new(info));
    RoomMessageEventContent::new(MessageType::File(file))
}

#[cfg(test)]
mod tests {
    //! Error paths a real homeserver can't produce on demand (the acting registration is exempt from
    //! rate limits), against a small mock on loopback.
    use super::*;
    use axum::Json;
    use axum::http::StatusCode;
    use axum::routing::get;
    use futures_util::StreamExt;
    use ruma::api::client::account::whoami;
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use crate::transfer::PATIENT;

    /// A homeserver whose `whoami` answers with `script[n]` on its n-th call, then 200.
    async fn mock(script: Vec<(u16, serde_json::Value)>) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let script = Arc::new(script);
        let app = axum::Router::new()
            .route("/_matrix/client/versions", get(|| async { Json(json!({"versions": ["v1.11"]})) }))
            .route(
                "/_matrix/client/v3/account/whoami",
                get(move || {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let script = script.clone();
                    async move {
                        match script.get(n) {
                            Some((status, body)) => (StatusCode::from_u16(*status).unwrap(), Json(body.clone())),
                            None => (StatusCode::OK, Json(json!({"user_id": "@a:x.org"}))),
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), calls)
    }

    #[tokio::test]
    async fn limit_exceeded_waits_retry_after_ms_then_succeeds() {
        let limited = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 400});
        let (url, calls) = mock(vec![(429, limited)]).await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        let start = Instant::now();
        let who = hs.send(whoami::v3::Request::new()).await.unwrap();
        assert_eq!(who.user_id, "@a:x.org");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(start.elapsed() >= Duration::from_millis(400), "waited {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn server_errors_are_retried_and_client_errors_are_not() {
        let oops = json!({"errcode": "M_UNKNOWN", "error": "oops"});
        let (url, calls) = mock(vec![(502, oops.clone()), (503, oops)]).await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        assert!(hs.send(whoami::v3::Request::new()).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let forbidden = json!({"errcode": "M_FORBIDDEN", "error": "no"});
        let (url, calls) = mock(vec![(403, forbidden)]).await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        let err = hs.send(whoami::v3::Request::new()).await.unwrap_err();
        assert!(matches!(err.kind(), Some(ErrorKind::Forbidden)), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// The one clock of a request with a deadline: spent whatever fails, a 5xx answer, no
    /// answer at all (the attempt is cut off), or a refused connection; then the last error.
    #[tokio::test]
    async fn a_deadline_covers_5xx_silence_and_refused_connections_alike() {
        let patience = PATIENT.within(Duration::from_secs(2));
        let timed = |hs: Homeserver| async move {
            let start = Instant::now();
            let err = hs.with_retry(patience).send(whoami::v3::Request::new()).await.unwrap_err();
            let took = start.elapsed();
            // Up to the deadline, less the last attempt's time if it was answered at once.
            assert!(took >= Duration::from_millis(1400) && took < Duration::from_millis(3000), "took {took:?}: {err}");
            err
        };

        let oops = json!({"errcode": "M_UNKNOWN", "error": "oops"});
        let (url, calls) = mock(vec![(502, oops); 1000]).await;
        let err = timed(Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap()).await;
        assert!(err.is_server_answer(), "{err}");
        assert!(calls.load(Ordering::SeqCst) >= 3, "tried again meanwhile");

        let (url, calls) = silent().await;
        let err = timed(Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap()).await;
        assert!(matches!(err, HsError::Unreachable(_)), "{err}");
        assert_eq!(err.to_string(), "cannot reach the homeserver: no answer within 2s");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one attempt, cut at the deadline");

        // Connected, then the homeserver goes away: its port refuses.
        let (url, stop) = going_away().await;
        // No kept-alive connection: the one to `/versions` would outlive the listener.
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let hs = Homeserver::connect(&url, "token", http).await.unwrap();
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = timed(hs).await;
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }

    /// A homeserver that answers `/versions`, then takes every `whoami` and never answers it.
    async fn silent() -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let app = axum::Router::new()
            .route("/_matrix/client/versions", get(|| async { Json(json!({"versions": ["v1.11"]})) }))
            .route(
                "/_matrix/client/v3/account/whoami",
                get(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Json<serde_json::Value>>()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), calls)
    }

    /// A homeserver that answers `/versions` until the token is cancelled, then is gone: its
    /// listener and connections closed.
    async fn going_away() -> (String, tokio_util::sync::CancellationToken) {
        let stop = tokio_util::sync::CancellationToken::new();
        let app = axum::Router::new()
            .route("/_matrix/client/versions", get(|| async { Json(json!({"versions": ["v1.11"]})) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                _ = stopped.cancelled() => {}
            }
        });
        (format!("http://{addr}"), stop)
    }

    #[tokio::test]
    async fn an_unreachable_homeserver_says_so() {
        let port = crate::sandbox::free_port();
        let err =
            Homeserver::connect(&format!("http://127.0.0.1:{port}"), "t", reqwest::Client::new()).await.err().unwrap();
        assert!(matches!(err, HsError::Unreachable(_)), "{err}");
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }

    /// The last upload the media mock saw: body, `Content-Type`, query parameters.
    type Upload = (Vec<u8>, String, HashMap<String, String>);

    /// What the media mock saw of the last upload, and how many bytes its endless download served.
    #[derive(Default)]
    struct Media {
        upload: std::sync::Mutex<Option<Upload>>,
        served: AtomicUsize,
    }

    /// A media repository that wants the appservice token: `upload` keeps the bytes, and `download`
    /// serves them back as `up`; `endless` streams forever and `small` is 3000 bytes in three
    /// chunks, both without a length; `big` declares 10 MiB, sends 1000 bytes and stalls.
    async fn media_mock() -> (String, Arc<Media>) {
        use axum::body::{Body, Bytes};
        use axum::extract::{Path, Query, State};
        use axum::http::HeaderMap;
        use axum::response::{IntoResponse, Response};
        use futures_util::stream;

        async fn upload(
            State(media): State<Arc<Media>>,
            headers: HeaderMap,
            Query(query): Query<HashMap<String, String>>,
            body: Bytes,
        ) -> Json<serde_json::Value> {
            let mime = headers.get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            *media.upload.lock().unwrap() = Some((body.to_vec(), mime, query));
            Json(json!({"content_uri": "mxc://x.org/up"}))
        }

        async fn download(
            State(media): State<Arc<Media>>,
            headers: HeaderMap,
            Path((server, id)): Path<(String, String)>,
        ) -> Response {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer token") {
                let body = json!({"errcode": "M_MISSING_TOKEN", "error": "who are you"});
                return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
            }
            let chunk = |n: usize| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; n]));
            match (server.as_str(), id.as_str()) {
                ("x.org", "up") => match &*media.upload.lock().unwrap() {
                    Some((bytes, ..)) => bytes.clone().into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                },
                ("x.org", "endless") => Body::from_stream(stream::repeat_with(move || {
                    media.served.fetch_add(64 << 10, Ordering::SeqCst);
                    chunk(64 << 10)
                }))
                .into_response(),
                ("x.org", "big") => {
                    let stalls = stream::iter([chunk(1000)]).chain(stream::pending());
                    ([("content-length", "10485760")], Body::from_stream(stalls)).into_response()
                }
                ("x.org", "small") => {
                    Body::from_stream(stream::iter([chunk(1000), chunk(1000), chunk(1000)])).into_response()
                }
                _ => {
                    let body = json!({"errcode": "M_NOT_FOUND", "error": "Not found"});
                    (StatusCode::NOT_FOUND, Json(body)).into_response()
                }
            }
        }

        let media = Arc::new(Media::default());
        let app = axum::Router::new()
            .route("/_matrix/client/versions", get(|| async { Json(json!({"versions": ["v1.11"]})) }))
            .route("/_matrix/media/v3/upload", axum::routing::post(upload))
            .route("/_matrix/client/v1/media/download/{server}/{id}", get(download))
            .with_state(media.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), media)
    }

    fn plain(id: &str) -> MediaSource {
        MediaSource::Plain(format!("mxc://x.org/{id}").into())
    }

    #[tokio::test]
    async fn a_download_without_a_length_stops_at_the_cap() {
        let (url, media) = media_mock().await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        let max = 1 << 20;
        // The endless body never ends: a download that read on would never return.
        let err = tokio::time::timeout(Duration::from_secs(20), hs.download(&plain("endless"), max))
            .await
            .expect("the download stops at the cap")
            .unwrap_err();
        assert!(matches!(err, DownloadError::TooLarge { max: 1048576 }), "{err}");
        assert_eq!(err.to_string(), "the file is larger than 1048576 bytes");
        // The connection was dropped, so the server stopped sending (after what socket buffers took).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let served = media.served.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(media.served.load(Ordering::SeqCst), served, "still serving");
        assert!(served < 32 << 20, "served {served} bytes");

        // Within the cap (exactly at it), a chunked body is returned whole; one byte less is too little.
        assert_eq!(hs.download(&plain("small"), 3000).await.unwrap(), vec![7u8; 3000]);
        assert!(matches!(hs.download(&plain("small"), 2999).await, Err(DownloadError::TooLarge { max: 2999 })));
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_refused_before_the_body() {
        let (url, _) = media_mock().await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        // `big` sends 1000 bytes of its declared 10 MiB and then stalls: only the header can end this.
        let result = tokio::time::timeout(Duration::from_secs(10), hs.download(&plain("big"), 1 << 20))
            .await
            .expect("refused on Content-Length");
        assert!(matches!(result, Err(DownloadError::TooLarge { max: 1048576 })), "{result:?}");
    }

    #[tokio::test]
    async fn download_errors_say_what_the_homeserver_answered() {
        let (url, _) = media_mock().await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        let err = hs.download(&plain("gone"), 1000).await.unwrap_err();
        assert!(matches!(&err, DownloadError::Hs(e) if matches!(e.kind(), Some(ErrorKind::NotFound))), "{err:?}");
        assert_eq!(err.to_string(), "the homeserver answered 404 Not Found M_NOT_FOUND: Not found");

        let stranger = Homeserver::connect(&url, "not the token", reqwest::Client::new()).await.unwrap();
        let err = stranger.download(&plain("small"), 3000).await.unwrap_err();
        assert!(err.to_string().contains("M_MISSING_TOKEN"), "{err}");
    }

    #[tokio::test]
    async fn uploads_are_encrypted_and_download_decrypts_them() {
        let (url, media) = media_mock().await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        let text = b"[2024-01-01T00:00:00Z] @carol:x.org: my secret plans".to_vec();
        let content = hs.upload_encrypted_file("history.txt", "text/plain", text.clone()).await.unwrap();

        // The repository gets ciphertext with neither the name nor the type.
        let (uploaded, mime, query) = media.upload.lock().unwrap().clone().unwrap();
        assert_ne!(uploaded, text);
        assert!(!uploaded.windows(6).any(|w| w == b"secret"));
        assert_eq!(mime, "application/octet-stream");
        assert!(query.is_empty(), "{query:?}");

        // The event carries the key, the real name, type and size, and no plain `url`.
        let json = serde_json::to_value(&content).unwrap();
        assert_eq!(json["msgtype"], "m.file");
        assert_eq!(json["body"], "history.txt");
        assert_eq!(json["filename"], "history.txt");
        assert_eq!(json["info"], json!({"mimetype": "text/plain", "size": text.len()}));
        assert!(json.get("url").is_none(), "{json}");
        assert_eq!(json["file"]["url"], "mxc://x.org/up");
        assert_eq!(json["file"]["v"], "v2");

        // What a receiver parses from the event opens to the plaintext, through `download`.
        let MessageType::File(file) = serde_json::from_value::<RoomMessageEventContent>(json).unwrap().msgtype else {
            panic!("not a file");
        };
        assert!(matches!(file.source, MediaSource::Encrypted(_)));
        assert_eq!(hs.download(&file.source, 1000).await.unwrap(), text);

        // A changed byte in the repository is caught.
        media.upload.lock().unwrap().as_mut().unwrap().0[5] ^= 1;
        let err = hs.download(&file.source, 1000).await.unwrap_err();
        assert!(matches!(err, DownloadError::Attachment(AttachmentError::HashMismatch)), "{err}");
    }
}
