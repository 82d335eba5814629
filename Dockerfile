# The image every pod in k8s/ runs: PyTorch's CUDA runtime image (Python, torch, torchvision, CUDA, cuDNN,
# NCCL) plus this package and its dependencies (MLflow included; no test dependencies).
#
#   docker build -t ghcr.io/EXAMPLE/senet-job:0.1.0 .        # EDIT: your registry; tag = pyproject's version
#   docker run --rm ghcr.io/EXAMPLE/senet-job:0.1.0          # prints the default config
#
# No ENTRYPOINT: every manifest states its command (torchrun ... -m job.train, or mlflow server).
FROM pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="senet-job" \
      org.opencontainers.image.description="SENet on CIFAR-10 with PyTorch DDP and MLflow tracking" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

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
RUN python -m pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && python -c "import job.train, torch, torchvision, mlflow; print('torch', torch.__version__)"

USER 10001:10001
WORKDIR /home/senet
CMD ["python", "-m", "job.train", "--print-config"]
