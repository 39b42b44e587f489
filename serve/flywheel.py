"""`distill data from-serve`: production traffic becomes the next round's prompts.

    distill data from-serve --url http://127.0.0.1:8000 --out data/round2.jsonl

With `serving.record_prompts: true` (off by default: it keeps user prompts in the server's
memory) the ledger keeps every shadowed request with both answers. This command pages through
`/admin/prompts` (admin key from DISTILL_ADMIN_KEY) and writes JSONL that `prepare` reads: the
request as `messages` (or `prompt`), and the teacher's and the student's answers as `teacher`
and `student` (fields `prepare` ignores, kept for inspection or as `precomputed` teacher output).
A request seen several times is written once (the first time it was recorded).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from distill.errors import Unreachable, UserError


def export_prompts(url: str, out: str, admin_key_env: str = "DISTILL_ADMIN_KEY", teacher: str = "teacher") -> int:
    import httpx

    key = os.environ.get(admin_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/admin/prompts", params={"since": 0}, headers=headers, timeout=30)
    except (httpx.TransportError, httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
        raise Unreachable(f"--url {url}: no `distill serve` answers there ({type(e).__name__}: {e})") from None
    if resp.status_code != 200:
        raise UserError(f"{url}/admin/prompts answered {resp.status_code}: {resp.text[:200]}")
    first: dict[str, dict[str, Any]] = {}
    for record in resp.json()["prompts"]:
        row = _row(record, teacher)
        first.setdefault(row["id"], row)
    rows = list(first.values())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"[from-serve] {len(rows)} recorded prompts -> {out}"
          + ("" if rows else " (none: is serving.record_prompts on, and shadow.fraction > 0?)"))
    return len(rows)


def _row(record: dict[str, Any], teacher: str) -> dict[str, Any]:
    request = {"messages": record["messages"]} if record.get("messages") else {"prompt": record["prompt"]}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    answers = {k: v for k, v in record.items() if k not in ("index", "messages", "prompt")}
    return {"id": f"serve-{digest}", **request, "teacher": answers.get(teacher),
            "student": next((v for k, v in answers.items() if k != teacher), None)}
