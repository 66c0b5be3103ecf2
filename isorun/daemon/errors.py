"""API errors: each has an HTTP status, a stable `code` and a message saying what to change."""

from __future__ import annotations

from isorun.errors import IsorunError


class ApiError(IsorunError):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Gone(ApiError):
    status = 410
    code = "sandbox_ended"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class CapacityError(ApiError):
    status = 503
    code = "capacity"
