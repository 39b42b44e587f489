"""The slice of the OpenAI API we speak: request models and the error shape.

Requests are validated here, at the edge, so a bad request is a 400 with the offending field in
`param` and never reaches an engine. Fields clients send that we do not use (`presence_penalty`,
`stream_options`, ...) are accepted and ignored, as OpenAI-compatible servers do; fields whose
meaning we cannot honour (`n` > 1, non-text content) are rejected rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

# JSON `true` is not 1 here: numbers must be numbers (pydantic would otherwise coerce bools)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stream: Annotated[bool, Strict()] = False
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def params(self) -> dict[str, Any]:
        """What the engine needs besides the prompt."""
        return {"max_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
                "seed": self.seed}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str = Field(..., min_length=1)


class Feedback(BaseModel):
    """A user's score of one response, by the response's `id`."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=128)
    score: Float = Field(..., ge=-1e6, le=1e6)


class WeightsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float] = Field(..., min_length=1)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients parse into their exception's message."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered to the client: raised anywhere in the ingress, rendered by one handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = error_body(message, type_, param, code)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic/FastAPI errors -> (one readable message, the dotted field in `param`)."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param
