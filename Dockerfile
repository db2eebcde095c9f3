# Outgate container image.
#   docker build -t outgate:0.1.0 .
# Two stages: `build` installs the pinned dependencies (requirements.lock, hash-checked, wheels
# only) and the project into a virtualenv, then removes the build tools from it; `runtime` copies
# that virtualenv onto a clean slim base and runs it as an unprivileged numeric user. Nothing is
# written at run time (with `workers` above 1, only under /tmp: mount an emptyDir or tmpfs there),
# so the container runs with a read-only root filesystem.
# No `# syntax=` line: it would make BuildKit fetch a frontend image, and nothing here needs one.
# tests/deploy/test_image.py runs these build steps in a clean virtualenv and checks the
# properties above; tests/image/ builds and runs the image with a real container engine.
# requirements.lock says how to regenerate the lock.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/outgate
WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"
# Dependencies first, so a source change reuses this layer.
COPY requirements.lock ./
RUN "$VIRTUAL_ENV/bin/pip" install --no-deps --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
# The build backend (setuptools, wheel) comes from the lock too: no unpinned build isolation.
# Then the tools only a build needs (about 25 MB) leave the virtualenv the runtime stage copies:
# the build backend, what it alone depends on (packaging), and pip itself.
RUN "$VIRTUAL_ENV/bin/pip" install --no-deps --no-build-isolation --no-index . \
 && "$VIRTUAL_ENV/bin/pip" uninstall --yes setuptools wheel packaging \
 && "$VIRTUAL_ENV/bin/python" -m pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="outgate" \
      org.opencontainers.image.description="Egress proxy for Kubernetes: per-workload FQDN policy, address guard, audit log" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VIRTUAL_ENV=/opt/outgate \
    PATH="/opt/outgate/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/outgate /opt/outgate
# A working default for `docker run`; in Kubernetes the ConfigMaps are mounted over these.
COPY config/outgate.yaml /etc/outgate/config.yaml
COPY config/policies/*.yaml /etc/outgate/policies/
# 65532: a numeric non-root user (no /etc/passwd entry needed), the same as the manifests' runAsUser.
USER 65532:65532
# 3128: proxy listener; 9090: admin (/metrics /healthz /readyz /explain).
EXPOSE 3128 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["outgate"]
CMD ["run", "--config", "/etc/outgate/config.yaml"]
