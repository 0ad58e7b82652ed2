"""Errors in the OpenAI API's own format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         500: "server_error", 503: "server_error"}  # fmt: skip


class ApiError(Exception):
    """An error response; raise it anywhere in a request."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_validation(exc) -> ApiError:
    """A pydantic ValidationError (or FastAPI's) as one 400 naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}",
                        code="invalid_json")  # fmt: skip
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    return ApiError(400, f"{where}{first.get('msg')}", param=param, code="invalid_value")


async def handle_api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()
