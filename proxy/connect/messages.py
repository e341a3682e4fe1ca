"""The refusals and errors of the authorise flow: the page catalogue and `Refused`.

Each message has a status, a stable name (the `X-Pleo-Proxy-Page` header), a heading and
an explanation for a person. No I/O; must not hold a code, a state or a token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One refusal or error page: its status, a stable name, and what a person should read."""

    status: int
    name: str
    heading: str
    explanation: str


NOT_ALLOWED = Message(
    403,
    "setup_code_invalid",
    "This link is not valid",
    "This page needs the one-time address the proxy printed when it started (the one with"
    " ?setup= in it). Run `pleo-proxy authorize-url` on the proxy's machine to see the"
    " current one; an address from an earlier start no longer works.",
)
ALREADY_CONNECTED = Message(
    410,
    "already_connected",
    "Already connected",
    "This proxy is already connected to Pleo, so this page is closed. To reconnect (for"
    " example to another company), run `pleo-proxy logout` on the proxy's machine; a new"
    " address will be printed.",
)
UNKNOWN_CONNECTION = Message(
    404,
    "unknown_connection",
    "No such connection",
    "This proxy has no connection of that name, so there is nothing to connect. Ask"
    " whoever sent the link for a new one.",
)
LINK_EXPIRED = Message(
    410,
    "link_expired",
    "This connect link has expired",
    "Connect links work for a limited time, and this one is past it. Nothing was changed."
    " Ask whoever sent it for a new link (they can make one with `pleo-proxy connect` or"
    " the proxy's admin API).",
)
MISSING_STATE = Message(
    400,
    "state_missing",
    "Incomplete answer from Pleo",
    "This address does not carry the information Pleo adds when it sends you back."
    " Start again from the proxy's authorise page.",
)
UNKNOWN_STATE = Message(
    400,
    "state_unknown",
    "This sign-in has expired or was already used",
    "Each visit to Pleo can be completed once, within 10 minutes. Start again from the"
    " proxy's authorise page.",
)
NO_COOKIE = Message(
    400,
    "state_cookie_missing",
    "Started in another browser",
    "This answer from Pleo belongs to a sign-in that was started in a different browser"
    " (or with cookies blocked). Finish it in the browser where you pressed the button,"
    " or start again here.",
)
DENIED = Message(
    403,
    "access_denied",
    "Access was not granted",
    "Pleo reports that the access was declined, so nothing was changed. If that was a"
    " mistake, start again and approve the access.",
)
PLEO_ERROR = Message(
    400,
    "authorization_error",
    "Pleo refused the request",
    "Pleo answered with an error instead of an approval, so nothing was changed.",
)
MISSING_CODE = Message(
    400,
    "code_missing",
    "Incomplete answer from Pleo",
    "Pleo sent you back without an authorisation code, so nothing was changed.",
)
CODE_REFUSED = Message(
    400,
    "code_refused",
    "Pleo did not accept the sign-in",
    "Pleo refused to turn this sign-in into access (it may have taken too long, or been"
    " used already). Nothing was changed; start again.",
)
CLIENT_REJECTED = Message(
    502,
    "client_rejected",
    "Pleo rejected this proxy's client credentials",
    "Pleo does not accept the client ID and secret this proxy is configured with. The"
    " operator must fix pleo.client_id / pleo.client_secret and restart the proxy.",
)
PLEO_UNAVAILABLE = Message(
    503,
    "token_endpoint_unavailable",
    "Pleo could not be reached",
    "The proxy could not reach Pleo to finish connecting (network trouble or a Pleo"
    " outage). Nothing was changed; try again in a moment.",
)
SAVE_FAILED = Message(
    503,
    "store_error",
    "The connection could not be saved",
    "Pleo granted access but the proxy could not store it. The proxy's log says why;"
    " fix that and start again.",
)
BAD_PASTE = Message(
    400,
    "redirect_url_invalid",
    "That is not the address Pleo sent you back to",
    "Paste the whole address from the browser's address bar after approving in Pleo;"
    " it contains ?code= and &state=.",
)


class Refused(Exception):
    """A request of the flow that is answered with an error page and changes nothing."""

    def __init__(self, message: Message, *, retry: bool = False, detail: str = "") -> None:
        super().__init__(message.name)
        self.message = message
        self.retry = retry  # the browser proved it started this flow: offer a way back
        self.detail = detail
        self.connection: str | None = None  # set once the flow is known
        self.return_to: str | None = None  # the connect link's: the browser goes back there

    @property
    def result(self) -> str:
        """What `return_to` is told: the customer said no, or something went wrong."""
        return "denied" if self.message is DENIED else "error"


def authorization_error(error: str) -> Refused:
    """The page for Pleo's `error=` answer (RFC 6749 §4.1.2.1); the code is shown if plain."""
    if error == "access_denied":
        return Refused(DENIED, retry=True)
    shown = error if error.isascii() and error.replace("_", "").isalnum() else "unrecognised"
    return Refused(PLEO_ERROR, retry=True, detail=f"(Pleo's error code: {shown[:64]})")
