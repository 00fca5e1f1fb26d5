"""The one settings object. Every knob an operator turns is a field here.

Values come, in order of precedence, from: keyword arguments (the Serve config's
``args``), environment variables (``CONVEYOR_<FIELD>``, plus the conventional
``DATABASE_URL``, ``REDIS_URL`` and ``KAFKA_BOOTSTRAP``), then the defaults below, which
are the embedded defaults: no external service is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "conveyor"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="forbid", populate_by_name=True)

    # --- where state lives -------------------------------------------------------------
    data_dir: Path = Field(default_factory=_default_data_dir, description=(
        "Embedded PostgreSQL data, the dev signing key, local objects and .eml files."))
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "CONVEYOR_DATABASE_URL", "database_url"),
        description="PostgreSQL DSN. Unset: an embedded PostgreSQL under data_dir is started.")
    db_pool_min: int = 1
    db_pool_max: int = Field(default=4, description="asyncpg pool size per replica.")

    # --- event bus (Kafka) and chat cache (Redis): both optional -----------------------
    kafka_bootstrap: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "CONVEYOR_KAFKA_BOOTSTRAP", "kafka_bootstrap"),
        description=("Kafka bootstrap servers (host:port[,host:port]). Unset: no event bus, no "
                     "Kafka ingress, nothing is appended to the events outbox."))
    kafka_events_topic: str = Field(default="conveyor.events", description=(
        "Topic of committed events (PROTOCOL.md, Kafka)."))
    kafka_ingress_topic: str = Field(default="conveyor.ingress", description=(
        "Topic server-side producers send records in on."))
    kafka_ingress_dlq_topic: str = Field(default="conveyor.ingress.dlq", description=(
        "Where ingress records that do not parse or validate go, with the reason."))
    kafka_ingress_group: str = Field(default="conveyor-ingress", description=(
        "Consumer group of the ingress consumers (they share the topic's partitions)."))
    kafka_ingress_batch: int = Field(default=500, ge=1, description=(
        "Most ingress records handed to the pipeline in one batch."))
    kafka_ingress_retry_s: float = Field(default=1.0, description=(
        "After the pipeline refused an ingress batch, the least time its partitions stay "
        "paused before the consumer looks again."))
    kafka_ingress_pause_latency_s: float = Field(default=2.0, description=(
        "An ingress batch whose hand-off to the pipeline took longer than this pauses the "
        "ingress partitions (the pipeline is saturated) until the pace recovers."))
    kafka_ingress_pause_backlog: int = Field(default=20_000, ge=1, description=(
        "Frames waiting in the hub's mailboxes at which the ingress pauses its partitions."))
    kafka_timeout_s: float = Field(default=10.0, description=(
        "Longest wait for the broker: one publish's acknowledgement, a dead letter's."))
    event_relay_batch: int = Field(default=500, ge=1, description=(
        "Most outbox events the relay publishes in one batch."))
    event_relay_lease_s: float = Field(default=60.0, description=(
        "How long a relay holds claimed events; a relay that died is replaced after it "
        "(keep it above kafka_timeout_s)."))
    event_relay_interval_s: float = Field(default=0.2, description=(
        "How often an idle relay looks for new events."))
    event_relay_backoff_max_s: float = Field(default=30.0, description=(
        "Longest wait between publish attempts while the broker is down (doubling from 0.5 s)."))
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "CONVEYOR_REDIS_URL", "redis_url"),
        description="Redis URL of the chat cache. Unset: no cache, reads go to PostgreSQL.")
    cache_chat_messages: int = Field(default=200, ge=1, description=(
        "Most recent rows (messages and commands) cached per chat."))
    cache_ttl_s: float = Field(default=3600.0, description=(
        "A chat's cache entries expire this long after its last write."))
    redis_timeout_s: float = Field(default=0.25, description=(
        "Longest wait for one Redis call; slower counts as Redis unavailable (PostgreSQL "
        "answers instead)."))

    # --- pipelines ---------------------------------------------------------------------
    pipelines_file: Path | None = Field(
        default=None, description="pipelines.yaml; unset: the one shipped in serve_app/.")

    # --- authentication ----------------------------------------------------------------
    jwks_url: str | None = Field(default=None, description=(
        "Keycloak (or any OIDC) JWKS URL. Unset: a dev RS256 key under data_dir signs and "
        "verifies tokens (`conveyor token USER`)."))
    jwt_issuer: str = "conveyor-dev"
    jwt_audience: str | None = Field(default="conveyor", description=(
        "Accepted `aud` (or `azp`) value; unset: audience is not checked."))
    jwt_client_id: str = Field(default="conveyor", description=(
        "Client whose roles are read from resource_access.<client>.roles."))
    jwt_leeway_s: float = 10.0
    jwks_cache_s: float = Field(default=300.0, description=(
        "JWKS keys are refreshed (in the background) when older than this."))
    jwks_min_refetch_s: float = Field(default=10.0, description=(
        "Least time between JWKS fetches: for an unknown kid, and after a failed fetch "
        "(doubling while fetches keep failing, up to jwks_cache_s)."))
    jwks_timeout_s: float = Field(default=5.0, description="Timeout of one JWKS fetch.")
    notifications_role: str | None = Field(default="notifications:send", description=(
        "Role required for POST /v1/notifications; unset: any valid token."))
    dev_token_ttl_s: int = 24 * 3600

    # --- gateway / messenger -----------------------------------------------------------
    max_frame_bytes: int = Field(default=64 * 1024, description="Larger frames get `too_large`.")
    max_body_chars: int = Field(default=4000, description="Longest chat body accepted.")
    batch_wait_ms: float = Field(default=3.0, description=(
        "Under load (the previous batch of the type had more than one item), how long a "
        "gateway waits for more frames before sending a batch down; a lone frame after a "
        "quiet spell is sent at once."))
    batch_max: int = Field(default=256, description="Most items in one gateway batch.")
    inbound_buffer: int = Field(default=2048, description=(
        "Bounded inbound buffer per gateway replica and message type."))
    connection_queue: int = Field(default=1024, description=(
        "Outbound frames queued per connection, of each kind: chat messages beyond it are "
        "read back from the store later (catch-up); other frames (acks, signals, system...) "
        "beyond it close the connection as a slow consumer (close code 4408)."))
    connection_unreceipted_max: int = Field(default=256, ge=1, description=(
        "Messages and command events written to one connection and not receipted yet; "
        "beyond it the connection's chats wait in the store and are written as receipts "
        "come. Writes never wait for the client behind Serve's proxy, so this bounds what a "
        "client that does not read holds in the proxy: at most this many messages."))
    slow_consumer_s: float = Field(default=30.0, gt=0, description=(
        "A connection at its `connection_unreceipted_max` that sends no receipt for this "
        "long is closed as a slow consumer (`system` `slow_consumer`, close code 4408)."))
    max_connections_per_user: int = Field(default=32, ge=1, description=(
        "Open WebSocket connections one user may hold across all gateway replicas (more: "
        "close code 4409); counted by the user's hub shard. While that shard cannot be "
        "reached, each replica holds the cap over its own connections."))
    connection_attempts_per_minute: int = Field(default=120, ge=1, description=(
        "WebSocket connection attempts per user and minute across all gateway replicas, "
        "with a burst of as many (more: close code 4429); counted by the user's hub shard, "
        "or by each replica while that shard cannot be reached."))
    redelivery_base_s: float = Field(default=2.0, description=(
        "First redelivery after this long without a receipt; doubles each time."))
    redelivery_max_s: float = 60.0
    hub_shards: int = Field(default=1, description="Connection hub actors (users are hashed).")
    state_actor_prefix: str = Field(default="conveyor", description=(
        "Name prefix of the hub, credit and dedup actors (named, shared by every replica of "
        "the app). Two apps in one Ray cluster with different prefixes keep separate state."))
    hub_pull_wait_s: float = Field(default=1.0, description=(
        "Longest wait of one hub mailbox long-poll: a pull returns as soon as there is "
        "something to deliver, so an idle gateway makes one call per wait per shard."))
    gateway_ttl_s: float = Field(default=15.0, description=(
        "A gateway replica that has not pulled from the hub for this long is considered dead; "
        "its connections are dropped from presence."))
    outbox_grace_s: float = Field(default=5.0, description=(
        "An outbox entry older than this was not delivered by the fast path; the relay takes it."))
    relay_interval_s: float = 1.0
    relay_batch: int = 500
    membership_cache_s: float = Field(default=5.0, description=(
        "How long a replica trusts cached chat membership, and a cached pair of users found "
        "sharing a chat (signal_scope, presence_scope); a pair not found is read afresh."))
    signal_scope: Literal["contacts", "anyone"] = Field(default="contacts", description=(
        "Who a `signal` may go to. contacts: a user sharing at least one chat with the "
        "sender, or the sender's own user id (its other devices); any other recipient: ack "
        "`rejected` `forbidden`, nothing forwarded. anyone: any user id. validate_signal's "
        "`scope` option in pipelines.yaml wins over it."))
    presence_scope: Literal["contacts", "anyone"] = Field(default="contacts", description=(
        "Whom `GET /v1/presence` answers for. contacts: the caller and users sharing at "
        "least one chat with the caller; asking for anyone else is refused with 403 "
        "`forbidden`, naming them. anyone: any user. `system` `presence` frames go to a "
        "user's contacts either way."))

    # --- load management -----------------------------------------------------------------
    credit_capacity: int = Field(default=100, description="Credits a user's bucket holds.")
    credit_refill: int = Field(default=100, description="Credits returned every interval.")
    credit_interval_s: float = Field(default=10.0, description="Refill interval.")
    credit_costs: dict[str, int] = Field(default_factory=dict, description=(
        "Cost per message type, overriding pipelines.yaml (e.g. {\"chat\": 1, \"signal\": 0})."))
    credit_shards: int = Field(default=1, description="Credit bank actors (users are hashed).")
    credit_lease: int = Field(default=10, ge=0, description=(
        "Credits a gateway leases from the bank per active user and spends locally, so most "
        "batches need no bank call (topped up in the background below half). 0: every "
        "batch asks the bank. The cluster-wide limit holds either way."))
    credit_lease_max: int = Field(default=1000, ge=1, description=(
        "A user whose lease runs dry gets one twice as large, up to this (a busy sender "
        "then needs about one bank call per lease, not one per batch). Credits leased to "
        "one gateway are spendable only there until given back."))
    credit_lease_idle_s: float = Field(default=30.0, description=(
        "A lease unused this long goes back to the bank (a user who moved to another "
        "gateway gets those credits back there)."))
    dedup_shards: int = Field(default=1, description=(
        "Signal dedup window actors (keys are hashed)."))
    signal_dedup_ttl_s: float = Field(default=60.0, description="How long a signal id is remembered.")
    metrics_push_s: float = Field(default=2.0, description="How often processes push metrics.")
    stage_call_timeout_s: float = Field(default=30.0, description=(
        "A stage host call slower than this fails the batch (durable batches are retried)."))

    # --- attachments -------------------------------------------------------------------
    s3_endpoint: str | None = Field(default=None, description=(
        "S3/MinIO endpoint host:port. Unset: objects are kept under data_dir/objects behind "
        "the app's own upload endpoint."))
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_bucket: str = "conveyor-attachments"
    s3_region: str = "us-east-1"
    s3_secure: bool = False
    public_base_url: str = Field(default="http://127.0.0.1:8000", description=(
        "Where clients reach this app (upload URLs of the local object store)."))
    attachment_max_bytes: int = 50 * 1024 * 1024
    attachment_types: list[str] = Field(default_factory=lambda: [
        "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf",
        "text/plain", "video/mp4", "audio/mpeg", "application/zip"],
        description="Content types accepted for attachments.")
    attachment_upload_ttl_s: int = Field(default=900, description="Upload URL lifetime.")
    attachment_expiry_grace_s: float = Field(default=120.0, description=(
        "A pending attachment is expired only this long after its upload URL expired, so an "
        "upload that finished in time is not lost to a late storage event."))
    attachment_claim_lease_s: float = Field(default=300.0, description=(
        "How long the check of one upload (copy, sniff, virus scan) may hold the attachment; "
        "after that a repeated event may take it over (its processing is presumed dead)."))
    attachment_check_timeout_s: float = Field(default=60.0, description=(
        "HTTP timeout of POST /v1/storage/events and /v1/attachments/{id}/complete, which "
        "copy, sniff and scan the upload before answering (other requests: "
        "request_timeout_s); keep it above stage_call_timeout_s."))
    clamd_timeout_s: float = Field(default=20.0, description=(
        "Longest a ClamAV scan of one file may take before it counts as failed (the "
        "attachment then stays pending and can be completed again); keep it under "
        "stage_call_timeout_s."))
    storage_webhook_secret: str | None = Field(default=None, description=(
        "Bearer secret the storage's bucket-notification webhook must send; unset: the "
        "webhook endpoint refuses everything."))
    clamd_address: str | None = Field(default=None, description=(
        "ClamAV daemon, host:port or a unix socket path; unset: no virus scan (content "
        "type sniffing still runs)."))

    # --- notifications -----------------------------------------------------------------
    smtp_host: str | None = Field(default=None, description=(
        "SMTP server. Unset: e-mails are written as .eml files to mail_dir."))
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_use_tls: bool = False
    smtp_timeout_s: float = 10.0
    smtp_pool_size: int = 2
    mail_from: str = "conveyor@localhost"
    mail_subject: str = "Уведомление"
    mail_dir: Path | None = Field(default=None, description="Default: data_dir/mail.")
    bitrix_webhook_url: str | None = Field(default=None, description=(
        "Bitrix24 incoming webhook base URL, e.g. https://portal.bitrix24.ru/rest/1/secret/ ; "
        "unset: the bitrix channel is unavailable."))
    bitrix_rate_per_s: float = 2.0
    bitrix_burst: int = 2
    bitrix_shared_limit: bool = Field(default=True, description=(
        "Hold bitrix_rate_per_s (+ bitrix_burst) for the whole cluster: every dispatcher "
        "replica and gateway books its requests with one shared actor (falling back to a "
        "per-process limit while that actor is unreachable). Off: the limit holds per "
        "process, so N processes may send N times as fast."))
    bitrix_timeout_s: float = 10.0
    notification_flush_interval_s: float = Field(default=5.0, description=(
        "Queued (isImmediate=false) notifications are sent in batches this often."))
    notification_batch_size: int = Field(default=100, description=(
        "Most notifications one dispatch round claims (the feedback loop may lower it)."))
    notification_round_target_s: float = Field(default=10.0, description=(
        "A dispatch round slower than this slows its loop down (smaller batches, longer "
        "intervals), as failing channels do; it recovers by itself."))
    notification_max_attempts: int = 5
    notification_retry_base_s: float = 1.0
    notification_retry_max_s: float = 60.0
    notification_lease_s: float = Field(default=300.0, description=(
        "A dispatcher holds claimed notifications this long; if it dies they are resent after."))
    breaker_failures: int = Field(default=5, description="Failures in a row that open a channel's breaker.")
    breaker_reset_s: float = 30.0
    request_timeout_s: float = Field(default=10.0, description="HTTP requests over this get 504.")
    max_request_bytes: int = 1024 * 1024
    idempotency_ttl_s: int = 24 * 3600
    idempotency_purge_interval_s: float = Field(default=300.0, description=(
        "How often the dispatcher removes expired idempotency keys."))
    notification_max_contacts: int = Field(default=20, ge=1, description=(
        "Most contacts in one notification (more: `too_big` on `contacts`)."))
    notification_max_message_chars: int = Field(default=10_000, ge=1, description=(
        "Longest notification message (longer: `too_big` on `message`)."))

    # --- derived ------------------------------------------------------------------------
    @property
    def mail_path(self) -> Path:
        return self.mail_dir or self.data_dir / "mail"

    def to_args(self) -> dict[str, Any]:
        """A plain dict that rebuilds these settings inside another process."""
        return self.model_dump(mode="json", by_alias=False)
