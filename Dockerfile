# dkim-sidecar: the DKIM-signing milter as a container, to run beside Mailcow's Postfix.
#
#   docker build -t dkim-sidecar:latest .
#
# Stages: `runtime-base` is Debian trixie with only python3; `builder` adds the compiler on top
# of it and builds a venv at /opt/dkim-sidecar (with the project's small C helper compiled);
# the final image is runtime-base plus that venv, so builder and runtime share the very same
# Python. Python dependencies are pinned exactly in
# docker/requirements.txt (installed with --no-deps and checked with `pip check`, so the list is
# complete); the project itself is installed last.
# The image runs as an unprivileged user and writes nothing outside /tmp, so it works with
# `--read-only --tmpfs /tmp --cap-drop ALL` (see compose.override.yml and docs/mailcow.md).

FROM debian:trixie-slim AS runtime-base

# Debian's package versions follow the point releases and security updates of trixie; pinning
# them would break the build at the next update, so only the release is pinned (the base image).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 \
    && rm -rf /var/lib/apt/lists/*


FROM runtime-base AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/dkim-sidecar
ENV PATH=/opt/dkim-sidecar/bin:$PATH

# Exact versions of every runtime dependency. Wheels only, except dkimpy, which PyPI has only
# as source. setuptools (pinned too) is only a build tool: it builds dkimpy and the project,
# and is removed again below.
COPY docker/requirements.txt docker/build-requirements.txt /tmp/
RUN pip install --no-deps -r /tmp/build-requirements.txt \
    && pip install --no-deps --no-build-isolation --only-binary=:all: --no-binary=dkimpy \
        -r /tmp/requirements.txt

# The project itself, without dependencies (they are all above), then a consistency check.
# pip goes too at the end: the runtime image never installs anything.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY milter/ milter/
RUN pip install --no-deps --no-build-isolation . \
    && pip uninstall -y setuptools \
    && pip check \
    && python -m pip uninstall -y pip


FROM runtime-base

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dkim-sidecar" \
      org.opencontainers.image.description="DKIM-signing milter for Mailcow: signs the relayed mail that rspamd leaves unsigned" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/debian:trixie-slim" \
      org.opencontainers.image.documentation="docs/mailcow.md"

RUN groupadd --system --gid 10001 dkim-sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dkim-sidecar

COPY --from=builder /opt/dkim-sidecar /opt/dkim-sidecar
COPY docker/config.yml /etc/dkim-sidecar/config.yml
COPY docker/healthcheck.py /usr/local/lib/dkim-sidecar/healthcheck.py

# Fail the build, not the first start, if a module or the C helper cannot load at run time.
RUN /opt/dkim-sidecar/bin/python -c "import dkim, dkim_sidecar.service, dkim_sidecar.dkim._scan"

# Read-only root filesystem: no .pyc writes (the venv was byte-compiled at install time, and
# Debian byte-compiles the standard library), temporary files only under /tmp (a tmpfs),
# unbuffered logs to stdout/stderr.
ENV PATH=/opt/dkim-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp

# Numeric, so that "must run as non-root" checks (Kubernetes runAsNonRoot) can verify it.
USER 10001:10001

# 8891: the milter (Postfix connects here). 9901: /metrics, /healthz, /readyz over HTTP.
# Neither needs publishing on the host: Postfix and Prometheus reach them over Docker networks.
EXPOSE 8891 9901

# SIGTERM stops (messages in progress get up to 25 s), SIGHUP reloads config and keys.
STOPSIGNAL SIGTERM

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/dkim-sidecar/bin/python", "/usr/local/lib/dkim-sidecar/healthcheck.py"]

ENTRYPOINT ["dkim-sidecar"]
CMD ["run", "--config", "/etc/dkim-sidecar/config.yml"]
