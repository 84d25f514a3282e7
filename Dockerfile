# pgscope container image: docker build -t pgscope:0.1.0 .
# The Helm chart (deploy/helm/pgscope) runs it with --config /etc/pgscope/config/pgscope.toml, as
# uid/gid 10001 with a read-only root filesystem. Ports: 6432 (clients), 9930 (metrics, probes, API).
# Inside a container pgscope must listen on a non-loopback address: set listen / metrics_listen in
# the config file or PGSCOPE_LISTEN / PGSCOPE_METRICS_LISTEN (e.g. 0.0.0.0:6432, 0.0.0.0:9930).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . \
    && rm -rf /src \
    && groupadd --system --gid 10001 pgscope \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pgscope

WORKDIR /
USER 10001:10001
EXPOSE 6432 9930
ENTRYPOINT ["pgscope", "run"]
