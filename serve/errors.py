"""The one error type of the endpoint: an HTTP status and an OpenAI error body naming the problem.

What an exception means is decided by its type, never its text (``ApiError.from_exception``):
the caller's mistake (``InvalidInputError``) is a 400; a process that died or cannot be reached
(a stage actor, a replica; ``UNAVAILABLE``) or a server-side state the caller cannot fix
(``MmerError``: a store that does not answer, a version that is still loading) is a 503; anything
else is a 500 that names only the exception's type.
"""

from __future__ import annotations

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from mmer_dist.errors import InvalidInputError, MmerError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
          503: "service_unavailable"}
UNAVAILABLE = (RayActorError, WorkerCrashedError, ObjectLostError, NodeDiedError, DeploymentUnavailableError)


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
        """Ray's task errors are unwrapped first, however deep (ingress -> engine -> encoders):
        their text is a remote traceback, and their class also derives from the cause's, so
        isinstance alone would keep it."""
        e = root_cause(e)
        if isinstance(e, ApiError):
            return e
        if isinstance(e, InvalidInputError):
            return cls(400, str(e))
        if isinstance(e, BackPressureError):
            return cls(429, "the server is busy; retry later")
        if isinstance(e, UNAVAILABLE):
            return cls(503, f"the server lost a process while answering ({type(e).__name__}); retry")
        if isinstance(e, MmerError):
            return cls(503, str(e))
        return cls(500, f"internal error ({type(e).__name__})")

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (_rebuild, (self.status, self.message, self.param, self.code))


def root_cause(e: BaseException) -> BaseException:
    """The exception a deployment raised, out of Ray's task-error wrappers, however deep."""
    while isinstance(cause := getattr(e, "cause", None), BaseException) and cause is not e:
        e = cause
    return e


def _rebuild(status, message, param, code) -> ApiError:
    return ApiError(status, message, param=param, code=code)
