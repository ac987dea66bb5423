# The reference BranchKey platform (`bk-sim platform serve`) as an image; docker-compose.yml
# runs it next to RabbitMQ.  Build: docker build -t bk-sim-platform .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs, so edits to tests or reports do not rebuild the image.
COPY pyproject.toml README.md ./
COPY bk_sim ./bk_sim
RUN pip install . \
    && useradd --system --create-home --uid 10001 bksim \
    && mkdir /data && chown bksim /data

USER bksim
WORKDIR /data
VOLUME /data
EXPOSE 8080

# The admin token comes from the environment (BK_SIM_ADMIN_TOKEN), never the command line.
# /healthz answers 503 while the broker is unreachable, so "healthy" means usable.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["bk-sim", "platform", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data", "--amqp-url", "amqp://guest:guest@rabbitmq:5672/", "--rabbitmq-api", "http://guest:guest@rabbitmq:15672/"]
