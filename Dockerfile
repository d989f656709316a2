# One image for the flowtrace gateway and the example fleet (worker and API) of
# deploy/docker-compose.yml. Build from the repository root:
#   docker build -t flowtrace .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first so that editing the examples does not reinstall them.
COPY pyproject.toml README.md ./
COPY flowtrace ./flowtrace
RUN pip install ".[redis,fastapi-instrumentation]"

# The example fleet is imported from the working directory
# (taskiq worker examples.fleet.worker:broker, uvicorn examples.fleet.api:app).
COPY examples ./examples

RUN useradd --create-home --uid 10001 flowtrace
USER flowtrace

EXPOSE 8000 8080
# The gateway; it reads its Redis from FLOWTRACE_REDIS_URL:
#   docker run -p 8000:8000 -e FLOWTRACE_REDIS_URL=redis://redis-host:6379/0 flowtrace
CMD ["flowtrace", "serve", "--host", "0.0.0.0", "--port", "8000"]
