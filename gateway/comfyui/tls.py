"""The TLS context that the system's HTTP clients share: to ComfyUI servers, URL inputs and
webhook receivers.

httpx builds a context for every client it is not given one, reading the whole CA bundle each
time (tens of milliseconds of CPU); the gateway makes a client for each server it probes and
each fleet-wide node list it reads, an adapter one for its server. One context per process
serves them all: a context may be used by any number of connections at once.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context(*, trust_env: bool = True) -> ssl.SSLContext:
    """httpx's verifying default, made once per process. With `trust_env` it reads the CA
    bundle that SSL_CERT_FILE or SSL_CERT_DIR name, as a client trusting the environment does."""
    return httpx.create_ssl_context(trust_env=trust_env)
