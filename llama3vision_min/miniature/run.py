"""Run the stages in order, keep each stage's output on disk, ship the miniature; load the shipped one.

    OUT/tokenizer/   the shapes-world tokenizer
    OUT/A/           stage A's vision tower (SiglipVisionModel)
    OUT/B/           stage B's language model (LlamaForCausalLM)
    OUT/checkpoint/  stage C's LlamaVision in the -hf layout + tokenizer + README.md (the miniature's
                     model card, ``model_card.py``) + report.json (a copy of the report below)
    OUT/report.json  timings, losses, probes and accuracies of every stage run so far

``--ship`` copies OUT/checkpoint into the package (``CHECKPOINT_DIR``), where ``load_mini`` finds it.
"""

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..loading import load_tokenizer
from ..model import LlamaVision
from .evaluate import evaluate
from .model_card import write_model_card
from .stages import Recipe, finetune_language, swap_llm, train_language, train_projector, train_vision
from .text import REWORDED_QUESTIONS, make_tokenizer
from .world import HELD_OUT_START

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
"""Where the shipped miniature lives inside the package."""

STAGES = ("A", "B", "C", "D")


def load_mini(path=CHECKPOINT_DIR, implementation="transformers"):
    """The shipped miniature: ``(LlamaVision, tokenizer)``, float32, on the CPU, no network.

    ``implementation="scratch"``: with the from-scratch towers of ``llama3vision_min.scratch``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"no miniature in {path}; "
                         "train one with `python -m llama3vision_min.miniature train --ship`")
    model = LlamaVision.from_pretrained(path, dtype=torch.float32, device="cpu",
                                        implementation=implementation)
    return model, load_tokenizer(path)


def _report(out):
    file = Path(out) / "report.json"
    if not file.is_file():
        return {}
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not a report this writes: {error}") from None
    if not isinstance(report, dict):
        raise ValueError(f"{file} is not a report this writes: a JSON {type(report).__name__}, not an object")
    return report


def _save_report(out, report):
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def _publish(folder, report):
    """The model card and the numbers behind it (for notebooks and tests), beside the weights."""
    write_model_card(folder, report)
    _save_report(folder, report)


def _load_tower(out):
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(Path(out) / "A").eval().requires_grad_(False)


def _load_llm(out):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(Path(out) / "B").eval().requires_grad_(False)


def _tokenizer(out):
    folder = Path(out) / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder)
    return tokenizer


def _size_mb(folder):
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6


NEEDS = {"C": ("A", "B"), "D": ("B", "checkpoint")}
"""The earlier stages' outputs each stage reads from ``out``."""


def run_stage(stage, recipe, out, progress=True):
    """Run one stage, reading what it needs from ``out`` and writing its result there."""
    out = Path(out)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    missing = [name for name in NEEDS.get(stage, ()) if not (out / name / "config.json").is_file()]
    if missing:
        raise ValueError(f"stage {stage} reads {', '.join(str(out / name) for name in missing)}, "
                         "which an earlier stage writes: run it first (or --stage all)")
    out.mkdir(parents=True, exist_ok=True)
    report = _report(out)
    report["recipe"] = asdict(recipe)
    tokenizer = _tokenizer(out)
    begin = time.perf_counter()
    if stage == "A":
        tower, result = train_vision(recipe, tokenizer, progress)
        tower.save_pretrained(out / "A")
    elif stage == "B":
        llm, result = train_language(recipe, tokenizer, progress)
        llm.save_pretrained(out / "B")
    elif stage == "C":
        model, result = train_projector(_load_tower(out), _load_llm(out), tokenizer, recipe, progress)
        model.save_pretrained(out / "checkpoint")
        tokenizer.save_pretrained(out / "checkpoint")
        result["checkpoint_mb"] = _size_mb(out / "checkpoint")
        # Measure the miniature as it is on disk (a round trip through another dtype in memory
        # would change its logits), on pictures from seeds that training never used.
        shipped, shipped_tokenizer = load_mini(out / "checkpoint")
        result["accuracy"] = evaluate(shipped, shipped_tokenizer, n=recipe.eval_pictures, progress=progress)
    elif stage == "D":
        model, _ = load_mini(out / "checkpoint")
        llm = _load_llm(out)
        tuned, result = finetune_language(llm, tokenizer, recipe, progress)
        n = recipe.swap_eval_pictures
        start = HELD_OUT_START + 100_000  # held out, and apart from stage C's evaluation pictures
        result["original"] = evaluate(model, tokenizer, n=n, start=start, progress=progress)
        swapped = swap_llm(model, tuned)
        result["swapped"] = evaluate(swapped, tokenizer, n=n, start=start, progress=progress)
        result["swapped_new_wording"] = evaluate(swapped, tokenizer, n=n, start=start, progress=progress,
                                                 questions=REWORDED_QUESTIONS)
        control, control_report = train_language(recipe, tokenizer, progress,
                                                 seed=recipe.seed + recipe.control_seed_offset)
        result["control_llm"] = control_report
        result["control"] = evaluate(swap_llm(model, control), tokenizer, n=n, start=start, progress=progress)
    result["stage_seconds"] = time.perf_counter() - begin
    report[stage] = result
    _save_report(out, report)
    if (out / "checkpoint" / "config.json").is_file():
        _publish(out / "checkpoint", report)
    return result


def train_all(recipe=Recipe(), out="miniature-run", stages=STAGES, ship=False, progress=True):
    """Run ``stages`` in order; with ``ship``, copy the miniature into the package. Returns the report."""
    begin = time.perf_counter()
    for stage in stages:
        run_stage(stage, recipe, out, progress)
    report = _report(out)
    report["total_seconds"] = time.perf_counter() - begin
    _save_report(out, report)
    if (Path(out) / "checkpoint" / "config.json").is_file():
        _publish(Path(out) / "checkpoint", report)
    if ship:
        CHECKPOINT_DIR.mkdir(exist_ok=True)
        for file in (Path(out) / "checkpoint").iterdir():
            shutil.copy2(file, CHECKPOINT_DIR / file.name)
    return report
