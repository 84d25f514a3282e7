# pgscope container image: docker build -t pgscope:0.1.0 .
# The Helm chart (deploy/helm/pgscope) runs it with --config /etc/pgscope/config/pgscope.toml, as
# uid/gid 10001 with a read-only root filesystem. Ports: 6432 (clients), 9930 (metrics, probes, API).
# Inside a container pgscope must listen on a non-loopback address: set listen / metrics_listen in
# the config file or PGSCOPE_LISTEN / PGSCOPE_METRICS_LISTEN (e.g. 0.0.0.0:6432, 0.0.0.0:9930).
# The compiled cores (proxy/protocol/_core.pyx, proxy/pool/_hot.pyx, proxy/session/_hot.pyx) are built
# in a first stage that has a C compiler; the image itself gets only the wheel (and fails to build if
# the wheel lacks one of them).
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps -w /wheels . \
    && python -c "import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); missing = [c for c in ('proxy/protocol/_core', 'proxy/pool/_hot', 'proxy/session/_hot') if not any(n.startswith(c) and n.endswith('.so') for n in names)]; sys.exit(f'not in the wheel: {missing}' if missing else 0)"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 pgscope \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pgscope

WORKDIR /
USER 10001:10001
EXPOSE 6432 9930
ENTRYPOINT ["pgscope", "run"]
