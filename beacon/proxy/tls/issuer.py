"""ACME issuance with certbot's `acme` package: synchronous, run in a thread.

Nothing here hand-writes JWS or ACME messages: `acme.client.ClientV2` signs and
sends them. TLS-ALPN-01 is gone from `acme` 5.x, so its challenge type is
registered here the way the package registers its own (`Challenge.register`);
the challenge certificate is built with `cryptography` (certs.py).

The issuer is called from a thread executor only; it talks to the event loop
through the `ChallengeBook`, whose entries the proxy's listeners read.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from beacon.proxy.tls.certs import new_key_pem, tls_alpn_challenge_context
from beacon.proxy.tls.store import CertStore

log = logging.getLogger("beacon.proxy.tls")

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
ORDER_DEADLINE = 120.0  # seconds for validation + finalization of one order
NETWORK_TIMEOUT = 15
BAD_NONCE_TRIES = 4
T = TypeVar("T")


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 tls-alpn-01 response (an empty object, like http-01's)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737 tls-alpn-01: we serve a certificate carrying the key authorization's digest."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **unused: Any) -> str:
        return self.key_authorization(account_key)


def retry_bad_nonce(call: Callable[..., T], *args: Any) -> T:
    """Call an ACME operation again on badNonce (servers reject nonces at will;
    Pebble does it to 5 % on purpose). `acme` retries one POST once; a second
    rejection in a row would otherwise fail the whole order."""
    for attempt in range(BAD_NONCE_TRIES):
        try:
            return call(*args)
        except messages.Error as exc:
            if exc.code != "badNonce" or attempt == BAD_NONCE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


class ChallengeBook:
    """Pending challenge answers, written by the issuer thread, read on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: dict[str, str] = {}  # token -> key authorization
        self._alpn: dict[str, ssl.SSLContext] = {}  # host -> challenge certificate context

    def http01(self, token: str) -> str | None:
        return self._http.get(token)

    def alpn(self, host: str) -> ssl.SSLContext | None:
        return self._alpn.get(host) if self._alpn else None

    def put_http01(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._http = {**self._http, token: key_authorization}

    def put_alpn(self, host: str, ctx: ssl.SSLContext) -> None:
        with self._lock:
            self._alpn = {**self._alpn, host: ctx}

    def remove(self, token: str | None = None, host: str | None = None) -> None:
        with self._lock:
            if token is not None:
                self._http = {k: v for k, v in self._http.items() if k != token}
            if host is not None:
                self._alpn = {k: v for k, v in self._alpn.items() if k != host}


@dataclass(frozen=True, slots=True)
class Issued:
    chain_pem: bytes
    key_pem: bytes
    renew_at: float | None  # from the ACME server's renewal information (ARI), when it gives one


class AcmeIssuer:
    """One ACME account at one directory; `issue(host)` runs one order to the end."""

    def __init__(self, store: CertStore, book: ChallengeBook, directory: str, email: str = "",
                 ca_bundle: str = "", challenge: str = "http-01") -> None:  # fmt: skip
        self.store = store
        self.book = book
        self.directory_url = directory
        self.email = email
        self.ca_bundle = ca_bundle
        self.challenge = challenge
        self._client: client.ClientV2 | None = None
        self._key: JWK | None = None
        self._lock = threading.Lock()  # one account set-up at a time
        # Account files are per directory: staging and production accounts differ.
        self._account_id = hashlib.sha256(directory.encode()).hexdigest()[:16]

    # -------------------------------------------------------------- account
    def _account(self) -> client.ClientV2:
        with self._lock:
            if self._client is not None:
                return self._client
            key_name = f"account/{self._account_id}.key"
            key_pem = self.store.read(key_name)
            if key_pem is None:
                key_pem = new_key_pem()
                self.store.write(key_name, key_pem, secret=True)
            private = serialization.load_pem_private_key(key_pem, password=None)
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            key = JWKEC(key=private)
            verify: Any = self.ca_bundle or True  # requests takes a CA bundle path here
            net = client.ClientNetwork(key, alg=ES256, verify_ssl=verify, user_agent="beacon",
                                       timeout=NETWORK_TIMEOUT)  # fmt: skip
            directory = retry_bad_nonce(client.ClientV2.get_directory, self.directory_url, net)
            acme = client.ClientV2(directory, net)
            reg_name = f"account/{self._account_id}.json"
            stored = self.store.read(reg_name)
            if stored is not None:
                net.account = messages.RegistrationResource.json_loads(stored)
            else:
                contact = (f"mailto:{self.email}",) if self.email else ()
                new = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
                try:
                    regr = retry_bad_nonce(acme.new_account, new)
                except errors.ConflictError as exc:  # the key has an account already
                    regr = retry_bad_nonce(acme.query_registration, messages.RegistrationResource(uri=exc.location))
                net.account = regr
                self.store.write(reg_name, regr.json_dumps().encode())
                log.info("added: ACME account %s at %s", regr.uri, self.directory_url)
            self._key = key
            self._client = acme
            return acme

    def forget_client(self) -> None:
        """After a network failure: set up again next time (the directory may have moved)."""
        with self._lock:
            self._client = None

    # ---------------------------------------------------------------- order
    def issue(self, host: str) -> Issued:
        """Order a certificate for `host`: answer one challenge per authorization,
        finalize with a fresh ECDSA P-256 key. Blocking; raises on failure."""
        try:
            acme = self._account()
        except Exception:
            self.forget_client()
            raise
        key = self._key
        assert key is not None
        cert_key = new_key_pem()
        csr = crypto_util.make_csr(cert_key, [host])
        order = retry_bad_nonce(acme.new_order, csr)
        answered: list[tuple[str | None, str | None]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # reused authorization
                answered.append(self._answer(acme, key, host, authz))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
            done = retry_bad_nonce(acme.poll_and_finalize, order, deadline)
        finally:
            for token, alpn_host in answered:
                self.book.remove(token=token, host=alpn_host)
        chain = done.fullchain_pem.encode()
        return Issued(chain, cert_key, self._ari(acme, chain))

    def _answer(self, acme: client.ClientV2, key: JWK, host: str,
                authz: messages.AuthorizationResource) -> tuple[str | None, str | None]:  # fmt: skip
        by_type = {c.chall.typ: c for c in authz.body.challenges}
        order = ("http-01", "tls-alpn-01") if self.challenge == "http-01" else ("tls-alpn-01", "http-01")
        for typ in order:
            body = by_type.get(typ)
            if body is None:
                continue
            chall = body.chall
            assert isinstance(chall, challenges.KeyAuthorizationChallenge)
            response, validation = chall.response_and_validation(key)
            token = chall.encode("token")
            if typ == "http-01":
                self.book.put_http01(token, validation)
                retry_bad_nonce(acme.answer_challenge, body, response)
                return token, None
            self.book.put_alpn(host, tls_alpn_challenge_context(host, validation))
            retry_bad_nonce(acme.answer_challenge, body, response)
            return None, host
        raise errors.Error(f"the ACME server offers neither http-01 nor tls-alpn-01 for {host}")

    def _ari(self, acme: client.ClientV2, chain_pem: bytes) -> float | None:
        """The ACME server's suggested renewal time (ARI), if its directory has renewalInfo."""
        try:
            if "renewalInfo" not in acme.directory.to_partial_json():
                return None
            when, _ = acme.renewal_time(chain_pem)
        except Exception as exc:
            log.warning("failed: ACME renewal information: %s", exc)
            return None
        return when.timestamp() if when is not None else None
