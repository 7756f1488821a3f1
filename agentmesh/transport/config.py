"""`BrokerConfig`: how to reach the MQTT broker, the one model of broker settings.

A pipeline file's `broker:` section is this model (extra keys are errors), `Graph.set_broker`
builds it, and `MqttLink` connects with it. Secrets never live here: `password_env` names the
environment variable that holds the password, read at connect time.

    broker:
      url: mqtts://broker.example:8883      # mqtt:// or mqtts://, no credentials in it
      username: edge
      password_env: MQTT_PASSWORD
      tls: {ca_file: ca.pem}               # or `tls: true` for the system's CA store
      timeout_s: 30                         # connecting, a send, an unanswered peer
      resend_keep_s: 120                    # a sent message is kept this long for repair, unless acknowledged
"""
from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentmesh.errors import ConfigError, TransportError, schema_error
from agentmesh.transport.link import DEFAULT_MAX_MESSAGE_BYTES, validate_segment

URL_RE = re.compile(r"^(mqtts?)://([^:/@\s]+|\[[0-9A-Fa-f:]+\])(?::(\d{1,5}))?/?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_broker_url(url: str) -> str:
    """`url` if it is mqtt[s]://HOST[:PORT] without credentials, else a schema error saying why."""
    if "@" in url:
        raise schema_error("the broker url must not carry credentials",
                           "use username: and password_env: instead of user:pass@ in the url")
    m = URL_RE.match(url)
    if m is None or (m.group(3) is not None and not 0 < int(m.group(3)) < 65536):
        raise schema_error(f"invalid broker url {url!r}", "write mqtt://HOST:PORT or mqtts://HOST:PORT")
    return url


class TLSConfig(BaseModel):
    """TLS towards the broker: a CA to trust (default: the system's), a client certificate and key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(default=False, description="skip certificate verification (testing only)")

    @model_validator(mode="after")
    def _pair(self) -> "TLSConfig":
        if self.key_file is not None and self.cert_file is None:
            raise schema_error("tls.key_file is set without tls.cert_file", "give the client certificate too")
        return self


class BrokerConfig(BaseModel):
    """The MQTT broker that links hosts, and how links use it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password_env: str | None = Field(default=None, description="environment variable holding the password")
    password: str | None = Field(default=None, exclude=True, description="rejected: use password_env")
    tls: TLSConfig | None = Field(default=None, description="TLS (implied by mqtts://); `true` = system CAs")
    topic_prefix: str = Field(default="agentmesh", description="first topic levels of every message")
    keepalive_s: int = Field(default=60, ge=5, le=3600)
    timeout_s: float = Field(default=60.0, gt=0, description="bounds connecting, one send, a silent peer")
    chunk_bytes: int = Field(default=256 * 1024, ge=1024, le=64 << 20)
    heartbeat_timeout_s: float = Field(default=15.0, gt=0, description="a peer silent this long mid-call has died")
    start_wait_s: float = Field(default=300.0, gt=0, description="how long a caller waits for peers to come up")
    # Tuning that pipeline files rarely need.
    client_id: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    qos: Literal[0, 1, 2] = 1
    max_inflight: int = Field(default=16, ge=1, le=1024)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)
    max_buffered_bytes: int = Field(default=1 << 30, ge=1 << 20, description="bytes a link holds for messages "
                                    "not yet received (partial or queued); chunks beyond are dropped")
    receive_timeout_s: float = Field(default=300.0, gt=0)
    reassembly_timeout_s: float = Field(default=60.0, gt=0)
    repair_after_s: float = Field(default=1.0, gt=0, description="a transfer quiet this long is repaired: the "
                                  "receiver asks for the chunks it misses, the sender asks whether it arrived")
    resend_keep_s: float = Field(default=120.0, gt=0, description="how long a sender keeps a message its "
                                 "receiver has not acknowledged")
    resend_keep_bytes: int = Field(default=256 << 20, ge=0, description="bytes of unacknowledged messages a "
                                   "sender keeps (the oldest go first; a larger message goes unrepaired); "
                                   "0 turns repair off")
    message_expiry_s: int = Field(default=600, ge=1)
    session_expiry_s: int = Field(default=600, ge=0)
    reconnect_min_s: float = Field(default=0.2, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_broker_url(v)

    @field_validator("password")
    @classmethod
    def _no_password(cls, v: str | None) -> None:
        if v is not None:
            raise schema_error("a password must not be written in a pipeline file",
                               "put it in an environment variable and name it with password_env: MQTT_PASSWORD")
        return None

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME_RE.match(v):
            raise schema_error(f"{v!r} is not an environment variable name",
                               "name the variable that holds the password, e.g. MQTT_PASSWORD")
        return v

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_bool(cls, v: Any) -> Any:
        # `tls: true` = TLS with the system's CA store; `tls: false` = none.
        if v is True:
            return {}
        return None if v is False else v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        try:
            for part in v.split("/"):
                validate_segment(part, "topic_prefix level")
        except TransportError as e:
            raise schema_error(e.message) from None
        return v

    @model_validator(mode="after")
    def _order(self) -> "BrokerConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise schema_error("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def secure(self) -> bool:
        """TLS: an mqtts:// url or a `tls:` section."""
        return self.url.startswith("mqtts://") or self.tls is not None

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").strip("[]")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.secure else 1883)

    def password_value(self) -> str | None:
        """The password, read from the environment variable `password_env` now."""
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError(f"broker password variable {self.password_env} is not set",
                              hint=f"export {self.password_env}=... before starting")
        return value

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.secure:
            return None
        tls = self.tls or TLSConfig()
        try:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the broker's TLS files (ca_file={tls.ca_file}, cert_file={tls.cert_file}, "
                              f"key_file={tls.key_file}): {exc}") from None
        if tls.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx
