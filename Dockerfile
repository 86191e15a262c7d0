# One image for every hibernate component:
#   hibernate operator | agent | gateway      (ENTRYPOINT hibernate; the chart sets the subcommand)
#   hibernate-install-tools /.hibernate       (the engine pods' init container: the pod init)
#   python -m hibernate.engine.fake           (the fake vLLM engine, examples/fake-engine.yaml)
#
#   docker build -t ghcr.io/hibernate-dev/hibernate:0.1.0 .
#
# Works with the legacy builder (DOCKER_BUILDKIT=0) and BuildKit alike, offline with a local base
# image: no `# syntax=` frontend to pull, no BuildKit-only flags (COPY --chmod).
# prebuilt/ (empty in a checkout) lets a machine without PyPI or time for the CRIU build feed the
# build: prebuilt/wheels/*.whl, a wheelhouse of hibernate and every dependency, is installed with
# `pip install --no-index`; prebuilt/criu/bin/criu, a CRIU bundle from hack/build-criu.sh built on
# bookworm, is taken as is. hack/e2e-real-node.sh fills them in a build context of its own.
#
# CRIU 4.2+ is built from source (bookworm's 3.17 fails on recent kernels: shared/notes/checkpointing.md)
# by hack/build-criu.sh, into a bundle with its own libraries (RPATH $ORIGIN/../lib) and the preload
# library that moves criu into a pod's namespaces (hibernate-nsjoin.so). It runs only in the agent,
# from the agent's filesystem: nothing of it is copied into engine pods (docs/security.md).
# The image runs as a non-root user; the chart's agent DaemonSet runs it as root, privileged.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- CRIU bundle --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS criu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The build dependencies hack/build-criu.sh would install (its BUILD_DEPS), installed here as root,
# so the script, run unprivileged below, finds them all and installs nothing. It runs unprivileged
# because as root it ends with `criu check`, which needs capabilities a build container lacks.
# sudo is only there because the script looks for it when not root; the builder has no sudo rights.
# With a prebuilt bundle in prebuilt/criu/ none of this is installed and nothing is built.
COPY prebuilt/criu/ /tmp/prebuilt-criu/
# hadolint ignore=DL3008
RUN if [ -x /tmp/prebuilt-criu/bin/criu ]; then echo "prebuilt CRIU bundle: not building CRIU"; \
    else apt-get update \
    && apt-get install -y --no-install-recommends \
        gcc make pkg-config libc6-dev xz-utils debian-archive-keyring \
        libcap-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev \
        libnl-3-dev libnet1-dev libnftables-dev libbsd-dev libaio-dev sudo \
    && rm -rf /var/lib/apt/lists/*; fi \
    && useradd --create-home --uid 10002 --user-group builder
COPY hack/build-criu.sh /usr/local/bin/build-criu.sh
COPY operator/hibernate/agent/criu/nsjoin.c /usr/local/src/hibernate-nsjoin.c
USER 10002
# Fetches criu's upstream tarball through the Debian mirror (apt source, private apt state), builds
# criu and hibernate-nsjoin.so, bundles the libraries and checks `criu --version` is 4.2 or newer.
# A prebuilt bundle must carry hibernate-nsjoin.so already (hack/build-criu.sh puts it there).
RUN if [ -x /tmp/prebuilt-criu/bin/criu ]; then cp -a /tmp/prebuilt-criu /home/builder/criu-bundle; \
    else HOME=/home/builder PYTHON=/usr/local/bin/python3 NSJOIN_SRC=/usr/local/src/hibernate-nsjoin.c \
        bash /usr/local/bin/build-criu.sh /home/builder/criu-bundle; fi \
    && /home/builder/criu-bundle/bin/criu --version \
    && test -f /home/builder/criu-bundle/lib/hibernate-nsjoin.so

# ---- the hibernate wheel ------------------------------------------------------------------------
# Without a wheelhouse in prebuilt/wheels/: the hibernate wheel, its dependencies come from PyPI below.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY prebuilt/wheels/ /dist/
COPY pyproject.toml ./
COPY operator ./operator
RUN if ls /dist/hibernate-*.whl >/dev/null 2>&1; then touch /dist/OFFLINE; \
    else pip wheel --no-cache-dir --no-deps --wheel-dir /dist .; fi

# ---- the image ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="hibernate" \
      org.opencontainers.image.description="Kubernetes operator, node agent and gateway that put GPU model servers to sleep and wake them" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HIBERNATE_CRIU_BUNDLE=/opt/hibernate/criu
COPY --from=criu /home/builder/criu-bundle /opt/hibernate/criu
COPY --from=wheel /dist/ /tmp/dist/
# hadolint ignore=DL3013
RUN if [ -e /tmp/dist/OFFLINE ]; then set -- --no-index; fi \
    && pip install --no-cache-dir --find-links /tmp/dist "$@" /tmp/dist/hibernate-*.whl \
    && rm -rf /tmp/dist \
    && groupadd --gid 10001 hibernate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hibernate \
    && hibernate-install-tools --help >/dev/null \
    && /opt/hibernate/criu/bin/criu --version
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENTRYPOINT ["hibernate"]
CMD ["--help"]
