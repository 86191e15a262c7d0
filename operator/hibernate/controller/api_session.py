"""kopf's connection to the API server, with a bounded pool.

kopf's own session opens one TLS connection per concurrent request, without limit: creating 500
ModelDeployments at once opened 433 connections, took the operator from 74 to 290 MiB and left it
there (the freed TLS buffers fragment the heap; bench/scale.py). The same credentials over at most
`MAX_CONNECTIONS` connections (the watch streams included) queue a burst instead.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import kopf

MAX_CONNECTIONS = 32


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's login from the kubernetes client's configuration (in-cluster, else kubeconfig)."""
    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
    )
