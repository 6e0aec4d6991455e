# Beacon as a container (see deploy/README.md).
#
#   docker build -t beacon .                 # with access to a registry and PyPI
#   deploy/build-image.sh beacon:local       # without: a base image from this Debian host's
#                                            # packages and a wheelhouse filled on the host
#
# Two stages: the build stage makes a venv in /opt/beacon; the final stage is a
# clean copy of the same base with only that venv added (no pip, no build tools).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# --no-index when every wheel is in deploy/wheels/ (offline builds).
ARG PIP_INSTALL_ARGS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/beacon
COPY deploy/wheels/ /wheels/
# Dependencies first, installed through a stub package (in its own directory:
# its build/ must not shadow the real sources), so this layer is reused until
# pyproject.toml changes; a code change reinstalls only Beacon.
# (Python, not mkdir/touch: a minimal base may have no coreutils.)
# Not README.md (pyproject's readme gets an empty stand-in): editing it must not reinstall every dependency.
COPY pyproject.toml /stub/
RUN python3 -c "import pathlib; p = pathlib.Path('/stub/beacon'); p.mkdir(); (p / '__init__.py').touch(); (p.parent / 'README.md').touch()" \
 && /opt/beacon/bin/pip install -q $PIP_INSTALL_ARGS --find-links /wheels /stub "setuptools>=68" \
 && /opt/beacon/bin/pip uninstall -q -y beacon
COPY pyproject.toml README.md /src/
COPY beacon/ /src/beacon/
# The build backend is already in the venv: no isolated build environment to set up.
RUN /opt/beacon/bin/pip install -q $PIP_INSTALL_ARGS --no-deps --no-build-isolation /src \
 && /opt/beacon/bin/pip uninstall -q -y pip setuptools

FROM ${BASE}
# Metadata before the COPY: these layers stay cached when only the code changed.
# Listen on every address of the container's own network namespace. Ports 53
# and 80 as a non-root user need `--sysctl net.ipv4.ip_unprivileged_port_start=0`
# (compose/deploy.yml sets it); reading the Docker socket needs its group:
# `--group-add $(stat -c %g /var/run/docker.sock)`.
ENV PATH=/opt/beacon/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BEACON_API_LISTEN=0.0.0.0:8700 \
    BEACON_DNS_LISTEN=0.0.0.0:53 \
    BEACON_PROXY_LISTEN=0.0.0.0:80
# Inherited by the container: Beacon never registers itself.
LABEL beacon.enable="false" \
      org.opencontainers.image.title="beacon" \
      org.opencontainers.image.description="Service discovery, DNS and HTTP load balancing for Docker hosts"
EXPOSE 53/udp 53/tcp 80/tcp 8700/tcp
# /healthz answers 503 while the Docker engine is unreachable. The port comes
# from BEACON_API_LISTEN, so set the API's address there, not with --api-listen.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request as u; port = os.environ['BEACON_API_LISTEN'].rsplit(':', 1)[1]; u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["beacon"]
CMD ["run"]
USER 10001:10001
# Owned by root: the user Beacon runs as cannot change its own code.
COPY --from=build /opt/beacon /opt/beacon
