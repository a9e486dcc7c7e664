# kvaware epp: a drop-in image for the Go Endpoint Picker (same ports, flags and config).
#   docker build -t kvaware-epp .
#   docker run --rm -p 9002:9002 -p 9003:9003 -p 9090:9090 kvaware-epp \
#       --config-file /app/config/precise.yaml --endpoints /app/endpoints.yaml
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvaware_scorer ./kvaware_scorer
COPY plugins ./plugins
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[epp,tokenizers,redis,fast]'

FROM python:3.11-slim
RUN useradd --uid 65532 --create-home kvaware
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /app/config
USER 65532
WORKDIR /app
EXPOSE 9002 9003 9090
ENTRYPOINT ["kvaware", "epp"]
CMD ["--help"]
