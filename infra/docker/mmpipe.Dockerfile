# mmpipe image for Ray nodes (KubeRay pods) and the Prefect process worker: Ray 2.60 on Python 3.11 + this checkout.
# Build from the repository root:
#   docker build -f infra/docker/mmpipe.Dockerfile -t <your-registry>/mmpipe:<tag> .
# The -gpu base runs on CPU nodes too; use rayproject/ray:2.60.0-py311-cpu for a smaller CPU-only image.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

COPY --chown=ray:users . /opt/mmpipe
# pyproject pins torch, ray 2.60, deepspeed, mlflow 3.17 and prefect 3.8.8 (the same versions as the servers).
# ray[client]: the Ray Client server on the head and `ray://` addresses in the worker (grpcio).
# img2dataset pulls the Python 3.6 `dataclasses` backport, which breaks Prefect on 3.11 (Makefile).
RUN pip install --no-cache-dir /opt/mmpipe "ray[client]==2.60.0" && (pip uninstall -y dataclasses || true)

# The process work pool's pull step (prefect.yaml) changes into this directory.
WORKDIR /opt/mmpipe
