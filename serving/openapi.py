"""What the OpenAPI spec (/openapi.json) says each route answers, as the server answers it.

Every error is OpenAI's error body; a body that fails validation is a 400, never FastAPI's
default 422; completions stream as `text/event-stream`; /metrics is Prometheus' text format;
and with API keys set, every route but the open ones (`guards.OPEN_PATHS`) declares
HTTP bearer auth.
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving import guards


class ErrorDetail(BaseModel):
  message: str
  type: str
  param: str | None
  code: str | None


class ErrorBody(BaseModel):
  error: ErrorDetail


ERRORS = {
    400: "The request is invalid (a field, the JSON, or a prompt too long for the context)",
    401: "Missing or wrong API key",
    404: "No such model",
    413: "The request body is over --max_request_bytes",
    429: "Every decode slot is busy and the waiting line is full",
    503: "The engine loop has stopped, or the server is shutting down",
}


def errors(*statuses: int) -> dict:
  return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}


def text(media_type: str, description: str) -> dict:
  return {200: {"description": description,
                "content": {media_type: {"schema": {"type": "string"}}}}}


def generation_responses(keyed: bool) -> dict:
  streamed = text("text/event-stream", "The completion; with stream=true, server-sent events")
  return {**streamed, **errors(400, *(401,) * keyed, 404, 413, 429, 503)}


def install_spec(app: FastAPI, keyed: bool):
  """app.openapi() returns the spec without FastAPI's 422, plus bearer auth when `keyed`."""

  def spec() -> dict:
    if app.openapi_schema is None:
      schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
      for path, operations in schema["paths"].items():
        for operation in operations.values():
          operation["responses"].pop("422", None)
          if keyed and guards.guarded(path):
            operation["security"] = [{"bearer": []}]
      components = schema.setdefault("components", {})
      for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
      if keyed:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
      app.openapi_schema = schema
    return app.openapi_schema

  app.openapi = spec
