//! `GET /v1/info` (SPEC.md 13.2): the settings and limits the server announces. Cases read
//! their limits from here, and cases that need a setting check it here.

use confab_spec::DecodeLimits;

/// The limits object of `/v1/info` (SPEC.md 4.4).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Limits {
    /// `frame_bytes_max`.
    pub frame_bytes_max: u64,
    /// `collection_len_max`.
    pub collection_len_max: u64,
    /// `nesting_depth_max`.
    pub nesting_depth_max: u64,
    /// `text_bytes_max`.
    pub text_bytes_max: u64,
    /// `replay_batch_max`.
    pub replay_batch_max: u64,
    /// `pending_sends_max`.
    pub pending_sends_max: u64,
    /// `key_packages_per_upload_max`.
    pub key_packages_per_upload_max: u64,
    /// `pre_auth_frames_max`.
    pub pre_auth_frames_max: u64,
    /// `watchlist_max` (SPEC.md 9), when the server has presence.
    #[serde(default)]
    pub watchlist_max: Option<u64>,
    /// `presence_list_max` (SPEC.md 9), when the server has presence.
    #[serde(default)]
    pub presence_list_max: Option<u64>,
    /// `room_members_max` (SPEC.md 10.4), when the server has rooms.
    #[serde(default)]
    pub room_members_max: Option<u64>,
    /// `rooms_per_user_max` (SPEC.md 10.4), when the server has rooms.
    #[serde(default)]
    pub rooms_per_user_max: Option<u64>,
    /// `http_request_timeout_ms` (SPEC.md 11).
    #[serde(default)]
    pub http_request_timeout_ms: Option<u64>,
    /// `connections_per_ip_max` (SPEC.md 11).
    #[serde(default)]
    pub connections_per_ip_max: Option<u64>,
    /// `connections_max` (SPEC.md 11).
    #[serde(default)]
    pub connections_max: Option<u64>,
    /// `bytes_per_user_per_day` (SPEC.md 11).
    #[serde(default)]
    pub bytes_per_user_per_day: Option<u64>,
    /// `conversation_bytes_max` (SPEC.md 11).
    #[serde(default)]
    pub conversation_bytes_max: Option<u64>,
}

/// The presence settings of `/v1/info` (SPEC.md 9).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct PresenceInfo {
    /// `presence_ttl_min_ms`.
    pub presence_ttl_min_ms: u64,
    /// `presence_ttl_max_ms`.
    pub presence_ttl_max_ms: u64,
    /// `presence_grace_ms`.
    pub presence_grace_ms: u64,
    /// `presence_jitter_ms`.
    pub presence_jitter_ms: u64,
}

/// What `/v1/info` announces that the suite reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Info {
    /// Protocol versions spoken.
    pub versions: Vec<u64>,
    /// `heartbeat_interval_ms`.
    pub heartbeat_interval_ms: u64,
    /// `heartbeat_timeout_ms`.
    pub heartbeat_timeout_ms: u64,
    /// The origin clients sign (SPEC.md 5.3), when announced.
    #[serde(default)]
    pub origin: Option<String>,
    /// `auth_timeout_ms`.
    pub auth_timeout_ms: u64,
    /// `clock_skew_max_ms`.
    pub clock_skew_max_ms: u64,
    /// `resume_token_ttl_ms`.
    pub resume_token_ttl_ms: u64,
    /// `retention_ms`, when announced.
    #[serde(default)]
    pub retention_ms: Option<u64>,
    /// `retention_unacked_ms`, when announced.
    #[serde(default)]
    pub retention_unacked_ms: Option<u64>,
    /// `durability` (SPEC.md 6.3): what acknowledged entries survive, when announced.
    #[serde(default)]
    pub durability: Option<String>,
    /// `outbound_queue_max` (SPEC.md 6.4), when announced.
    #[serde(default)]
    pub outbound_queue_max: Option<u64>,
    /// `outbound_queue_bytes_max` (SPEC.md 6.4), when announced.
    #[serde(default)]
    pub outbound_queue_bytes_max: Option<u64>,
    /// The limits.
    pub limits: Limits,
    /// The rate limits, as announced (SPEC.md 11).
    #[serde(default)]
    pub rate_limits: serde_json::Value,
    /// The presence settings, when the server has presence.
    #[serde(default)]
    pub presence: Option<PresenceInfo>,
}

impl Info {
    /// The decode limits the suite applies to what the server sends.
    pub fn decode_limits(&self) -> DecodeLimits {
        let usize_of = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        DecodeLimits {
            frame_bytes_max: usize_of(self.limits.frame_bytes_max),
            ..DecodeLimits::default()
        }
    }

    /// A rate limit's `(per_minute, burst)` from `rate_limits`, if announced.
    pub fn rate_limit(&self, name: &str) -> Option<(u64, u64)> {
        let limit = self.rate_limits.get(name)?;
        Some((
            limit.get("per_minute")?.as_u64()?,
            limit.get("burst")?.as_u64()?,
        ))
    }
}

/// Why the info could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// The URL is not a `ws://` or `wss://` URL.
    #[error("{0:?} is not a ws:// or wss:// URL")]
    Url(String),
    /// The request failed.
    #[error("GET {url}: {error}")]
    Http {
        /// The info URL.
        url: String,
        /// What failed.
        error: String,
    },
    /// The body is not the JSON object of SPEC.md 13.2.
    #[error("GET {url}: the body is not SPEC.md 13.2's info object: {error}")]
    Body {
        /// The info URL.
        url: String,
        /// What is wrong.
        error: String,
    },
}

/// The `http(s)://host:port/v1/info` URL for a gateway's WebSocket URL.
pub fn info_url(ws_url: &str) -> Result<String, InfoError> {
    http_url(ws_url, "/v1/info")
}

/// The `http(s)://host:port{path}` URL on the host of a gateway's WebSocket URL.
pub fn http_url(ws_url: &str, path: &str) -> Result<String, InfoError> {
    let (scheme, rest) = if let Some(rest) = ws_url.strip_prefix("ws://") {
        ("http", rest)
    } else if let Some(rest) = ws_url.strip_prefix("wss://") {
        ("https", rest)
    } else {
        return Err(InfoError::Url(ws_url.to_owned()));
    };
    let host = rest.split('/').next().unwrap_or(rest);
    Ok(format!("{scheme}://{host}{path}"))
}

/// Reads `/v1/info` of the gateway at `ws_url`.
pub async fn fetch(ws_url: &str) -> Result<Info, InfoError> {
    let url = info_url(ws_url)?;
    let body = get_text(&url).await?;
    serde_json::from_str(&body).map_err(|e| InfoError::Body {
        url,
        error: e.to_string(),
    })
}

/// The body of `GET url` (a 2xx answer), within 10 s.
pub async fn get_text(url: &str) -> Result<String, InfoError> {
    let url = url.to_owned();
    let request_url = url.clone();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        agent
            .get(&request_url)
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
    })
    .await
    .map_err(|e| InfoError::Http {
        url: url.clone(),
        error: e.to_string(),
    })?
    .map_err(|e| InfoError::Http {
        url,
        error: e.to_string(),
    })
}
