"""`mirror.cache.warm` against a mirror in front of the fake registry: what it pulls, and what it reports."""
from __future__ import annotations

import io
import os

import pytest

from mirror.cache import warm as warming
from mirror.cache.warm import Summary, warm
from tests.conftest import Mirror
from tests.fakes.registry import FakeRegistry, Image, Manifest

PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def url(mirror: Mirror) -> str:
    return str(mirror.client.make_url("/"))


def parts(image: Image) -> list[str]:
    return [image.digest, image.config_digest, *image.layer_digests]


def size(image: Image) -> int:
    return len(image.body) + len(image.config) + sum(map(len, image.layers))


def cached(mirror: Mirror, digests: list[str]) -> list[bool]:
    store = mirror.services.blobs.store
    return [store.size(d) is not None for d in digests]


def multi(fake: FakeRegistry, repo: str = "library/multi") -> tuple[Manifest, dict[str, Image]]:
    """An index tagged 1 with an image for each of PLATFORMS."""
    images = {p: fake.add_image(repo, None, [os.urandom(5_000)], platform=p) for p in PLATFORMS}
    return fake.add_index(repo, "1", list(images.values())), images


async def warmed(mirror: Mirror, refs: list[str], platforms: list[str] | None = None, jobs: int = 1,
                 stream: io.StringIO | None = None) -> Summary:
    summary = await warm(url(mirror), refs, platforms or [], jobs, stream=stream or io.StringIO())
    await mirror.settled()
    return summary


async def test_an_index_is_warmed_for_every_platform_then_found_cached(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    index, images = multi(fake_registry)
    summary = await warmed(mirror, ["library/multi:1"])
    [outcome] = summary.outcomes
    assert (outcome.ref, outcome.error, outcome.fetched) == ("library/multi:1", None, True)
    assert outcome.bytes == len(index.body) + sum(map(size, images.values()))
    assert cached(mirror, [index.digest, *(d for image in images.values() for d in parts(image))]) == [True] * 10
    assert fake_registry.count("GET", "blob") == 6
    assert summary.lines() == [f"warm: 1 pulled, 0 already cached, 0 failed, {outcome.bytes / 2**20:.1f} MiB"]
    fake_registry.reset_counts()
    again = await warmed(mirror, ["library/multi:1"])
    assert not again.outcomes[0].fetched and again.outcomes[0].bytes == outcome.bytes
    assert again.lines()[0].startswith("warm: 0 pulled, 1 already cached, 0 failed")
    assert fake_registry.count("GET") == 0


@pytest.mark.parametrize("chosen", [["linux/arm64"], ["linux/arm/v7", "linux/amd64"], ["linux/arm"]])
async def test_chosen_platforms_only_are_warmed(mirror: Mirror, fake_registry: FakeRegistry, chosen: list[str]) -> None:
    index, images = multi(fake_registry)
    summary = await warmed(mirror, ["library/multi:1"], chosen)
    assert summary.failed == []
    wanted = {p for p in PLATFORMS if p in chosen or p.rpartition("/")[0] in chosen}  # os/arch names its variants too
    for platform, image in images.items():
        assert cached(mirror, parts(image)) == [platform in wanted] * 3, platform
    assert summary.outcomes[0].bytes == len(index.body) + sum(size(images[p]) for p in wanted)


async def test_a_platform_the_index_lacks_fails_that_reference(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    multi(fake_registry)
    summary = await warmed(mirror, ["library/multi:1"], ["windows/amd64"])
    assert [o.error for o in summary.failed] == ["no manifest for platform(s) windows/amd64"]
    assert fake_registry.count("GET", "blob") == 0


async def test_attestation_manifests_are_not_warmed_by_default(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", None, 1)
    attestation = fake_registry.add_image("library/app", None, 1, platform="unknown/unknown")
    fake_registry.add_index("library/app", "1", [image, attestation], kind="oci-index")
    assert (await warmed(mirror, ["library/app:1"])).failed == []
    assert cached(mirror, parts(image)) == [True] * 3
    assert cached(mirror, parts(attestation)) == [False] * 3


async def test_a_missing_reference_fails_alone(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "1", 2)
    by_digest = fake_registry.add_image("library/other", None, 1)
    refs = ["library/nope:1", "library/app:1", "library/app:nope", f"library/other@{by_digest.digest}"]
    summary = await warmed(mirror, refs, jobs=2)
    errors = {o.ref: o.error for o in summary.outcomes}
    assert errors.keys() == set(refs)
    assert errors["library/app:1"] is None and errors[f"library/other@{by_digest.digest}"] is None
    assert str(errors["library/nope:1"]).startswith("/v2/library/nope/manifests/1: 404 ")
    assert str(errors["library/app:nope"]).startswith("/v2/library/app/manifests/nope: 404 ")
    assert cached(mirror, parts(image) + parts(by_digest)) == [True] * 7
    assert summary.lines()[0].startswith("warm: 2 pulled, 0 already cached, 2 failed")
    assert sorted(summary.lines()[1:]) == sorted(f"  failed {ref}: {errors[ref]}" for ref in refs[::2])


async def test_an_unreachable_mirror_fails_every_reference(fake_registry: FakeRegistry) -> None:
    summary = await warm("http://127.0.0.1:9", ["library/app:1", "library/b:1"], [], 2, stream=io.StringIO())
    assert len(summary.failed) == 2 and all(o.error for o in summary.failed)


async def test_progress_goes_to_logs_as_plain_lines(
        mirror: Mirror, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warming, "REPORT_EVERY", 0.0)  # a bytes line for every chunk read
    fake_registry.add_image("library/app", "1", [os.urandom(3 << 20)])
    cached_one = fake_registry.add_image("library/cached", "1", 1)
    await warmed(mirror, ["library/cached:1"])
    stream = io.StringIO()
    await warmed(mirror, ["library/app:1", "library/cached:1", "library/nope:1"], stream=stream)
    lines = stream.getvalue().splitlines()
    assert "\x1b" not in stream.getvalue() and "\r" not in stream.getvalue()  # no bars
    assert [line.split(" (")[0] for line in lines if "] " in line] == [
        "warm: [1/3] library/app:1 pulled", "warm: [2/3] library/cached:1 cached", "warm: [3/3] library/nope:1 failed"]
    assert f"[2/3] library/cached:1 cached ({size(cached_one) / 2**20:.1f} MiB)" in stream.getvalue()
    assert any(line.startswith("warm: 0/3 images, ") for line in lines)
    assert lines.index(next(line for line in lines if line.startswith("warm: 0/3 images"))) < lines.index(
        next(line for line in lines if "[1/3]" in line))


async def test_progress_on_a_terminal_is_drawn_as_bars(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/app", "1", 2)
    terminal = Terminal()
    summary = await warmed(mirror, ["library/app:1"], stream=terminal)
    assert summary.failed == []
    drawn = terminal.getvalue()
    assert "total" in drawn and "images" in drawn and "1/1" in drawn
    assert "warm: [1/1]" not in drawn  # no log lines on a terminal
