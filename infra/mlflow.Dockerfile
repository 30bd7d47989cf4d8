# MLflow tracking server for infra/docker-compose.yml: Postgres backend, artifacts proxied to S3 (MinIO).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
RUN pip install "mlflow==3.17.2" "sqlalchemy==2.0.58" psycopg2-binary boto3
EXPOSE 5000
