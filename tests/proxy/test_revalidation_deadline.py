"""A hanging upstream: what the cache holds is answered by the revalidation deadline, what it
lacks waits for upstream, and revalidations past the deadline finish in the background.

The upstream here accepts connections and never answers (`stall_before_headers`) until a test
releases it. `read_timeout` is long (READ_TIMEOUT) and `revalidate_timeout` short (DEADLINE),
so an answer that comes in well under READ_TIMEOUT came from the deadline.
"""
from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest

from aiohttp import web

from mirror.app import make_app
from mirror.proxy import referrers as referrers_module
from mirror.proxy import tags as tags_module
from mirror.routes import SERVICES
from mirror.workers.role import WorkerRole
from tests.conftest import TAG_TTL, FakeClock, Mirror, mirror_config
from tests.fakes.registry import Call, FakeRegistry
from tests.proxy.test_access import basic
from tests.proxy.test_manifests import ACCEPT
from tests.proxy.test_referrers import SBOM, _referrer
from tests.workers.conftest import multiprocess_values  # noqa: F401 (a fixture)

DEADLINE = 0.2
READ_TIMEOUT = 30.0
BOUND = 5.0  # how long a test waits for what should come by the deadline: far below READ_TIMEOUT
ACCESS_TTL = 60.0


async def _mirror(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client, **settings: object) -> Mirror:  # type: ignore[no-untyped-def]
    """The mirror in front of the fake registry, with a long read timeout and a short deadline."""
    assert fake_registry.url
    config = mirror_config(fake_registry.url, tmp_path / "data", read_timeout=READ_TIMEOUT,
                           revalidate_timeout=DEADLINE, access_ttl=ACCESS_TTL, **settings)
    clock = FakeClock()
    app = make_app(config, clock=clock)
    return Mirror(await aiohttp_client(app), clock, app, tmp_path / "data")


@pytest.fixture
async def mirror(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client) -> Mirror:  # type: ignore[no-untyped-def]
    return await _mirror(fake_registry, tmp_path, aiohttp_client)


async def _timed_get(mirror: Mirror, path: str, **headers: str) -> tuple[int, str, bytes, float]:
    """(status, X-Mirror-Cache, body, seconds taken) of a GET that must end within BOUND."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def get() -> tuple[int, str, bytes]:
        resp = await mirror.client.get(path, headers={**ACCEPT, **headers})
        return resp.status, resp.headers.get("X-Mirror-Cache", ""), await resp.read()

    status, result, body = await asyncio.wait_for(get(), BOUND)
    return status, result, body, loop.time() - started


async def _release(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    """Let upstream answer, and wait for every revalidation left to the background."""
    fake_registry.stall_before_headers = False
    services = mirror.services
    await asyncio.wait_for(asyncio.gather(
        services.manifests.background.idle(), services.manifests.access.background.idle(),
        services.tags.background.idle(), services.referrers.background.idle(),
    ), BOUND)


def _head_paths(fake_registry: FakeRegistry) -> list[str]:
    return [c.path for c in fake_registry.requests if c.method == "HEAD"]


async def test_expired_tag_is_served_stale_by_the_deadline_and_refreshed_in_the_background(
    mirror: Mirror, fake_registry: FakeRegistry,
) -> None:
    old = fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    new = fake_registry.add_image("library/alpine", "3", 1)  # the tag moves upstream meanwhile
    mirror.clock.advance(TAG_TTL + 1)
    fake_registry.stall_before_headers = True
    fake_registry.reset_counts()

    status, result, body, took = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "stale", old.body)
    assert DEADLINE <= took < BOUND
    assert mirror.services.metrics.stale_served.labels("docker.io", "timeout")._value.get() == 1

    # while the revalidation is overdue, the next client gets the stale copy without waiting again
    status, result, body, took = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "stale", old.body)
    assert took < DEADLINE
    assert _head_paths(fake_registry).count("/v2/library/alpine/manifests/3") == 1

    await _release(mirror, fake_registry)
    fake_registry.reset_counts()
    status, result, body, _ = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "hit", new.body)
    assert fake_registry.count() == 0


async def test_a_head_that_falls_back_to_a_get_is_bounded_by_the_deadline_too(
    mirror: Mirror, fake_registry: FakeRegistry,
) -> None:
    old = fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    new = fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.omit_digest_header = True  # a HEAD that cannot tell: the revalidation GETs

    class HangOnGet(list):  # type: ignore[type-arg]
        """The fake's request log; it records before it stalls, so the HEAD answers and the GET hangs."""

        def append(self, call: Call) -> None:
            super().append(call)
            if call.method == "GET":
                fake_registry.stall_before_headers = True

    fake_registry.requests = HangOnGet()
    mirror.clock.advance(TAG_TTL + 1)

    status, result, body, took = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "stale", old.body)
    assert DEADLINE <= took < BOUND
    assert [(c.method, c.path) for c in fake_registry.requests if c.path.endswith("/3")] == [
        ("HEAD", "/v2/library/alpine/manifests/3"), ("GET", "/v2/library/alpine/manifests/3")]

    fake_registry.requests = list(fake_registry.requests)  # GETs hang no more
    await _release(mirror, fake_registry)
    fake_registry.reset_counts()
    status, result, body, _ = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "hit", new.body)
    assert fake_registry.count() == 0


async def test_a_revalidation_that_fails_in_the_background_is_logged_not_left_unretrieved(
    mirror: Mirror, fake_registry: FakeRegistry, caplog: pytest.LogCaptureFixture,
) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    mirror.clock.advance(TAG_TTL + 1)
    fake_registry.stall_before_headers = True
    status, result, body, _ = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "stale", image.body)

    fake_registry.fail_status = 503  # what upstream says once it answers
    with caplog.at_level(logging.INFO):
        await _release(mirror, fake_registry)
        gc.collect()  # asyncio reports an exception never retrieved when the task is collected
    assert mirror.services.metrics.tag_revalidations.labels("error")._value.get() == 1
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(r.getMessage().startswith("revalidation of docker.io/library/alpine:3: failed in the background")
               for r in caplog.records)

    # the tag stays expired: the next request asks upstream again
    fake_registry.reset_counts()
    status, result, _, _ = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result) == (200, "stale")
    assert fake_registry.count("HEAD", "manifest") >= 1


async def test_a_secondary_worker_hands_an_expired_tag_to_the_primary_which_answers_by_the_deadline(
    fake_registry: FakeRegistry, tmp_path: Path, multiprocess_values: str, aiohttp_client,  # type: ignore[no-untyped-def]
) -> None:
    assert fake_registry.url
    config = mirror_config(fake_registry.url, tmp_path / "data", read_timeout=READ_TIMEOUT, revalidate_timeout=DEADLINE)
    clock, socket = FakeClock(), str(tmp_path / "primary.sock")
    primary = make_app(config, clock=clock, role=WorkerRole(0, socket, multiprocess_values))
    runner = web.AppRunner(primary)
    await runner.setup()
    await web.UnixSite(runner, socket).start()
    try:
        secondary = await aiohttp_client(make_app(config, clock=clock, role=WorkerRole(1, socket, multiprocess_values)))
        worker = Mirror(secondary, clock, secondary.app, tmp_path / "data")
        old = fake_registry.add_image("library/alpine", "3", 1)
        status, result, _, _ = await _timed_get(worker, "/v2/library/alpine/manifests/3")
        assert (status, result) == (200, "miss")
        new = fake_registry.add_image("library/alpine", "3", 1)
        clock.advance(TAG_TTL + 1)
        fake_registry.stall_before_headers = True

        status, result, body, took = await _timed_get(worker, "/v2/library/alpine/manifests/3")
        assert (status, result, body) == (200, "stale", old.body)
        assert DEADLINE <= took < BOUND

        fake_registry.stall_before_headers = False
        await asyncio.wait_for(primary[SERVICES].manifests.background.idle(), BOUND)
        fake_registry.reset_counts()
        status, result, body, _ = await _timed_get(worker, "/v2/library/alpine/manifests/3")
        assert (status, body) == (200, new.body)
        assert fake_registry.count() == 0
    finally:
        fake_registry.stall_before_headers = False
        await runner.cleanup()


async def test_a_tag_the_mirror_never_cached_waits_for_upstream_past_the_deadline(
    mirror: Mirror, fake_registry: FakeRegistry,
) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.stall_before_headers = True
    pull = asyncio.create_task(_timed_get(mirror, "/v2/library/alpine/manifests/3"))
    done, _ = await asyncio.wait({pull}, timeout=3 * DEADLINE)
    assert not done  # no stale copy to give: still waiting for upstream, not failed at the deadline

    fake_registry.stall_before_headers = False
    status, result, body, _ = await pull
    assert (status, result, body) == (200, "miss", image.body)
    assert mirror.services.metrics.stale_served.labels("docker.io", "timeout")._value.get() == 0


async def test_an_expired_access_decision_stands_by_the_deadline_while_upstream_hangs(
    mirror: Mirror, fake_registry: FakeRegistry,
) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    layer = f"/v2/library/alpine/blobs/{image.layer_digests[0]}"
    assert (await mirror.client.get(layer)).status == 200
    await mirror.settled()
    mirror.clock.advance(ACCESS_TTL + 1)  # the tag is fresh, the anonymous access decision expired
    fake_registry.stall_before_headers = True
    fake_registry.reset_counts()

    status, result, body, took = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "hit", image.body)
    assert DEADLINE <= took < BOUND
    status, result, body, took = await _timed_get(mirror, layer)  # while that check is overdue: at once
    assert (status, result, body) == (200, "hit", image.layers[0])
    assert took < DEADLINE
    assert fake_registry.count() == 1  # one re-check, in the background

    await _release(mirror, fake_registry)
    fake_registry.reset_counts()
    for path in ("/v2/library/alpine/manifests/3", layer):
        status, result, _, _ = await _timed_get(mirror, path)
        assert (status, result) == (200, "hit")
    assert fake_registry.count() == 0  # the re-check recorded upstream's answer


async def test_an_expired_tag_and_access_decision_together_are_answered_by_one_deadline(
    fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client,  # type: ignore[no-untyped-def]
) -> None:
    # anonymous clients pull with a service account: their access is checked before revalidating
    mirror = await _mirror(fake_registry, tmp_path, aiohttp_client, username="svc", password="pw")
    image = fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    mirror.clock.advance(TAG_TTL + 1)
    fake_registry.stall_before_headers = True

    status, result, body, took = await _timed_get(mirror, "/v2/library/alpine/manifests/3")
    assert (status, result, body) == (200, "stale", image.body)
    assert DEADLINE <= took < 2 * DEADLINE  # access check, revalidation and the check again: one deadline
    await _release(mirror, fake_registry)


async def test_a_principal_upstream_never_answered_for_is_not_served_on_a_guess(
    mirror: Mirror, fake_registry: FakeRegistry,
) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    fake_registry.stall_before_headers = True
    pull = asyncio.create_task(_timed_get(mirror, "/v2/library/alpine/manifests/3", **basic("bob", "pw")))
    done, _ = await asyncio.wait({pull}, timeout=3 * DEADLINE)
    assert not done  # bob has no answer from upstream to stand: the check waits for it

    fake_registry.stall_before_headers = False
    status, result, body, _ = await pull
    assert (status, result, body) == (200, "hit", image.body)


async def test_a_tag_list_is_served_from_its_cache_by_the_deadline(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/alpine", "3", 1)
    status, result, body, _ = await _timed_get(mirror, "/v2/library/alpine/tags/list")
    assert (status, result) == (200, "miss")
    fake_registry.add_image("library/alpine", "4", 1)
    mirror.clock.advance(tags_module.FRESH_FOR + 1)
    fake_registry.stall_before_headers = True

    status, result, stale, took = await _timed_get(mirror, "/v2/library/alpine/tags/list")
    assert (status, result, stale) == (200, "stale", body)
    assert DEADLINE <= took < BOUND

    await _release(mirror, fake_registry)
    fake_registry.reset_counts()
    status, result, body, _ = await _timed_get(mirror, "/v2/library/alpine/tags/list")
    assert (status, result) == (200, "hit")
    assert b'"4"' in body
    assert fake_registry.count() == 0


async def test_referrers_are_served_from_their_cache_by_the_deadline(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "v1", 1, kind="oci")
    sbom = _referrer(fake_registry, "library/app", image, SBOM, "sbom")
    status, result, body, _ = await _timed_get(mirror, f"/v2/app/referrers/{image.digest}")
    assert (status, result) == (200, "miss") and sbom.encode() in body
    later = _referrer(fake_registry, "library/app", image, SBOM, "later")
    mirror.clock.advance(referrers_module.FRESH_FOR + 1)
    fake_registry.stall_before_headers = True

    status, result, stale, took = await _timed_get(mirror, f"/v2/app/referrers/{image.digest}")
    assert (status, result, stale) == (200, "stale", body)
    assert DEADLINE <= took < BOUND

    await _release(mirror, fake_registry)
    fake_registry.reset_counts()
    status, result, body, _ = await _timed_get(mirror, f"/v2/app/referrers/{image.digest}")
    assert (status, result) == (200, "hit") and later.encode() in body
    assert fake_registry.count() == 0


async def test_revalidations_left_running_are_cancelled_before_shutdown_closes_the_database(
        fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data", read_timeout=30.0, revalidate_timeout=0.2),
                   clock=clock)
    client = await aiohttp_client(app)
    fake_registry.add_image("library/app", "1", 1)
    assert (await client.get("/v2/library/app/manifests/1", headers=ACCEPT)).status == 200
    clock.advance(TAG_TTL + 1)
    fake_registry.stall_before_headers = True
    resp = await asyncio.wait_for(client.get("/v2/library/app/manifests/1", headers=ACCEPT), BOUND)
    assert resp.headers["X-Mirror-Cache"] == "stale"
    assert app[SERVICES].manifests.background._tasks, "the revalidation goes on in the background"
    await asyncio.wait_for(client.close(), BOUND)  # shutdown: the background work is cancelled first
    fake_registry.stall_before_headers = False
    assert not app[SERVICES].manifests.background._tasks
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
