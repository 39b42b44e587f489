"""`distill config --explain`: every config field with its type, default and description.

    distill config --explain                 # all fields
    distill config --explain training        # one section
"""

from __future__ import annotations

import json
import textwrap
from typing import Any, Iterator, Literal, get_args, get_origin

from pydantic import BaseModel

from distill.config.loading import union_members
from distill.config.models import RunConfig


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + " | ".join(map(str, get_args(annotation)))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted path, type, default, description) for every field, sections first then leaves.
    A section that can be one of several kinds (teacher, student, data.source) lists each kind."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        members = union_members(info.annotation)
        default = info.get_default(call_default_factory=True)
        if members:
            yield path, "section", None, (info.description or "").strip()
            for member in members:
                kind = member.model_fields.get("kind")
                sub = (f"{path}[kind={get_args(kind.annotation)[0]}]." if kind is not None and len(members) > 1
                       else f"{path}.")
                yield from fields(member, sub)
            continue
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        yield path, _type_name(info.annotation), default, (info.description or "").strip()


def explain(section: str | None = None) -> str:
    lines = []
    for path, kind, default, description in fields():
        if section and not (path == section or path.startswith(section + ".") or path.startswith(section + "[")):
            continue
        if kind == "section":
            lines.append(f"\n{path}: {' '.join(description.split())}")
            continue
        shown = "required" if str(default) == "PydanticUndefined" else json.dumps(default, default=str)
        lines.append(f"  {path} = {shown}    ({kind})")
        lines += textwrap.wrap(" ".join(description.split()), width=96, initial_indent="      ",
                               subsequent_indent="      ")
    return "\n".join(lines).strip() + "\n"
