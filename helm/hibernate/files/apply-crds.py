"""Apply the chart's CRDs by server-side apply: helm installs crds/ but skips it on upgrade.

Run by the chart's pre-upgrade hook Job (templates/crd-upgrade.yaml) in the hibernate image:

    python3 apply-crds.py DIR      # every *.yaml in DIR; in cluster, else $KUBECONFIG

Forced apply under its own field manager: the chart owns every field of its CRDs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import kubernetes
import yaml

FIELD_MANAGER = "hibernate-crd-upgrade"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: apply-crds.py DIR", file=sys.stderr)
        return 2
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    api = kubernetes.client.ApiextensionsV1Api()
    files = sorted(Path(argv[0]).glob("*.yaml"))
    if not files:
        print(f"no *.yaml in {argv[0]}", file=sys.stderr)
        return 1
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") != "CustomResourceDefinition":
                print(
                    f"{path}: skipping a {doc.get('kind')}, not a CustomResourceDefinition", file=sys.stderr
                )
                continue
            name = doc["metadata"]["name"]
            api.patch_custom_resource_definition(
                name,
                doc,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
            print(f"customresourcedefinition {name} applied", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
