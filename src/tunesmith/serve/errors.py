"""The server's one error, `APIError`, and the handlers that answer every failure in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for anything the client can fix. A low
module: the app and every route family import it, and it imports none of them."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import error_param


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error"}


async def _api_error(request, err: APIError):
    return err.response()


async def _validation(request, err):  # FastAPI would answer 422; OpenAI answers 400
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    return APIError(400, first["msg"], param=error_param(first["loc"][1:])).response()


async def _http(request, err):
    return APIError(err.status_code, str(err.detail), type=_TYPES.get(err.status_code, "invalid_request_error"),
                    headers=getattr(err, "headers", None)).response()


async def _bug(request, err):
    return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()


def add_handlers(app: FastAPI) -> None:
    """Answer APIError, body validation, HTTP errors (404 route, 405 method) and bugs in the envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _bug)
