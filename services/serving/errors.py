"""OpenAI-shaped API errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered to the client with an OpenAI-shaped body.

    `param` names the offending request field (dotted, e.g. `messages.0.content`).
    """

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse into their error classes."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
