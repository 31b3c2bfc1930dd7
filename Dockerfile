# chatsync in a container (docs/deploy.md):
#   docker build -t chatsync .
#   docker run --rm --env-file .env chatsync                  # one sync; its JSON summary line on stdout
#   docker run --rm --env-file .env chatsync report --format json
# Give it CHATSYNC_DATABASE_URL (PostgreSQL), CHATBASE_API_KEY and CHATBASE_CHATBOT_ID; run it from cron,
# a Kubernetes CronJob or a systemd timer. Exit 75 means the previous sync of that chatbot still runs.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 chatsync
COPY . /src
RUN pip install "/src[postgres]" && rm -rf /src
USER chatsync
WORKDIR /home/chatsync
ENTRYPOINT ["chatsync"]
CMD ["sync", "--json"]
