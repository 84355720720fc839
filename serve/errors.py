"""The one error type of the endpoint: an HTTP status and an OpenAI error body naming the problem."""

from __future__ import annotations

from mmer_dist.errors import InvalidInputError, MmerError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_exception(cls, e: BaseException) -> ApiError:
        """A caller's mistake found below the ingress (bad media, a prompt over the context, ...)
        is a 400 naming it; anything else is the server's fault. Ray's task errors are unwrapped
        first, however deep (ingress -> engine -> encoders): their text is a remote traceback,
        and their class also derives from the cause's, so isinstance alone would keep it."""
        e = root_cause(e)
        if isinstance(e, ApiError):
            return e
        if isinstance(e, InvalidInputError):
            return cls(400, str(e))
        if isinstance(e, MmerError):
            return cls(503, str(e))
        return cls(500, f"internal error ({type(e).__name__})")

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (_rebuild, (self.status, self.message, self.param, self.code))


def root_cause(e: BaseException) -> BaseException:
    """The exception a deployment raised, out of Ray's task-error wrappers, however deep."""
    while (cause := getattr(e, "cause", None)) is not None and cause is not e:
        e = cause
    return e


def _rebuild(status, message, param, code) -> ApiError:
    return ApiError(status, message, param=param, code=code)
