//! The gateway's settings file (TOML): every key of `confab-gateway serve --config`, and how
//! it applies to a [`GatewayConfig`]. `reference-gateway/conformance.toml` is the profile
//! under which the conformance suite runs every case.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::handler::GatewayConfig;
use crate::rate::RateLimit;

/// How the gateway logs.
#[derive(Clone, Copy, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The TOML settings file; every key is optional (README, "Configuration").
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the keys are documented in the README
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub db: Option<PathBuf>,
    pub origin: Option<String>,
    pub log_format: Option<LogFormat>,
    pub heartbeat_interval_ms: Option<u64>,
    pub heartbeat_timeout_ms: Option<u64>,
    pub auth_timeout_ms: Option<u64>,
    pub replay_batch_max: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_unacked_ms: Option<u64>,
    pub gc_interval_ms: Option<u64>,
    pub outbound_queue_max: Option<usize>,
    pub outbound_queue_bytes_max: Option<usize>,
    pub connects_per_ip_per_minute: Option<u32>,
    pub connects_per_ip_burst: Option<u32>,
    pub connections_max: Option<usize>,
    pub bytes_per_user_per_day: Option<u64>,
    pub conversation_bytes_max: Option<u64>,
    pub connections_per_ip_max: Option<usize>,
    pub http_request_timeout_ms: Option<u64>,
    pub claims_per_claimer_per_minute: Option<u32>,
    pub claims_per_claimer_burst: Option<u32>,
    pub claims_per_target_per_minute: Option<u32>,
    pub claims_per_target_burst: Option<u32>,
    pub claims_per_pair_per_minute: Option<u32>,
    pub claims_per_pair_burst: Option<u32>,
    pub sends_per_device_per_minute: Option<u32>,
    pub sends_per_device_burst: Option<u32>,
    pub creates_per_system_per_minute: Option<u32>,
    pub creates_per_system_burst: Option<u32>,
    pub invites_per_user_per_minute: Option<u32>,
    pub invites_per_user_burst: Option<u32>,
    pub room_members_max: Option<u64>,
    pub rooms_per_user_max: Option<u64>,
    pub key_package_low_watermark: Option<u64>,
    pub key_package_pool_max: Option<u64>,
    pub presence_ttl_min_ms: Option<u64>,
    pub presence_ttl_max_ms: Option<u64>,
    pub presence_grace_ms: Option<u64>,
    pub presence_jitter_ms: Option<u64>,
    pub watchlist_max: Option<u64>,
    pub presence_list_max: Option<u64>,
    pub presence_watches_per_watcher_per_minute: Option<u32>,
    pub presence_watches_per_watcher_burst: Option<u32>,
    pub presence_new_watchers_per_target_per_minute: Option<u32>,
    pub presence_new_watchers_per_target_burst: Option<u32>,
    pub presence_updates_per_user_per_minute: Option<u32>,
    pub presence_updates_per_user_burst: Option<u32>,
    pub fsync: Option<crate::durability::SyncPolicy>,
}

impl FileConfig {
    /// Parses a settings file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads and parses the settings file at `path`.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        Self::parse(&std::fs::read_to_string(path).map_err(|e| e.to_string())?)
    }

    /// Applies the protocol settings (everything but `listen`, `db`, `origin` and
    /// `log_format`) to `config`; refuses inconsistent ones.
    pub fn apply(&self, config: &mut GatewayConfig) -> Result<(), String> {
        if let Some(v) = self.heartbeat_interval_ms {
            config.heartbeat_interval_ms = v;
        }
        if let Some(v) = self.heartbeat_timeout_ms {
            config.heartbeat_timeout_ms = v;
        }
        if let Some(v) = self.auth_timeout_ms {
            config.auth_timeout_ms = v.max(1);
        }
        if let Some(v) = self.replay_batch_max {
            config.limits.replay_batch_max = v;
        }
        if let Some(v) = self.retention_ms {
            config.retention.retention_ms = v;
        }
        if let Some(v) = self.retention_unacked_ms {
            config.retention.retention_unacked_ms = v;
        }
        if config.retention.retention_unacked_ms < config.retention.retention_ms {
            return Err("retention_unacked_ms must not be less than retention_ms".into());
        }
        if let Some(v) = self.gc_interval_ms {
            config.gc_interval_ms = v.max(1);
        }
        if let Some(v) = self.outbound_queue_max {
            config.outbound_queue_max = v.max(1);
        }
        if let Some(v) = self.outbound_queue_bytes_max {
            config.outbound_queue_bytes_max = v;
        }
        if let Some(v) = self.bytes_per_user_per_day {
            config.bytes_per_user_per_day = v;
        }
        if let Some(v) = self.conversation_bytes_max {
            config.conversation_bytes_max = v;
        }
        if let Some(v) = self.connections_max {
            config.connections_max = v.max(1);
        }
        if let Some(v) = self.connections_per_ip_max {
            config.connections_per_ip_max = v.max(1);
        }
        if let Some(v) = self.http_request_timeout_ms {
            config.http_request_timeout_ms = v.max(1);
        }
        let limit = |target: &mut RateLimit, per_minute: Option<u32>, burst: Option<u32>| {
            if let Some(v) = per_minute {
                target.per_minute = v.max(1);
            }
            if let Some(v) = burst {
                target.burst = v.max(1);
            }
        };
        limit(
            &mut config.connects_per_ip,
            self.connects_per_ip_per_minute,
            self.connects_per_ip_burst,
        );
        limit(
            &mut config.claims_per_claimer,
            self.claims_per_claimer_per_minute,
            self.claims_per_claimer_burst,
        );
        limit(
            &mut config.claims_per_target,
            self.claims_per_target_per_minute,
            self.claims_per_target_burst,
        );
        limit(
            &mut config.claims_per_pair,
            self.claims_per_pair_per_minute,
            self.claims_per_pair_burst,
        );
        limit(
            &mut config.sends_per_device,
            self.sends_per_device_per_minute,
            self.sends_per_device_burst,
        );
        limit(
            &mut config.creates_per_system,
            self.creates_per_system_per_minute,
            self.creates_per_system_burst,
        );
        limit(
            &mut config.invites_per_user,
            self.invites_per_user_per_minute,
            self.invites_per_user_burst,
        );
        if let Some(v) = self.room_members_max {
            config.rooms.members_max = v.max(1);
        }
        if let Some(v) = self.rooms_per_user_max {
            config.rooms.rooms_per_user_max = v.max(1);
        }
        if let Some(v) = self.fsync {
            config.sync = v;
        }
        if let Some(v) = self.key_package_low_watermark {
            config.key_package_low_watermark = v;
        }
        if let Some(v) = self.key_package_pool_max {
            config.key_package_pool_max = v.max(1);
        }
        let p = &mut config.presence;
        limit(
            &mut p.watches_per_watcher,
            self.presence_watches_per_watcher_per_minute,
            self.presence_watches_per_watcher_burst,
        );
        limit(
            &mut p.new_watchers_per_target,
            self.presence_new_watchers_per_target_per_minute,
            self.presence_new_watchers_per_target_burst,
        );
        limit(
            &mut p.updates_per_user,
            self.presence_updates_per_user_per_minute,
            self.presence_updates_per_user_burst,
        );
        if let Some(v) = self.presence_ttl_min_ms {
            p.ttl_min_ms = v.max(1);
        }
        if let Some(v) = self.presence_ttl_max_ms {
            p.ttl_max_ms = v;
        }
        if p.ttl_max_ms < p.ttl_min_ms {
            return Err("presence_ttl_max_ms must not be less than presence_ttl_min_ms".into());
        }
        if let Some(v) = self.presence_grace_ms {
            p.grace_ms = v;
        }
        if let Some(v) = self.presence_jitter_ms {
            p.jitter_ms = v;
        }
        if let Some(v) = self.watchlist_max {
            p.watchlist_max = v;
        }
        if let Some(v) = self.presence_list_max {
            p.list_max = v;
        }
        Ok(())
    }
}
