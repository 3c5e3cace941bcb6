"""Errors as OpenAI's API sends them: `{"error": {"message", "type", "param", "code"}}`,
for kvflow's own checks, FastAPI's body validation, and unknown routes alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvflow.serve.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server answers with an error status and an OpenAI error body.

    Args:
        status: the HTTP status.
        message: what went wrong, naming the field and quoting the value.
        param: the request field at fault, when one is.
        code: a machine-readable code (e.g. "model_not_found").
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        info = ErrorInfo(
            message=self.message,
            type=_TYPES.get(self.status, "server_error" if self.status >= 500 else "error"),
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=info).model_dump(mode="json")

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A message naming each bad field (with the value given) and the first field."""
    lines: list[str] = []
    first: str | None = None
    for item in errors:
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        kind = item.get("type", "")
        if kind == "json_invalid":
            ctx = item.get("ctx", {}).get("error", item.get("msg", ""))
            lines.append(f"the body is not valid JSON: {ctx}")
            continue
        if first is None:
            first = field
        if kind == "extra_forbidden":
            lines.append(f"unknown field {field!r}")
        elif kind == "missing":
            lines.append(f"field {field!r} is required")
        elif field is None:
            lines.append(f"the body must be a JSON object: {item.get('msg', '')}")
        else:
            value = item.get("input")
            lines.append(f"field {field!r}: {item.get('msg', 'invalid')} (got {value!r})")
    # Unions report one error per alternative: keep the message short.
    unique = list(dict.fromkeys(lines))
    text = "; ".join(unique[:4]) + (f"; and {len(unique) - 4} more" if len(unique) > 4 else "")
    return text, first


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style bodies for `APIError`, validation errors (400, not FastAPI's 422)
    and HTTP errors such as an unknown route."""

    async def on_api_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return err.response()

    async def on_validation(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        message, param = describe_validation(err.errors())
        return bad_request(message, param).response()

    async def on_http(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        headers = dict(err.headers or {})
        return APIError(err.status_code, str(err.detail), headers=headers).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)


__all__ = ["APIError", "bad_request", "describe_validation", "install_error_handlers"]
