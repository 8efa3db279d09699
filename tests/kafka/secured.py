"""Where the test broker's secured listeners are, and their credentials.

``tools/kafka/kafka.sh up`` (so ``make test``) starts them next to the plain listener
and describes them in ``.cache/kafka/run[-PORT]/secured.json`` (PORT: that of
``KEYBUS_KAFKA_URL``; ``KEYBUS_KAFKA_SECURED_FILE`` names another file). A broker started
without them (``KEYBUS_KAFKA_SECURED=0``, or by an older script) has no such file: the
tests that need them are skipped, saying so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import keybus
from keybus.bench.scenario import backend_url

__all__ = ["SecuredKafka", "secured_file", "secured_kafka"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SecuredKafka:
    """The listeners (``kafka://`` URLs) and what it takes to use them."""

    ssl: str  # TLS, server authentication only
    mtls: str  # TLS, the client must present a certificate of the test CA
    sasl_ssl: str  # SCRAM-SHA-512 or PLAIN over TLS
    sasl_plaintext: str  # PLAIN or OAUTHBEARER without TLS
    ca_file: str
    cert_file: str
    key_file: str
    scram: keybus.SASL
    plain: keybus.SASL

    def tls(self, *, client_certificate: bool = False) -> keybus.TLS:
        if client_certificate:
            return keybus.TLS(
                ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file
            )
        return keybus.TLS(ca_file=self.ca_file)

    @property
    def secrets(self) -> list[str]:
        """The passwords in clear: none may show anywhere."""
        return [s.password.reveal() for s in (self.scram, self.plain) if s.password is not None]


def secured_file() -> Path:
    named = os.environ.get("KEYBUS_KAFKA_SECURED_FILE")
    if named:
        return Path(named)
    port = urlsplit(backend_url("kafka")).port or 9092
    return ROOT / ".cache" / "kafka" / ("run" if port == 9092 else f"run-{port}") / "secured.json"


def secured_kafka() -> SecuredKafka | None:
    """The secured listeners of the test broker, or None if it has none."""
    path = secured_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None

    def sasl(entry: dict[str, str]) -> keybus.SASL:
        return keybus.SASL(
            entry["mechanism"],  # type: ignore[arg-type]
            username=entry["username"],
            password=keybus.Secret(entry["password"]),
        )

    return SecuredKafka(
        ssl=data["ssl"],
        mtls=data["mtls"],
        sasl_ssl=data["sasl_ssl"],
        sasl_plaintext=data["sasl_plaintext"],
        ca_file=data["ca_file"],
        cert_file=data["cert_file"],
        key_file=data["key_file"],
        scram=sasl(data["scram"]),
        plain=sasl(data["plain"]),
    )
