"""The slice of the OpenAI API we speak: request models and the error shape.

Requests are validated here, at the edge, so a bad request is a 400 with the offending field in
`param` and never reaches an engine. What clients send is honoured or refused, never silently
dropped: sampling (`n`, `stop`, `seed`, penalties), `logprobs`/`top_logprobs` (chat) and
`logprobs`/`echo` (completions), `response_format` (JSON object or JSON schema, through vLLM's
structured outputs) and `stream_options.include_usage` go to the engine; tool calling and the
other fields in `UNSUPPORTED` are a 400 naming the field. Fields that change nothing about the
answer (`user`, `metadata`, `store`) are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

# JSON `true` is not 1 here: numbers must be numbers (pydantic would otherwise coerce bools)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
MAX_LOGPROBS = 20
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio",
               "modalities", "prediction", "web_search_options", "best_of", "suffix")


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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a `json_schema` object with `schema`")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Annotated[bool, Strict()] = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    stream: Annotated[bool, Strict()] = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for name in UNSUPPORTED:
                if raw.get(name) not in (None, [], False):
                    raise ValueError(f"`{name}` is not supported by this endpoint (it serves plain text "
                                     "generation); remove the field")
        return raw

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def structured(self) -> dict[str, Any] | None:
        """vLLM structured-output settings for `response_format`, or None."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":  # compact JSON: the engines are set up without free whitespace
            return {"json_object": True}
        return {"json": fmt.json_schema.schema_ or {"type": "object"}}

    def logprobs_k(self) -> int | None:
        """Top logprobs per generated token the engine must return (None: none)."""
        return None

    def params(self) -> dict[str, Any]:
        """What the engine needs besides the prompt."""
        return {"max_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
                "seed": self.seed, "n": self.n, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "logprobs": self.logprobs_k(),
                "prompt_logprobs": None, "structured": self.structured()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)
    logprobs: Annotated[bool, Strict()] = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str = Field(..., min_length=1)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Annotated[bool, Strict()] = False

    @model_validator(mode="after")
    def _echo_logprobs_not_streamed(self) -> "CompletionRequest":
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError("`echo` with `logprobs` is not supported when streaming; send stream: false "
                             "to score the prompt")
        return self

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def params(self) -> dict[str, Any]:
        out = super().params()
        if self.echo and self.logprobs is not None:  # the prompt's own tokens, scored
            out["prompt_logprobs"] = self.logprobs
        return out


class Feedback(BaseModel):
    """A user's score of one response, by the response's `id`."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=128)
    score: Float = Field(..., ge=-1e6, le=1e6)


class WeightsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Float] = Field(..., min_length=1)

    @field_validator("weights")
    @classmethod
    def _finite_non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        import math

        bad = {arm: w for arm, w in weights.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"weights must be finite numbers >= 0, got {bad}")
        if sum(weights.values()) <= 0:
            raise ValueError("weights must have a positive sum")
        return weights


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """An error as a value (vLLM's `ErrorResponse`, OpenAI's shape), with the HTTP status to answer
    it with: what a model server returns instead of raising across the Ray boundary."""

    error: ErrorInfo
    status: int = 400

    @classmethod
    def of(cls, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> "ErrorResponse":
        return cls(error=ErrorInfo(message=message, type=type_, param=param, code=code), status=status)

    def body(self) -> dict[str, Any]:
        """The JSON body clients get (the status travels as the HTTP status)."""
        return {"error": self.error.model_dump()}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients parse into their exception's message."""
    return ErrorResponse.of(0, message, type_, param, code).body()


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
    msg = err.get("msg", "invalid request").removeprefix("Value error, ")
    if not loc and msg.startswith("`"):  # a field refused as a whole: name it
        loc = [msg[1:].split("`", 1)[0]]
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param and not msg.startswith("`") else msg), param
