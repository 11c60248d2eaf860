# The worker's image: `python -m streams` is the entrypoint, `worker` the default command, so `replay`,
# `produce`, `tail` and `state` run from the same image. Every setting comes from STREAMS_* variables
# (README, "Settings").
#
#   docker build -t streams .
#   docker run --network host streams                        # the worker, broker on localhost:9092
#   docker run --network host streams produce                # the built-in sample to the raw topic
#
# BASE_IMAGE is any Debian-like image with Python 3.11 as `python` and `python -m venv`. Where no registry
# answers, scripts/container.sh builds one from Debian's packages and passes it here.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: the dependencies and the package, in a virtualenv the runtime stage copies whole ------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --upgrade pip "setuptools>=68" wheel
WORKDIR /src
# The dependencies alone first, read from pyproject.toml: this layer is rebuilt when pyproject.toml
# changes, not on every change of the code.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && /opt/venv/bin/pip install -q -r requirements.txt
COPY README.md ./
COPY streams ./streams
# (pip compiles the bytecode now: the worker, running as a user that cannot write there, starts faster)
RUN /opt/venv/bin/pip install -q --no-deps --no-build-isolation .

# ---- runtime: the virtualenv, a user without privileges, the state on a volume --------------------------
FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/streams --create-home streams \
 && mkdir -p /var/lib/streams/state && chown -R streams:streams /var/lib/streams
COPY --from=build /opt/venv /opt/venv
# The image's own defaults; all other settings keep the README's defaults. The HTTP server listens on
# every interface of the container, as a scraper in another container needs (with the host's network,
# set STREAMS_WEB_BIND=127.0.0.1 to keep it on the loopback).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMS_STATE_DIR=/var/lib/streams/state \
    STREAMS_WEB_BIND=0.0.0.0 \
    STREAMS_WEB_PORT=6066
USER streams
WORKDIR /var/lib/streams
VOLUME ["/var/lib/streams"]
EXPOSE 6066
# Healthy while the worker is live: /health/live fails when records wait and no batch has completed for 120 s
# (a partition stalled, a retry that never ends); a rebalance, however long, is not a failure (no curl in
# slim images, hence Python).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('STREAMS_WEB_PORT', '6066'), timeout=4)"]
ENTRYPOINT ["python", "-m", "streams"]
CMD ["worker"]
