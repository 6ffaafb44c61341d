# One image for every DermaScan process (web, worker-cpu, beat, dicom, migrate): the plain install,
# without TensorFlow or Keras (the CPU worker scores and draws heat maps on ONNX Runtime/OpenVINO).
# The GPU worker builds from Dockerfile.gpu (Keras on JAX with CUDA).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DERMASCAN_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY dermascan dermascan
COPY model model
COPY worker worker
COPY web web
COPY migrations migrations
RUN pip install .
RUN useradd --system --uid 10001 --home /data dermascan && mkdir -p /data && chown dermascan /data
USER dermascan
VOLUME /data
EXPOSE 8000 11112
CMD ["dermascan", "web", "--host", "0.0.0.0"]
