# mypy: disallow-untyped-calls=False
"""One Kubernetes API client per process: in-cluster credentials, else the kubeconfig ($KUBECONFIG)."""

from __future__ import annotations

import functools

import kubernetes


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()
