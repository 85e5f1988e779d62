# dwiflow BIDS App image.
#   docker build -t dwiflow .
#   docker run --rm -v /data:/data:ro -v /out:/out --user "$(id -u):$(id -g)" dwiflow /data /out participant
#   docker run --rm --entrypoint dwirecon dwiflow --help
# Base: Debian 12 (bookworm) slim, whose python3 is 3.11. Dependency versions: constraints.txt (dev.py uses the
# same file). A site CA bundle for the package index can be given as an optional BuildKit secret
# (--secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt); nothing of it stays in the image.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
       binutils \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/dwiflow
ENV PATH=/opt/dwiflow/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml constraints.txt README.md LICENSE /src/
# the dependencies first (a layer that survives edits of dwiflow's own code)
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    pip install --upgrade pip "setuptools>=77" \
    && python3 -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c /src/constraints.txt -r /tmp/requirements.txt
COPY dwiflow /src/dwiflow
COPY core /src/core
COPY tasks /src/tasks
COPY workflows /src/workflows
COPY bids_specs /src/bids_specs
COPY pydra_namespace /src/pydra_namespace
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    pip install --no-deps --no-build-isolation /src && rm -rf /src
# size (1186 MB without this): the packages' own test suites, SCS's MKL build (110 MB; cvxpy here solves with
# Clarabel, and SCS loads that module only when asked for its MKL solver) and llvmlite's symbol table are not needed
# to run. Only llvmlite is stripped: the libraries auditwheel patched (*.libs) break when stripped.
RUN find /opt/dwiflow/lib -depth -type d -name tests -path "*/site-packages/*" -exec rm -rf {} + \
    && rm -f /opt/dwiflow/lib/python3*/site-packages/scs/_scs_mkl*.so \
    && strip --strip-unneeded /opt/dwiflow/lib/python3*/site-packages/llvmlite/binding/libllvmlite.so \
    && pip uninstall -y pip

FROM ${BASE_IMAGE}
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="dwiflow" \
      org.opencontainers.image.description="BIDS App: diffusion MRI to fibre-orientation and microstructure maps" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="BSD-3-Clause"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/dwiflow /opt/dwiflow
# Any uid may run the image, also with a read-only root filesystem: everything a run writes besides OUTPUT_DIR and
# the work directory goes to /tmp (HOME, Pydra's hash cache, matplotlib's config, numba's cache). numba's kernels
# are compiled here into /opt/numba-cache; dwiflow copies them to NUMBA_CACHE_DIR when a run starts (numba only
# uses a cache folder it can write to), so a run loads them instead of compiling.
ENV PATH=/opt/dwiflow/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN NUMBA_CACHE_DIR=/opt/numba-cache python3 -m dwiflow.warmup && rm -rf /tmp/* /tmp/.cache \
    && chmod -R a+rX /opt/numba-cache
ENV NUMBA_CACHE_DIR=/tmp/numba-cache \
    DWIFLOW_NUMBA_CACHE_SEED=/opt/numba-cache
ENTRYPOINT ["dwiflow"]
