"""`WWW-Authenticate` challenges (RFC 9110 §11.6.1), as registries send them.

Registries answer 401 with one or more challenges, e.g.
`WWW-Authenticate: Basic realm="r", Bearer realm="https://auth/token",service="reg"`
(or the two on separate header lines). `parse_challenges` reads them all; `select_challenge`
picks the one to answer, preferring Bearer.

PyPI has no maintained parser of several challenges in one field (werkzeug parses one), so
this is a small scanner over the RFC's productions.
"""
from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass

# RFC 9110 §5.6.2 tchar, and the token68 alphabet of §11.2 (without its trailing "=" padding).
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_TOKEN68 = frozenset(string.ascii_letters + string.digits + "-._~+/")
_WS = " \t"


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` field: scheme (lower case), auth-params (names in
    lower case, values unquoted) or a token68."""

    scheme: str
    params: dict[str, str]
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


class _Scanner:
    """A cursor over one field value, with the RFC 9110 productions the challenge grammar uses."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.peek() and self.peek() in _WS:
            self.pos += 1

    def run(self, chars: frozenset[str]) -> str:
        start = self.pos
        while self.peek() and self.peek() in chars:
            self.pos += 1
        return self.text[start:self.pos]

    def quoted_string(self) -> str | None:
        """A quoted-string with its backslash escapes undone; None (cursor kept) if unterminated."""
        start, out = self.pos, list[str]()
        self.pos += 1  # the opening DQUOTE
        while not self.at_end():
            char = self.text[self.pos]
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\" and not self.at_end():
                char = self.text[self.pos]
                self.pos += 1
            out.append(char)
        self.pos = start
        return None

    def auth_param(self) -> tuple[str, str] | None:
        """`token BWS "=" BWS ( token / quoted-string )`; None (cursor kept) when not one."""
        start = self.pos
        name = self.run(_TCHAR)
        self.skip_ws()
        if name and self.peek() == "=":
            self.pos += 1
            self.skip_ws()
            value = self.quoted_string() if self.peek() == '"' else (self.run(_TCHAR) or None)
            if value is not None and self._element_ends():
                return name.lower(), value
        self.pos = start
        return None

    def token68(self) -> str | None:
        """`1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="` ending the element."""
        start = self.pos
        value = self.run(_TOKEN68)
        value += self.run(frozenset("="))
        if value and self._element_ends():
            return value
        self.pos = start
        return None

    def _element_ends(self) -> bool:
        """Whether only OWS stands between the cursor and a list comma (or the end)."""
        end = self.pos
        while end < len(self.text) and self.text[end] in _WS:
            end += 1
        return end >= len(self.text) or self.text[end] == ","

    def next_element(self) -> None:
        """Skip the rest of an element that does not parse, up to the next comma outside quotes."""
        while not self.at_end() and self.peek() != ",":
            if self.peek() == '"' and self.quoted_string() is not None:
                continue
            self.pos += 1

    def list_separators(self) -> None:
        """OWS and commas between list elements (empty elements are allowed, RFC 9110 §5.6.1)."""
        while self.peek() and self.peek() in _WS + ",":
            self.pos += 1


def parse_challenges(values: str | Iterable[str]) -> list[Challenge]:
    """Every challenge in `WWW-Authenticate` field values, in order (RFC 9110 §11.6.1).

    Several field lines mean the same as one joined with commas. A comma separates both the
    params of a challenge and the challenges themselves: an element `name=value` is a param
    of the challenge before it, an element starting with a bare token starts a new one.
    Parsing is tolerant: a malformed part is skipped, a parameter named twice keeps its first
    value, and nothing raises.
    """
    text = values if isinstance(values, str) else ", ".join(values)
    scan, found = _Scanner(text), list[Challenge]()
    current: Challenge | None = None
    while True:
        scan.list_separators()
        if scan.at_end():
            return found
        if current is not None and (param := scan.auth_param()) is not None:
            current.params.setdefault(*param)
            continue
        scheme = scan.run(_TCHAR)
        if not scheme or (scan.peek() and scan.peek() not in _WS + ","):
            current = None  # not a challenge: the params that follow belong to nothing
            scan.next_element()
            continue
        scan.skip_ws()
        current = Challenge(scheme.lower(), {})
        found.append(current)
        if (param := scan.auth_param()) is not None:
            current.params.setdefault(*param)
        elif (token68 := scan.token68()) is not None:
            found[-1] = current = Challenge(current.scheme, {}, token68)
        elif not scan.at_end() and scan.peek() != ",":
            scan.next_element()


def select_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer with a realm when offered, else Basic, else None."""
    offered = list(challenges)
    for challenge in offered:
        if challenge.scheme == "bearer" and challenge.realm:
            return challenge
    return next((c for c in offered if c.scheme == "basic"), None)


def parse_challenge(values: str | Iterable[str]) -> Challenge | None:
    """The challenge to answer among those in `WWW-Authenticate` values (see `select_challenge`)."""
    return select_challenge(parse_challenges(values))
