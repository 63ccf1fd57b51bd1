"""A Docker-Hub-style token server that a real distribution registry (`auth: token`) trusts.

Tokens are JWS (ES256) carrying the signing certificate in the `x5c` header; the registry
verifies that certificate against its `rootcertbundle` (see `write_cert`) and checks the
`iss`, `aud`, `exp`/`nbf` and `access` claims. Like Docker Hub, scopes a principal may not have
are left out of the token rather than refused, and a wrong password is a 401.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.fakes.threaded import ThreadedServer

ANONYMOUS = "anonymous"


class TokenRequest(NamedTuple):
    """One scope asked for at /token (scope "" when none was), for call-count assertions."""

    principal: str
    scope: str


@dataclass(frozen=True)
class Scope:
    """`type:name:action[,action]`, as sent in the `scope` parameter."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """Parse one scope; None when malformed (the server then ignores it, as Docker Hub does)."""
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and kind and name):
            return None
        return cls(kind.split("(")[0], name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


class AuthError(Exception):
    """Credentials were presented and are wrong (→ 401)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens under a small, mutable policy.

    - `users`: name → password; `admin` (one of them) gets every action on every resource.
    - `public`: fnmatch patterns of repositories anonymous may pull; None means all of them.
    - `private`: repository → users who may pull it; nobody else (not even anonymous) may.
    - any other known user may pull every repository that is not private.
    """

    def __init__(
        self,
        *,
        service: str = "registry.test",
        issuer: str = "mirror-test-token-issuer",
        admin: tuple[str, str] = ("admin", "admin-password"),
        users: Mapping[str, str] | None = None,
        public: Iterable[str] | None = None,
        private: Mapping[str, Iterable[str]] | None = None,
        expires_in: int = 300,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.admin = admin[0]
        self.users: dict[str, str] = {admin[0]: admin[1], **(users or {})}
        self.public: set[str] | None = None if public is None else set(public)
        self.private: dict[str, set[str]] = {r: set(u) for r, u in (private or {}).items()}
        self.expires_in = expires_in
        self.requests: list[TokenRequest] = []
        self.url: str | None = None
        self._refresh_tokens: dict[str, str] = {}
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._self_signed_cert()
        self._x5c = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._server = ThreadedServer()

    @property
    def cert_pem(self) -> bytes:
        """The certificate the registry must trust (its `rootcertbundle`)."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def realm(self) -> str:
        """The token endpoint URL, once `start` has run."""
        if self.url is None:
            raise RuntimeError("token server not started")
        return f"{self.url}/token"

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    # --- policy -----------------------------------------------------------------------------

    def authenticate(self, username: str, password: str) -> str:
        """Return the principal for these credentials, or raise AuthError."""
        expected = self.users.get(username)
        if expected is None or not secrets.compare_digest(expected, password):
            raise AuthError("incorrect username or password")
        return username

    def allowed_actions(self, principal: str | None, scope: Scope) -> tuple[str, ...]:
        """The subset of `scope.actions` this principal (None = anonymous) is granted."""
        if principal == self.admin:
            return scope.actions
        if scope.type != "repository":
            return ()
        readers = self.private.get(scope.name)
        if readers is not None:
            may_pull = principal is not None and principal in readers
        elif principal is not None:
            may_pull = True
        else:
            may_pull = self.public is None or any(fnmatch.fnmatchcase(scope.name, p) for p in self.public)
        return ("pull",) if may_pull and "pull" in scope.actions else ()

    def issue(self, principal: str | None, scopes: Iterable[Scope]) -> str:
        """Sign a token granting what the policy allows of `scopes`."""
        access = []
        for scope in scopes:
            actions = self.allowed_actions(principal, scope)
            if actions:
                access.append({"type": scope.type, "name": scope.name, "actions": list(actions)})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": principal or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        # JWS wants the raw 64-byte r||s, not the DER that cryptography returns.
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    # --- HTTP ---------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The /token endpoint (GET as docker/podman use it, POST as containerd's OAuth flow)."""
        app = web.Application()
        app.router.add_get("/token", self._get_token)
        app.router.add_post("/token", self._post_token)
        return app

    async def _get_token(self, request: web.Request) -> web.Response:
        if (bad := self._bad_service(request.query.get("service"))) is not None:
            return bad
        principal: str | None = None
        if header := request.headers.get("Authorization"):
            try:
                principal = self.authenticate(*_basic_credentials(header))
            except AuthError as e:
                return web.json_response({"details": str(e)}, status=401)
        scopes = _scopes(request.query.getall("scope", []))
        refresh = principal is not None and request.query.get("offline_token") == "true"
        return self._token_response(principal, scopes, refresh=refresh)

    async def _post_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if (bad := self._bad_service(_field(form, "service"))) is not None:
            return bad
        grant = _field(form, "grant_type")
        try:
            if grant == "password":
                principal = self.authenticate(_field(form, "username") or "", _field(form, "password") or "")
            elif grant == "refresh_token":
                principal = self._refresh_tokens.get(_field(form, "refresh_token") or "")
                if principal is None:
                    raise AuthError("unknown refresh token")
            else:
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
        except AuthError as e:
            return web.json_response({"error": "invalid_grant", "error_description": str(e)}, status=401)
        scopes = _scopes(form.getall("scope", []))
        refresh = grant == "password" and _field(form, "access_type") == "offline"
        return self._token_response(principal, scopes, refresh=refresh)

    def _bad_service(self, service: str | None) -> web.Response | None:
        """A token for another service would be refused by the registry; say so early, like Hub."""
        if service is None or service == self.service:
            return None
        return web.json_response({"details": f"unknown service {service!r}"}, status=400)

    def _token_response(self, principal: str | None, scopes: list[Scope], *, refresh: bool) -> web.Response:
        who = principal or ANONYMOUS
        self.requests.extend(TokenRequest(who, str(s)) for s in scopes)
        if not scopes:
            self.requests.append(TokenRequest(who, ""))
        token = self.issue(principal, scopes)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if refresh and principal is not None:
            body["refresh_token"] = refresh_token = secrets.token_urlsafe(24)
            self._refresh_tokens[refresh_token] = principal
        return web.json_response(body)

    # --- running in a thread --------------------------------------------------------------------

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve on `host` from its own thread (see ThreadedServer); return the base URL."""
        self.url = self._server.start(self.make_app(), port, name="token-server", host=host)
        return self.url

    def stop(self) -> None:
        self._server.stop()
        self.url = None

    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )


def _basic_credentials(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise AuthError("only Basic credentials are accepted here")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise AuthError("malformed Basic credentials") from e
    if not sep:
        raise AuthError("malformed Basic credentials")
    return user, password


def _scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes may repeat as parameters and be space-separated within one (containerd's POST)."""
    return [s for v in values for part in v.split() if (s := Scope.parse(part)) is not None]


def _field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None
