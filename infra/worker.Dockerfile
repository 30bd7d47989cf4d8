# fewstep GPU worker: CUDA PyTorch, the pipeline's pinned dependencies (requirements.txt: prefect, dvc[s3],
# mlflow, s3fs, ...) and the project, running `prefect worker start --pool gpu`.
#
#   docker build -f infra/worker.Dockerfile -t fewstep-worker .          # from the project root
#   docker run --gpus all --rm fewstep-worker python -c "import torch; print(torch.cuda.is_available())"
#
# BASE_IMAGE must carry the torch the project pins (2.13.0) built for the host's CUDA driver; pip never
# installs torch here (requirements.txt leaves it out), so the CUDA build is kept.
# The DVC workspace (a git clone: code the stages run, .dvc/cache, outputs) is a volume at
# $FEWSTEP_ROOT, not baked in: the image's copy of the project is for `prefect deploy` and a default.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_CLI_PROMPT=false \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# dvc needs git; tini reaps the worker's flow-run processes and forwards signals
RUN apt-get update && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'   # the workspace is a bind mount owned by the host user

WORKDIR /opt/fewstep
COPY requirements.txt pyproject.toml README.md ./
RUN python -c "import torch; assert torch.version.cuda, 'BASE_IMAGE has a CPU-only torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && pip install -r requirements.txt \
    && python -c "import torch; assert torch.version.cuda, 'pip replaced the CUDA torch'"

COPY src ./src
COPY stages ./stages
COPY flows ./flows
COPY profiles ./profiles
COPY dvc.yaml params.yaml prefect.yaml ./
RUN pip install --no-deps -e . && python -c "import fewstep, prefect, dvc, mlflow, s3fs"

# The workspace checkout's own src/ goes first, so a stage runs the code DVC hashed for it.
ENV FEWSTEP_ROOT=/workspace/fewstep PYTHONPATH=/workspace/fewstep/src
WORKDIR /workspace
ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
