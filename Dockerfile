# syntax=docker/dockerfile:1
# CPU image of the RNNPool-Face web service (POST /detect, the webcam page at /).
#   docker build -t rnnpool-face .
#   docker run --rm -p 8000:8000 rnnpool-face              # then open http://localhost:8000/
# Settings come from RNNPOOL_* variables, e.g. -e RNNPOOL_API_KEY=... -e RNNPOOL_BACKEND=onnx.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# No apt packages: the opencv-python-headless and torch wheels bundle their native libraries (the headless
# OpenCV needs no libGL); the libstdc++ and zlib they link against are already in the slim image. Without a C
# compiler the `native` backend is not available here (it compiles its C front for the host CPU on first use):
# use torch (default) or onnx.

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies first, in their own layer, from pyproject.toml and an empty package skeleton: editing the source
# does not reinstall torch. torch==2.13.0 is pinned in pyproject.toml; the PyTorch CPU index serves its CPU-only
# wheel (2.13.0+cpu, which pip prefers). Outside the sandbox this project is developed in, pip must be pointed
# at that index, or it installs PyPI's CUDA build (GBs of CUDA libraries).
COPY pyproject.toml ./
RUN mkdir detector app \
 && touch README.md detector/__init__.py app/__init__.py \
 && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[serve,export]" \
 && rm -rf detector app README.md build ./*.egg-info

# The source and the shipped weights (baked into the image; the default weights path is <repo>/weights).
COPY README.md ./
COPY detector/ detector/
COPY app/ app/
COPY weights/ weights/
# Editable, so `detector` resolves to /app/detector and finds /app/weights; also provides the `detect` command.
RUN pip install --no-cache-dir --no-deps -e .

USER app
EXPOSE 8000

# No curl in the slim image: python asks /health (503 until the model is loaded).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
