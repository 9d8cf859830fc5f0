//! The only client of the homeserver: typed ruma requests, acting as a user through the acting
//! registration, and waiting out `M_LIMIT_EXCEEDED` and brief outages.

use std::collections::BTreeMap;
use std::time::Duration;

use ruma::UserId;
use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::discovery::get_supported_versions;
use ruma::api::client::uiaa::UiaaResponse;
use ruma::api::error::{ErrorKind, FromHttpResponseError};
use ruma::api::{AppserviceUserIdentity, OutgoingRequest, SupportedVersions};
use ruma_client::{SupportedPathBuilder, TokenMode};

type Client = ruma_client::Client<reqwest::Client>;

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

impl<E: EndpointError> From<ruma_client::Error<reqwest::Error, E>> for HsError {
    fn from(err: ruma_client::Error<reqwest::Error, E>) -> Self {
        match err {
            ruma_client::Error::Response(e) => HsError::Unreachable(describe_reqwest(&e)),
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
}

impl Retry {
    /// For start-up checks: one attempt, so a wrong address fails at once.
    pub const NONE: Retry = Retry { attempts: 1, backoff: Duration::ZERO, max_wait: Duration::ZERO };
    /// For ordinary work such as bot replies.
    pub const DEFAULT: Retry =
        Retry { attempts: 6, backoff: Duration::from_millis(250), max_wait: Duration::from_secs(30) };
}

/// A client of the homeserver holding one appservice token.
#[derive(Clone)]
pub struct Homeserver {
    client: Client,
    retry: Retry,
    address: String,
    http: reqwest::Client,
    versions: SupportedVersions,
}

impl Homeserver {
    /// Connects with `as_token`: asks `/versions` once, which also proves the address is right.
    pub async fn connect(address: &str, as_token: &str, http: reqwest::Client) -> Result<Self, HsError> {
        let empty = SupportedVersions::from_parts(&[], &BTreeMap::new());
        let bootstrap: Client = ruma_client::Client::builder()
            .homeserver_url(address.to_owned())
            .supported_matrix_versions(empty)
            .http_client(http.clone())
            .await?;
        let versions = bootstrap.send_request(get_supported_versions::Request::new()).await?.as_supported_versions();
        Self::build(address, as_token, http, versions).await
    }

    /// The same homeserver with another appservice token (no second `/versions`).
    pub async fn with_token(&self, as_token: &str) -> Result<Self, HsError> {
        Self::build(&self.address, as_token, self.http.clone(), self.versions.clone()).await
    }

    async fn build(
        address: &str,
        as_token: &str,
        http: reqwest::Client,
        versions: SupportedVersions,
    ) -> Result<Self, HsError> {
        let client = ruma_client::Client::builder()
            .homeserver_url(address.to_owned())
            .access_token(Some(as_token.to_owned()))
            .token_mode(TokenMode::AppService)
            .supported_matrix_versions(versions.clone())
            .http_client(http.clone())
            .await?;
        Ok(Homeserver { client, retry: Retry::DEFAULT, address: address.to_owned(), http, versions })
    }

    pub fn with_retry(&self, retry: Retry) -> Self {
        Homeserver { retry, ..self.clone() }
    }

    /// Sends a request as the registration's own user (`sender_localpart`).
    pub async fn send<R>(&self, request: R) -> Result<R::IncomingResponse, HsError>
    where
        R: OutgoingRequest + Clone,
        R::EndpointError: EndpointError,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: SupportedPathBuilder,
    {
        self.retrying(|| self.client.send_request(request.clone())).await
    }

    /// Sends a request as `user` (identity assertion with `?user_id=`).
    pub async fn send_as<R>(&self, user: &UserId, request: R) -> Result<R::IncomingResponse, HsError>
    where
        R: OutgoingRequest + Clone,
        R::EndpointError: EndpointError,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: SupportedPathBuilder,
    {
        self.retrying(|| self.client.send_request_as(AppserviceUserIdentity::new(user), request.clone())).await
    }

    /// Uploads a file (as this registration's user) and returns the `m.file` message that shows it.
    pub async fn upload_file(
        &self,
        name: &str,
        mime: &str,
        bytes: Vec<u8>,
    ) -> Result<ruma::events::room::message::RoomMessageEventContent, HsError> {
        use ruma::events::room::MediaSource;
        use ruma::events::room::message::{FileInfo, FileMessageEventContent, MessageType, RoomMessageEventContent};
        let size = bytes.len();
        let mut upload = ruma::api::client::media::create_content::v3::Request::new(bytes);
        upload.filename = Some(name.into());
        upload.content_type = Some(mime.into());
        let uri = self.send(upload).await?.content_uri;
        let mut info = FileInfo::new();
        info.mimetype = Some(mime.into());
        info.size = ruma::UInt::try_from(size).ok();
        let mut file = FileMessageEventContent::new(name.into(), MediaSource::Plain(uri));
        file.filename = Some(name.into());
        file.info = Some(Box::new(info));
        Ok(RoomMessageEventContent::new(MessageType::File(file)))
    }

    async fn retrying<T, E, F, Fut>(&self, mut attempt: F) -> Result<T, HsError>
    where
        E: EndpointError,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ruma_client::Error<reqwest::Error, E>>>,
    {
        let mut wait = self.retry.backoff;
        let mut tries = 0;
        loop {
            tries += 1;
            match attempt().await.map_err(HsError::from) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && tries < self.retry.attempts => {
                    let delay = e.retry_after().unwrap_or(wait).min(self.retry.max_wait);
                    tracing::debug!(error = %e, ?delay, "transient homeserver error, retrying");
                    tokio::time::sleep(delay).await;
                    wait = (wait * 2).min(self.retry.max_wait);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Error paths a real homeserver can't produce on demand (the acting registration is exempt from
    //! rate limits), against a small mock on loopback.
    use super::*;
    use axum::Json;
    use axum::http::StatusCode;
    use axum::routing::get;
    use ruma::api::client::account::whoami;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

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

    #[tokio::test]
    async fn an_unreachable_homeserver_says_so() {
        let port = crate::sandbox::free_port();
        let err =
            Homeserver::connect(&format!("http://127.0.0.1:{port}"), "t", reqwest::Client::new()).await.err().unwrap();
        assert!(matches!(err, HsError::Unreachable(_)), "{err}");
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }
}
