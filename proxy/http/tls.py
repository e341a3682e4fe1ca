"""TLS for the main listener and the connections' own ports: the server context, and
replacing its certificate on SIGHUP.

TLS 1.2 or later. The listening sockets keep one SSLContext for their lifetime; every
handshake is handed the context that holds the current certificate (an SNI callback,
which OpenSSL runs for every ClientHello, with a server name or without). A reload
builds and checks a complete new context first, so a bad or mismatched file leaves the
running certificate in use: loading a new pair into a live context in place would leave
it failing every handshake when the pair does not match. Must not bind sockets, build
routes, or put the key's content in a message.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web

from proxy.errors import ProxyError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ProxyError):
    """The certificate or key cannot be used (unreadable, not PEM, not a pair, encrypted)."""

    code = "tls_error"


def _no_password() -> str:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise TlsError("the key is encrypted; give listen.tls_key an unencrypted PEM key")


def _reason(exc: ssl.SSLError) -> str:
    known = {
        "KEY_VALUES_MISMATCH": "the key does not belong to the certificate",
        "PEM_LIB": "not a PEM certificate and key",
        "NO_START_LINE": "not a PEM certificate and key",
        "EE_KEY_TOO_SMALL": "the key is too small",
        "CA_MD_TOO_WEAK": "the certificate's signature is too weak",
    }
    # None for OpenSSL's "PEM lib" (typeshed says str): a file held no PEM at all.
    reason: str | None = getattr(exc, "reason", None)
    if not reason:
        return "not a PEM certificate and key"
    return known.get(reason, reason.lower().replace("_", " "))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for `cert` (PEM, with any intermediates after it) and `key`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    # Client-initiated renegotiation (TLS 1.2) costs the server a handshake per request.
    context.options |= ssl.OP_NO_RENEGOTIATION
    for path in (cert, key):  # OpenSSL's own error would not say which file is missing
        try:
            path.open("rb").close()
        except OSError as exc:
            raise TlsError(
                f"cannot read {str(path)!r}: {(exc.strerror or 'error').lower()}"
            ) from None
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        reason = _reason(exc) if isinstance(exc, ssl.SSLError) else "cannot be read"
        raise TlsError(
            f"cannot use listen.tls_cert {str(cert)!r} with listen.tls_key {str(key)!r}: {reason}"
        ) from None
    return context


class TlsCertificates:
    """The context the sockets listen with, and the certificate new handshakes get."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._current = server_context(cert, key)
        self.context = self._current
        self.context.sni_callback = self._hand_over

    def _hand_over(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        connection.context = self._current

    def reload(self, cert: Path, key: Path) -> None:
        """Use `cert` and `key` for new handshakes; TlsError (and no change) when unusable.

        Connections already open keep the certificate they were made with.
        """
        self._current = server_context(cert, key)


def certificates_for(cert: Path | None, key: Path | None) -> TlsCertificates | None:
    """The TLS certificates of the listeners, or None when they speak plain HTTP."""
    if cert is None or key is None:
        return None
    return TlsCertificates(cert, key)


TLS_KEY = web.AppKey("tls", TlsCertificates)
