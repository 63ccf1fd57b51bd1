"""Credentials for tests, fingerprinted under a fixed key (a data directory's secret stands in)."""
from mirror.upstream.credentials import Credentials, Fingerprinter

FINGERPRINTS = Fingerprinter(b"k" * 32)


def creds(username: str, password: str) -> Credentials:
    return FINGERPRINTS.credentials(username, password)
