"""Kind 5: `WWW-Authenticate` with several challenges, parsed as RFC 9110 §11.6.1 defines,
and token URLs built whatever the realm already carries."""
from __future__ import annotations

import pytest

from mirror.upstream.authorizer import token_url
from mirror.upstream.challenges import Challenge, parse_challenge, parse_challenges, select_challenge

BEARER = Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})


@pytest.mark.parametrize("values", [
    ['Basic realm="r", Bearer realm="https://auth.example/token",service="reg"'],
    ['Bearer realm="https://auth.example/token",service="reg", Basic realm="r"'],
    ['Basic realm="r"', 'Bearer realm="https://auth.example/token",service="reg"'],
    ['BEARER REALM="https://auth.example/token" , Service=reg', "basic realm=r"],
    ['Bearer realm = "https://auth.example/token",  service = "reg"'],
    ['Negotiate a87421bff012e83c==, Bearer realm="https://auth.example/token",service=reg'],
    [', , Bearer realm="https://auth.example/token",,service="reg",'],
    ['Newauth realm="apps", type=1, title="Login to \\"apps\\"", Bearer realm="https://auth.example/token",service=reg'],
])
def test_kind5_bearer_is_chosen_among_several_challenges(values: list[str]) -> None:
    chosen = parse_challenge(values)
    assert chosen is not None and chosen.scheme == "bearer"
    assert chosen.params == BEARER.params


def test_kind5_every_challenge_is_read_in_order_with_its_own_params() -> None:
    got = parse_challenges('Newauth realm="apps", type=1, title="Login to \\"apps\\"", '
                           'Basic realm="simple", Negotiate a87421bff012e83c==')
    assert got == [
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        Challenge("basic", {"realm": "simple"}),
        Challenge("negotiate", {}, "a87421bff012e83c=="),
    ]


def test_kind5_quoted_strings_keep_their_commas_and_escapes() -> None:
    got = parse_challenges('Bearer realm="https://a/t?x=1,2",scope="repository:a/b:pull,push '
                           'repository:c:pull",error="say \\"no\\", twice"')
    assert got == [Challenge("bearer", {"realm": "https://a/t?x=1,2",
                                        "scope": "repository:a/b:pull,push repository:c:pull",
                                        "error": 'say "no", twice'})]


def test_kind5_a_param_named_twice_keeps_its_first_value() -> None:
    assert parse_challenges('Bearer realm="https://a/1", realm="https://b/2"')[0].realm == "https://a/1"


def test_kind5_basic_is_answered_when_it_is_all_there_is() -> None:
    assert parse_challenge('Negotiate abc, Basic realm="x"') == Challenge("basic", {"realm": "x"})
    assert parse_challenge("Negotiate abc") is None
    assert parse_challenge('Bearer service="no realm"') is None


@pytest.mark.parametrize("garbage", [
    "", " ", ",,,", '"', '"unterminated', "=", "==,==", "Bearer realm=", 'Bearer realm="https://a',
    "Bearer realm=a=b", "\x00\x01\x7f", "Bearer\trealm\t=\t", "Bearer ,,, =x", 'realm="x"',
    "\u00ff\u00fe Bearer", "Bearer " + "a," * 5000, '"' * 1001, "\\", 'Bearer realm="\\',
])
def test_kind5_garbage_never_raises(garbage: str) -> None:
    challenges = parse_challenges(garbage)
    assert all(isinstance(c, Challenge) for c in challenges)
    chosen = select_challenge(challenges)
    assert chosen is None or chosen.scheme in ("bearer", "basic")


def test_kind5_token_url_appends_to_a_realm_that_has_a_query() -> None:
    url = token_url("https://auth.example/token?account=ci&x=%2F", "reg", ["repository:a/b:pull"])
    assert url == "https://auth.example/token?account=ci&x=%2F&scope=repository%3Aa%2Fb%3Apull&service=reg"


def test_kind5_token_url_without_a_query_or_service() -> None:
    assert token_url("https://auth.example/token", None, ["repository:a:pull", "repository:b:pull"]) == (
        "https://auth.example/token?scope=repository%3Aa%3Apull&scope=repository%3Ab%3Apull")
    assert token_url("https://auth.example", "s", []) == "https://auth.example/?service=s"


@pytest.mark.parametrize("realm", ["", "/token", "token", "ftp://auth.example/token", "https://", "javascript:x",
                                   "https://auth.example/token#frag", "https://auth.example/token#",
                                   "https://user:pw@auth.example/token", "https://auth.example:99999/token",
                                   "https://auth.example:x/token"])
def test_kind5_token_url_refuses_a_realm_that_is_not_an_http_url(realm: str) -> None:
    with pytest.raises(ValueError):
        token_url(realm, "s", ["repository:a:pull"])
