"""Model references: built-in models shipped in packages, base models' turns, derived students."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import make_tiny_llama, make_tokenizer
from distill import model_files
from distill.chat import COMPLETION_TEMPLATE, TeacherContext, prompt_token_ids
from distill.config import RunConfig
from distill.errors import MissingInput
from distill.model_files import BuiltinModel
from distill.rundir import RunDir
from distill.tokenizers import same_tokenizer


def _config(tmp_path, teacher: str, **student) -> RunConfig:
    return RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": {"kind": "synth", "name": "sentiment", "n": 8}},
        "task": {"type": "classification", "labels": ["positive", "negative"]},
        "teacher": {"kind": "vllm", "path": teacher},
        "student": {"kind": "derived", **student},
    })


def test_a_derived_student_takes_its_layers_from_student_of_or_else_the_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = make_tiny_llama(tmp_path / "teacher", layers=2, tokenizer=make_tokenizer("byte_level"))
    source = make_tiny_llama(tmp_path / "source", layers=4, seed=1)
    for of, model, layers in ((str(source), source, [0, 3]), (None, teacher, [1])):
        cfg = _config(tmp_path, str(teacher), of=of, layers=layers)
        made = model_files.ensure_student_base(cfg, RunDir(cfg))
        assert same_tokenizer(AutoTokenizer.from_pretrained(made), AutoTokenizer.from_pretrained(model))
        student = AutoModelForCausalLM.from_pretrained(made)
        original = AutoModelForCausalLM.from_pretrained(model)
        assert student.config.num_hidden_layers == len(layers)
        for kept, index in zip(student.model.layers, layers):
            assert torch.equal(kept.mlp.up_proj.weight, original.model.layers[index].mlp.up_proj.weight.to(torch.bfloat16)
                               .to(kept.mlp.up_proj.weight.dtype))


def test_a_base_models_turns_are_written_as_plain_text(tmp_path):
    tokenizer = make_tokenizer("byte_level")
    tokenizer.chat_template = COMPLETION_TEMPLATE
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Is this review positive or negative?\nGreat kettle."}]
    shots = TeacherContext(few_shot=(("Is this review positive or negative?\nIt broke.", "negative"),))
    text = tokenizer.decode(prompt_token_ids(tokenizer, shots.apply(messages)))
    assert text == ("<|im_start|>Answer with one word.\n\n"
                    "Is this review positive or negative?\nIt broke.\nAnswer: negative\n\n"
                    "Is this review positive or negative?\nGreat kettle.\nAnswer:")


def test_a_chunked_package_is_assembled_into_the_cache(tmp_path, monkeypatch):
    package = tmp_path / "pkgs" / "chunked_gguf_for_test"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path, overwrite=False):\n"
        "    Path(output_path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(output_path).write_bytes(b'part0' + b'part1')\n"
        "    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    gguf = model_files._packaged_gguf(BuiltinModel("chunked_gguf_for_test", "m.gguf", chunked=True))
    assert gguf == tmp_path / "cache" / "gguf" / "m.gguf" and gguf.read_bytes() == b"part0part1"
    sys.modules.pop("chunked_gguf_for_test", None)


def test_a_builtin_model_whose_package_is_missing_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_files.BUILTIN, "builtin:absent", BuiltinModel("absent_gguf_pkg", "a.gguf", chunked=True))
    with pytest.raises(MissingInput, match=r"pip install absent-gguf-pkg\)"):
        model_files.resolve_model("builtin:absent")
