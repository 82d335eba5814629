# The image of the training pods in k8s/: PyTorch's CUDA runtime image (Python, torch, torchvision, CUDA, cuDNN,
# NCCL) plus this package with its gpu extra (MLflow included, and nvidia-ml-py for MLflow's GPU system
# metrics; no test dependencies). The MLflow server has an image of its own (Dockerfile.mlflow).
#
#   docker build -t ghcr.io/EXAMPLE/senet-job:0.1.0 --build-arg GIT_COMMIT=$(git rev-parse HEAD) .   # EDIT: registry
#   docker run --rm ghcr.io/EXAMPLE/senet-job:0.1.0          # prints the default config
#
# No ENTRYPOINT: every manifest states its command (the check, then torchrun ... -m job.train).
FROM pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

LABEL org.opencontainers.image.title="senet-job" \
      org.opencontainers.image.description="SENet on CIFAR-10 with PyTorch DDP and MLflow tracking" \
      org.opencontainers.image.licenses="Apache-2.0"

# PIP_BREAK_SYSTEM_PACKAGES: newer PyTorch images mark their Python as externally managed (PEP 668); this
# image exists to add packages to it. pip keeps the image's torch and torchvision (they satisfy
# pyproject's lower bounds), so the CUDA build stays the one the image was made for.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_BREAK_SYSTEM_PACKAGES=1

# A fixed numeric UID/GID: the manifests' runAsUser/runAsGroup/fsGroup are 10001 (tests/test_k8s.py checks),
# and a numeric USER lets the kubelet verify runAsNonRoot.
RUN groupadd --gid 10001 senet \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin senet

WORKDIR /opt/senet-job
COPY pyproject.toml README.md ./
COPY senet/ senet/
COPY job/ job/
COPY configs/ configs/
# "./[gpu]" is pip's ".[gpu]" spelt so that hadolint sees a local path, not an unpinned package.
RUN python -m pip install --no-cache-dir "./[gpu]" \
    && rm -rf build ./*.egg-info \
    && python -c "import job.train, torch, torchvision, mlflow, pynvml; print('torch', torch.__version__)"

# After the last RUN: a build argument changes the cache key of every RUN after its declaration, and a new
# commit should not reinstall the dependencies. The job records SENET_GIT_COMMIT with its runs where the
# image has no git checkout.
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.revision="${GIT_COMMIT}"
ENV SENET_GIT_COMMIT=${GIT_COMMIT}

USER 10001:10001
WORKDIR /home/senet
CMD ["python", "-m", "job.train", "--print-config"]
