# One image for every dicom-triage role (listener, worker, web); docker-compose.yml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY dicom_io ./dicom_io
COPY models ./models
COPY training ./training
COPY worker ./worker
RUN pip install ".[gpu]"
VOLUME /data
ENTRYPOINT ["dicom-triage"]
