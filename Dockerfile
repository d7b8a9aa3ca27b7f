# The embedded default in a container: `docker build -t maxlm . && docker run maxlm`
# (add `-v $PWD/runs:/opt/maxlm/runs` to keep the checkpoint, `-p 8000:8000` and
# `python -m serving.server --checkpoint_dir=runs/tiny --host=0.0.0.0` to serve it).
FROM python:3.12-slim

WORKDIR /opt/maxlm
COPY setup.cfg pyproject.toml README.md ./
COPY maxlm maxlm
COPY beam_pipelines beam_pipelines
COPY kernels_pallas kernels_pallas
COPY serving serving
COPY configs configs
RUN pip install --no-cache-dir -e .

ENV MAXLM_CACHE=/var/cache/maxlm
CMD ["python", "-m", "maxlm.train"]
