"""TLS and ACL users between kvstore and Redis, against a real redis-server.

The module makes its own certificate authorities and certificates, starts a
redis-server that speaks only TLS on TCP (and requires client certificates),
with ACL users instead of an open default user, and checks that kvstore gets
in exactly when it should, answers 503 quickly when it cannot, and never
writes a password or token into its logs or answers.
"""

import dataclasses
import datetime
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from quart.typing import TestClientProtocol as QuartClient

from kvstore.app import create_app
from kvstore.cli import main
from kvstore.embedded import EmbeddedRedis, find_redis_server, free_port
from kvstore.settings import Settings, SettingsError
from kvstore.store import connection_options
from tests.helpers import wait_until_healthy

USER = "kvstore"
PASSWORD = "pw-Redis-0123456789"  # noqa: S105
ADMIN_PASSWORD = "pw-admin-0123456789"  # noqa: S105
PREFIX = "kvtls:"
JSON_HEADERS = {"Content-Type": "application/json"}

# What kvstore needs of Redis, and nothing more: its commands on its prefix.
KVSTORE_ACL = (
    USER,
    "on",
    f">{PASSWORD}",
    "resetkeys",
    f"~{PREFIX}*",
    "resetchannels",
    "-@all",
    "+ping",
    "+evalsha",
    "+script|load",
    "+get",
    "+set",
    "+exists",
    "+pttl",
    "+strlen",
    "+dbsize",
    "+mget",
    "+scan",
    "+unlink",
)


@dataclasses.dataclass(frozen=True)
class Pki:
    """Files of a test PKI: a CA, a server and client certificate, a stranger CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    encrypted_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(
    key: ec.EllipticCurvePrivateKey, path: Path, passphrase: bytes = b""
) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )
    path.chmod(0o600)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = _name(subject) if issuer is None else issuer[0].subject
    signing_key = key if issuer is None else issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True
        )
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    """Write a CA, server and client certificates, and a second, unrelated CA.

    The server certificate names only ``localhost``, so a client that checks
    host names refuses it when it connects to 127.0.0.1.
    """

    def pem(certificate: x509.Certificate, name: str) -> Path:
        path = folder / name
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("kvstore test CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "localhost",
        server_key,
        (ca, ca_key),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost")],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "kvstore", client_key, (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("some other CA", other_key, None)
    pki = Pki(
        ca=pem(ca, "ca.pem"),
        server_cert=pem(server, "server.pem"),
        server_key=folder / "server.key",
        client_cert=pem(client, "client.pem"),
        client_key=folder / "client.key",
        other_ca=pem(other, "other-ca.pem"),
        encrypted_key=folder / "client-encrypted.key",
    )
    _write_key(server_key, pki.server_key)
    _write_key(client_key, pki.client_key)
    _write_key(client_key, pki.encrypted_key, b"passphrase")
    return pki


@dataclasses.dataclass(frozen=True)
class TlsRedis:
    """A running TLS-only redis-server with ACL users."""

    port: int
    pki: Pki

    def url(self, host: str = "localhost", credentials: str = "") -> str:
        at = f"{credentials}@" if credentials else ""
        return f"rediss://{at}{host}:{self.port}/0"

    def admin(self) -> redis.Redis:
        """A synchronous client with every right, to look behind the API."""
        return redis.Redis(
            host="localhost",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.pki.ca),
            ssl_certfile=str(self.pki.client_cert),
            ssl_keyfile=str(self.pki.client_key),
            username="admin",
            password=ADMIN_PASSWORD,
        )


def has_tls(binary: str) -> bool:
    """Whether ``binary`` knows the TLS settings (a build with TLS support).

    The probe cannot start a server: its unix socket lies in a folder that
    does not exist. A build without TLS stops earlier, at the TLS directive.
    """
    result = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--unixsocket", "/nonexistent/s"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return b"Bad directive" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    binary = find_redis_server()
    if binary is None or not has_tls(binary):
        pytest.skip("the redis-server in use has no TLS support (Debian's has it)")
    folder = tmp_path_factory.mktemp("tls")
    pki = make_pki(folder)
    port = free_port()
    server = EmbeddedRedis(
        folder,
        persist=False,
        supervise=False,
        extra_args=(
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(pki.server_cert),
            "--tls-key-file",
            str(pki.server_key),
            "--tls-ca-cert-file",
            str(pki.ca),
            "--tls-auth-clients",
            "yes",
            # The default user may only PING (the unix socket health check).
            "--user",
            "default",
            "on",
            "nopass",
            "resetkeys",
            "-@all",
            "+ping",
            "--user",
            "admin",
            "on",
            f">{ADMIN_PASSWORD}",
            "~*",
            "&*",
            "+@all",
            "--user",
            *KVSTORE_ACL,
        ),
    )
    server.start()
    yield TlsRedis(port, pki)
    server.stop()


@pytest.fixture
def tls_settings(tls_redis: TlsRedis, tmp_path: Path) -> Settings:
    """Settings that reach the TLS server as the kvstore user."""
    pki = tls_redis.pki
    return Settings(
        redis_url=tls_redis.url(),
        redis_username=USER,
        redis_password=PASSWORD,
        redis_tls_ca_file=pki.ca,
        redis_tls_cert_file=pki.client_cert,
        redis_tls_key_file=pki.client_key,
        key_prefix=f"{PREFIX}{uuid.uuid4().hex[:8]}:",
        data_dir=tmp_path,
        redis_timeout=1.0,
        redis_connect_timeout=1.0,
    )


@asynccontextmanager
async def serving(settings: Settings, **changes: Any) -> AsyncIterator[QuartClient]:
    """A client of an app with ``changes`` to the settings, serving for the block."""
    application = create_app(dataclasses.replace(settings, **changes))
    async with application.test_app():
        yield application.test_client()


async def round_trip(client: QuartClient) -> tuple[int, int]:
    """PUT then GET one key; the two statuses.

    Between them every other kind of request runs once (so every command of
    the ACL user is used) and must succeed.
    """
    put = await client.put("/keys/k", data=b'{"tls": true}', headers=JSON_HEADERS)
    others = [
        await client.put("/keys?expire_in=60", data=b'{"a": 1}', headers=JSON_HEADERS),
        await client.head("/keys/a"),
        await client.get("/keys?filter=$"),
        await client.delete("/keys?filter=a"),
        await client.put("/keys/b", data=b"2", headers=JSON_HEADERS),
        await client.delete("/keys/b"),
        await client.get("/readyz"),
    ]
    got = await client.get("/keys/k")
    assert [response.status_code for response in others] == [
        200,
        200,
        200,
        200,
        201,
        204,
        200,
    ]
    return put.status_code, got.status_code


# TLS.


async def test_tls_with_a_client_certificate_serves_requests(
    tls_redis: TlsRedis, tls_settings: Settings
) -> None:
    async with serving(tls_settings) as client:
        statuses = await round_trip(client)
        ready = await client.get("/readyz")
        with tls_redis.admin() as admin:
            stored = admin.get(f"{tls_settings.key_prefix}k")
            users = {entry["user"] for entry in admin.client_list()}

    assert statuses == (201, 200)
    assert ready.status_code == 200
    assert stored == b'{"tls":true}'
    assert USER in users


async def test_a_server_certificate_from_another_ca_is_a_quick_503(
    tls_redis: TlsRedis, tls_settings: Settings
) -> None:
    changes = {"redis_tls_ca_file": tls_redis.pki.other_ca}

    async with serving(tls_settings, **changes) as client:
        started = time.monotonic()
        response = await client.get("/keys/k")
        ready = await client.get("/readyz")
        elapsed = time.monotonic() - started

    body = await response.get_json()
    assert response.status_code == ready.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert body["title"] == "Service Unavailable"
    assert elapsed < 2 * tls_settings.redis_timeout + 1.0


async def test_without_a_client_certificate_the_server_refuses(
    tls_settings: Settings,
) -> None:
    changes = {"redis_tls_cert_file": None, "redis_tls_key_file": None}

    async with serving(tls_settings, **changes) as client:
        started = time.monotonic()
        response = await client.get("/keys/k")
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert elapsed < tls_settings.redis_timeout + 1.0


async def test_the_host_name_is_checked_unless_turned_off(
    tls_redis: TlsRedis, tls_settings: Settings
) -> None:
    by_address = {"redis_url": tls_redis.url(host="127.0.0.1")}

    async with serving(tls_settings, **by_address) as client:
        checked = await client.get("/readyz")
    async with serving(
        tls_settings, **by_address, redis_tls_verify_hostname=False
    ) as client:
        unchecked = await client.get("/readyz")

    assert checked.status_code == 503
    assert unchecked.status_code == 200


def test_tls_options_are_given_to_redis_py(tls_settings: Settings) -> None:
    options = connection_options(tls_settings)

    assert options == {
        "username": USER,
        "password": PASSWORD,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(tls_settings.redis_tls_ca_file),
        "ssl_certfile": str(tls_settings.redis_tls_cert_file),
        "ssl_keyfile": str(tls_settings.redis_tls_key_file),
    }


def test_a_missing_ca_file_stops_the_start(tls_settings: Settings) -> None:
    missing = dataclasses.replace(tls_settings, redis_tls_ca_file=Path("/nonexistent"))

    with pytest.raises(SettingsError, match="KVSTORE_REDIS_TLS_CA_FILE='/nonexistent'"):
        connection_options(missing)


def test_a_key_that_does_not_fit_the_certificate_stops_the_start(
    tls_redis: TlsRedis, tls_settings: Settings
) -> None:
    mismatched = dataclasses.replace(
        tls_settings, redis_tls_key_file=tls_redis.pki.server_key
    )

    with pytest.raises(SettingsError, match="KVSTORE_REDIS_TLS_CERT_FILE"):
        connection_options(mismatched)


def test_an_encrypted_key_is_refused_without_a_prompt(
    tls_redis: TlsRedis, tls_settings: Settings
) -> None:
    encrypted = dataclasses.replace(
        tls_settings, redis_tls_key_file=tls_redis.pki.encrypted_key
    )

    with pytest.raises(SettingsError, match="unencrypted PEM"):
        connection_options(encrypted)


def test_a_plain_url_gets_no_tls_options(settings: Settings) -> None:
    assert connection_options(settings) == {}


# ACL users and passwords.


@pytest.mark.parametrize("source", ["url", "settings", "file"])
async def test_the_acl_user_logs_in_with_credentials_from_any_source(
    tls_redis: TlsRedis, tls_settings: Settings, tmp_path: Path, source: str
) -> None:
    password_file = tmp_path / "redis-password"
    password_file.write_text(f"{PASSWORD}\n")
    all_changes: dict[str, dict[str, Any]] = {
        "url": {
            "redis_url": tls_redis.url(credentials=f"{USER}:{PASSWORD}"),
            "redis_username": None,
            "redis_password": None,
        },
        "settings": {},
        "file": {"redis_password": None, "redis_password_file": password_file},
    }
    changes = all_changes[source]

    async with serving(tls_settings, **changes) as client:
        statuses = await round_trip(client)

    assert statuses == (201, 200)


@pytest.mark.parametrize(
    "changes",
    [
        {"redis_password": "not-the-password"},
        {"redis_username": "nobody"},
    ],
)
async def test_wrong_credentials_are_a_503_that_shows_no_secret(
    tls_settings: Settings, changes: dict[str, Any]
) -> None:
    async with serving(tls_settings, **changes) as client:
        response = await client.put("/keys/k", data=b"1", headers=JSON_HEADERS)

    text = await response.get_data(as_text=True)
    assert response.status_code == 503
    assert PASSWORD not in text
    assert "not-the-password" not in text


async def test_keys_outside_the_acl_prefix_are_a_server_error(
    tls_settings: Settings,
) -> None:
    async with serving(tls_settings, key_prefix="elsewhere:") as client:
        response = await client.get("/keys/k")

    assert response.status_code == 500


def test_an_empty_password_file_stops_the_start(
    tls_settings: Settings, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    configured = dataclasses.replace(
        tls_settings, redis_password=None, redis_password_file=empty
    )

    with pytest.raises(SettingsError, match=r"KVSTORE_REDIS_PASSWORD_FILE=.*empty"):
        connection_options(configured)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"KVSTORE_REDIS_TLS_CA_FILE": "/ca.pem"}, "KVSTORE_REDIS_TLS_CA_FILE"),
        (
            {
                "KVSTORE_REDIS_URL": "redis://h:6379",
                "KVSTORE_REDIS_TLS_CERT_FILE": "/c",
            },
            "KVSTORE_REDIS_TLS_CERT_FILE",
        ),
        (
            {
                "KVSTORE_REDIS_URL": "rediss://h:6379",
                "KVSTORE_REDIS_TLS_KEY_FILE": "/k",
            },
            "KVSTORE_REDIS_TLS_KEY_FILE",
        ),
        ({"KVSTORE_REDIS_PASSWORD": PASSWORD}, "KVSTORE_REDIS_PASSWORD"),
        (
            {
                "KVSTORE_REDIS_URL": "rediss://h:6379",
                "KVSTORE_REDIS_PASSWORD": PASSWORD,
                "KVSTORE_REDIS_PASSWORD_FILE": "/p",
            },
            "KVSTORE_REDIS_PASSWORD_FILE",
        ),
        (
            {
                "KVSTORE_REDIS_URL": f"rediss://:{PASSWORD}@h:6379",
                "KVSTORE_REDIS_PASSWORD_FILE": "/p",
            },
            "KVSTORE_REDIS_PASSWORD",
        ),
        (
            {
                "KVSTORE_REDIS_URL": f"rediss://{USER}@h:6379",
                "KVSTORE_REDIS_USERNAME": USER,
            },
            "KVSTORE_REDIS_USERNAME",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_refused(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(environ)

    assert str(caught.value).startswith(variable)
    assert PASSWORD not in str(caught.value)


def test_a_user_in_the_url_and_a_password_file_go_together(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "KVSTORE_REDIS_URL": f"rediss://{USER}@h:6379/0",
            "KVSTORE_REDIS_PASSWORD_FILE": str(tmp_path / "p"),
            "KVSTORE_REDIS_TLS_VERIFY_HOSTNAME": "false",
        }
    )

    assert settings.redis_password_file == tmp_path / "p"
    assert settings.redis_tls_verify_hostname is False


def test_passwords_are_masked_in_the_settings_shown() -> None:
    settings = Settings.from_env(
        {
            "KVSTORE_REDIS_URL": "rediss://h:6379/0",
            "KVSTORE_REDIS_USERNAME": USER,
            "KVSTORE_REDIS_PASSWORD": PASSWORD,
        }
    )

    shown = settings.public()

    assert shown["redis_password"] == "***"  # noqa: S105
    assert shown["redis_username"] == USER
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(shown)


# A real server's logs.


def test_no_secret_reaches_the_log_of_a_real_server(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    """Start lines, 401s and 503s of ``kvstore serve`` carry no secret.

    The password in the URL is wrong on purpose, so Redis refuses it and the
    store error path runs too. (Passwords given as settings are masked in the
    same start lines: see ``test_passwords_are_masked_in_the_settings_shown``.)
    """
    wrong = "wrong-Password-0123456789"
    token = "token-0123456789abcdefghij"  # noqa: S105
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# tokens\nro:{token}-file\n")
    port = free_port()
    pki = tls_redis.pki
    environ = {
        **os.environ,
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_REDIS_URL": tls_redis.url(credentials=f"{USER}:{wrong}"),
        "KVSTORE_API_TOKENS": f"rw:{token}",
        "KVSTORE_API_TOKENS_FILE": str(token_file),
        "KVSTORE_REDIS_TLS_CA_FILE": str(pki.ca),
        "KVSTORE_REDIS_TLS_CERT_FILE": str(pki.client_cert),
        "KVSTORE_REDIS_TLS_KEY_FILE": str(pki.client_key),
        "KVSTORE_REDIS_TIMEOUT": "1",
        "KVSTORE_LOG_LEVEL": "DEBUG",
    }
    log_path = tmp_path / "kvstore.log"
    url = f"http://127.0.0.1:{port}"

    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve"],
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_healthy(url, process)
            anonymous = httpx.get(f"{url}/keys/k")
            guessed = httpx.get(f"{url}/keys/k", headers={"Authorization": "Bearer x"})
            refused = httpx.get(
                f"{url}/keys/k", headers={"Authorization": f"Bearer {token}"}
            )
        finally:
            process.terminate()
            process.wait(timeout=15)

    log = log_path.read_text()
    assert (anonymous.status_code, guessed.status_code) == (401, 401)
    assert refused.status_code == 503
    assert "kvstore starting" in log
    assert "API tokens required: 1 read-only, 1 read-write" in log
    assert "store unavailable" in log
    for secret in (wrong, token, PASSWORD):
        assert secret not in log
        assert secret not in refused.text


def test_serve_stops_with_one_line_when_a_tls_file_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVSTORE_REDIS_URL", f"rediss://{USER}:{PASSWORD}@h:6379/0")
    monkeypatch.setenv("KVSTORE_REDIS_TLS_CA_FILE", "/nonexistent/ca.pem")

    status = main(["serve"])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("kvstore: KVSTORE_REDIS_TLS_CA_FILE='/nonexistent/ca.pem'")
    assert error.count("\n") == 1
    assert PASSWORD not in error
