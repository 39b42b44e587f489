"""Request bodies read safely: size checked before and while reading, JSON of any depth refused
cleanly. A client cannot make the ingress hold more than `limit` bytes, nor raise a 500."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve.protocol import ApiError, validation_message


async def read_json(request: Request, limit: int) -> Any:
    """The parsed JSON body, or an ApiError: 413 over `limit` (announced or read), 400 when it is
    not JSON, not an object, or nested too deeply to parse."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        raw = json.loads(b"".join(chunks))
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return raw


async def parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    raw = await read_json(request, limit)
    try:
        return model.model_validate(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        raise ApiError(400, message, param=param) from None
