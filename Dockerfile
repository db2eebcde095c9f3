# Outgate container image.
#   docker build -t outgate:0.1.0 .
# Two stages: `build` installs the pinned dependencies (requirements.lock, hash-checked, wheels
# only) and the project into a virtualenv, compiles the hot modules with mypyc (the compiled build,
# docs/performance.md; gcc and mypy exist in this stage only), then removes the build tools from
# it; `runtime` copies
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
COPY requirements.lock requirements-compile.lock ./
RUN "$VIRTUAL_ENV/bin/pip" install --no-deps --require-hashes --only-binary=:all: -r requirements.lock
# The C compiler for the compiled build, and Python's headers where the base lacks them (the
# python images have them; a Debian python3 base needs python3-dev). This stage only.
RUN command -v gcc >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends gcc libc6-dev) \
 && test -f "$("$VIRTUAL_ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" \
 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends python3-dev)
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
# The build backend (setuptools, wheel) comes from the lock too: no unpinned build isolation.
# mypyc (mypy, from its own hash-checked lock) compiles proxy/native.py's modules in the installed
# package; `--require` fails the image build rather than ship it as pure Python. `-P`: the package
# is the installed one, not ./proxy. Then the tools only a build needs (about 45 MB) leave the
# virtualenv the runtime stage copies: mypy and what it alone depends on, the build backend and
# what it alone depends on (packaging), and pip itself.
RUN "$VIRTUAL_ENV/bin/pip" install --no-deps --no-build-isolation --no-index . \
 && "$VIRTUAL_ENV/bin/pip" install --no-deps --require-hashes --only-binary=:all: \
      -r requirements-compile.lock \
 && "$VIRTUAL_ENV/bin/python" -P -m proxy.native_build build --require \
 && "$VIRTUAL_ENV/bin/pip" uninstall --yes mypy mypy-extensions librt pathspec ast-serialize \
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
