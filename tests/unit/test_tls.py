"""TLS for the platform's HTTP client: one context per process, and only for https."""

from __future__ import annotations

import ssl

from adsync.runner import tls_verify


def test_a_plain_http_platform_gets_no_tls_context() -> None:
    assert tls_verify("http://127.0.0.1:3001") is False
    assert tls_verify("HTTP://platform.internal/api") is False


def test_an_https_platform_gets_the_processs_one_verifying_context() -> None:
    first = tls_verify("https://ads.example.com")
    assert isinstance(first, ssl.SSLContext)
    assert first.verify_mode is ssl.CERT_REQUIRED
    assert first.check_hostname
    # Built once per process, not once per account.
    assert tls_verify("https://other.example.com:8443") is first
