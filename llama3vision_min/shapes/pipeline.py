"""Run the stages in order, keep each stage's output on disk, ship the miniature and its model card.

    OUT/tokenizer/   the shapes-world tokenizer
    OUT/A/           stage A's vision tower (SiglipVisionModel)
    OUT/B/           stage B's language model (LlamaForCausalLM)
    OUT/mini/        stage C's LlamaVision in the -hf layout + tokenizer + README.md (the miniature's
                     model card) + report.json (a copy of the report below)
    OUT/report.json  timings, losses, probes and accuracies of every stage run so far

``--ship`` copies OUT/mini into the package (``llama3vision_min/mini``), where ``load_mini`` finds it.
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
from .text import REWORDED_QUESTIONS, make_tokenizer
from .train import Recipe, finetune_language, swap_llm, train_language, train_projector, train_vision
from .world import HELD_OUT_START, QUESTION_TYPES, RADIUS

MINI_DIR = Path(__file__).resolve().parents[1] / "mini"
"""Where the shipped miniature lives inside the package."""

STAGES = ("A", "B", "C", "D")


def load_mini(path=MINI_DIR):
    """The shipped miniature: ``(LlamaVision, tokenizer)``, float32, on the CPU, no network."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"no miniature in {path}; train one with `python -m llama3vision_min.shapes train --ship`")
    return LlamaVision.from_pretrained(path, dtype=torch.float32), load_tokenizer(path)


def _report(out):
    file = Path(out) / "report.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _save_report(out, report):
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")


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


def run_stage(stage, recipe, out, progress=True):
    """Run one stage, reading what it needs from ``out`` and writing its result there."""
    out = Path(out)
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
        model.save_pretrained(out / "mini")
        tokenizer.save_pretrained(out / "mini")
        result["checkpoint_mb"] = _size_mb(out / "mini")
        # Measure the miniature as it is on disk (a round trip through another dtype in memory
        # would change its logits), on pictures from seeds that training never used.
        shipped, shipped_tokenizer = load_mini(out / "mini")
        result["accuracy"] = evaluate(shipped, shipped_tokenizer, n=recipe.eval_pictures, progress=progress)
    elif stage == "D":
        model, _ = load_mini(out / "mini")
        llm = _load_llm(out)
        tuned, result = finetune_language(llm, tokenizer, recipe, progress)
        n = recipe.swap_eval_pictures
        start = HELD_OUT_START + 100_000  # held out, and apart from stage C's evaluation pictures
        result["original"] = evaluate(model, tokenizer, n=n, start=start, progress=progress)
        swapped = swap_llm(model, tuned)
        result["swapped"] = evaluate(swapped, tokenizer, n=n, start=start, progress=progress)
        result["swapped_new_wording"] = evaluate(swapped, tokenizer, n=n, start=start, progress=progress,
                                                 questions=REWORDED_QUESTIONS)
        control, control_report = train_language(recipe, tokenizer, progress, seed=recipe.seed + recipe.control_seed_offset)
        result["control_llm"] = control_report
        result["control"] = evaluate(swap_llm(model, control), tokenizer, n=n, start=start, progress=progress)
    else:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    result["stage_seconds"] = time.perf_counter() - begin
    report[stage] = result
    _save_report(out, report)
    if (out / "mini" / "config.json").is_file():
        write_model_card(out / "mini", report)
    return result


def train_all(recipe=Recipe(), out="shapes-run", stages=STAGES, ship=False, progress=True):
    """Run ``stages`` in order; with ``ship``, copy the miniature into the package. Returns the report."""
    begin = time.perf_counter()
    for stage in stages:
        run_stage(stage, recipe, out, progress)
    report = _report(out)
    report["total_seconds"] = time.perf_counter() - begin
    _save_report(out, report)
    if (Path(out) / "mini" / "config.json").is_file():
        write_model_card(Path(out) / "mini", report)
    if ship:
        MINI_DIR.mkdir(exist_ok=True)
        for file in (Path(out) / "mini").iterdir():
            shutil.copy2(file, MINI_DIR / file.name)
    return report


def _pct(value):
    return f"{100 * value:.1f} %"


def _accuracy_row(name, result):
    cells = " | ".join(_pct(result[q]) for q in QUESTION_TYPES)
    return f"| {name} | {cells} | {_pct(result['all'])} |"


def write_model_card(folder, report):
    """The miniature's README.md: what it is, how it was trained, what it scores."""
    r = report.get("recipe", {})
    lines = [
        "# The miniature llama-3-vision-alpha",
        "",
        "A complete llama-3-vision-alpha trained from scratch on CPU in minutes, for a world of coloured shapes",
        "(`llama3vision_min.shapes`): a tiny SigLIP-architecture vision tower (frozen), a tiny Llama-architecture",
        "LLM (frozen) and a `ProjectionModule` between them -- the only part trained on pictures, with the",
        "LLaVA stage-1 recipe. Same `-hf` layout as `qresearch/llama-3-vision-alpha-hf`; load it with",
        "`llama3vision_min.load_mini()` or `LlamaVision.from_pretrained(this_folder)`.",
        "",
        "```python",
        "from llama3vision_min.shapes import load_mini, sample",
        "model, tokenizer = load_mini()",
        "image, question, answer = sample(10_000_000)",
        "ids = model.answer_question(image, question, tokenizer, do_sample=False)",
        "print(question, tokenizer.decode(ids, skip_special_tokens=True), '| expected:', answer)",
        "```",
        "",
        "## What it is",
        "",
        "* Pictures: 64 x 64 px, one to three copies of one shape (circle, square, triangle, star, cross) in one",
        "  colour (red, green, blue, yellow, purple) at random places and sizes (radius "
        f"{RADIUS[0]}-{RADIUS[1]} px) on a random light greyish background.",
        f"* Vision tower: SigLIP architecture, patch {r.get('patch_size')}, hidden {r.get('vision_hidden')}, "
        f"{r.get('vision_layers')} layers -> {r.get('patch_size') and (64 // r['patch_size']) ** 2} patch tokens; "
        "features from `hidden_states[-2]`.",
        f"* LLM: Llama architecture, hidden {r.get('text_hidden')}, {r.get('text_layers')} layers, "
        f"GQA {r.get('text_heads')}/{r.get('text_kv_heads')} heads; byte-level BPE tokenizer with Llama 3's special "
        "tokens and chat template.",
        f"* Projector: Linear {r.get('vision_hidden')} -> {r.get('text_hidden')}, GELU, "
        f"Linear {r.get('text_hidden')} -> {r.get('text_hidden')}.",
    ]
    if "C" in report and "checkpoint_mb" in report["C"]:
        lines.append(f"* Checkpoint: {report['C']['checkpoint_mb']:.1f} MB of safetensors (float32).")
    lines += ["", "## How it was trained (seed {})".format(r.get("seed")), ""]
    if "A" in report:
        a = report["A"]
        lines.append(
            f"* **A, vision tower** ({a['stage_seconds']:.0f} s): a tiny `SiglipModel` (image and text towers) trained "
            f"{r.get('a_steps')} steps with the sigmoid contrastive loss on picture/caption pairs (\"two red circles\"), "
            f"batches of {r.get('a_batch')} different captions, lr {r.get('a_lr')} with {_pct(r.get('a_warmup', 0.03))} "
            "warm-up then cosine; logit scale/bias start at log 10 / -5. Linear probe on "
            f"mean-pooled `hidden_states[-2]`: colour {_pct(a['probe']['colour'])}, shape {_pct(a['probe']['shape'])}, "
            f"count {_pct(a['probe']['count'])} (random tower: {_pct(a['probe_random_tower']['colour'])}, "
            f"{_pct(a['probe_random_tower']['shape'])}, {_pct(a['probe_random_tower']['count'])}).")
    if "B" in report:
        b = report["B"]
        lines.append(
            f"* **B, LLM** ({b['stage_seconds']:.0f} s): trained {r.get('b_steps')} steps, text only, on Llama 3 chat "
            "dialogs whose user turn holds a written description of a scene (padded with filler words to as many "
            f"tokens as the picture has patches; up to {_pct(r.get('b_noise', 0.0))} of its content words swapped for "
            "wrong ones, so it learns to go by what most of the description says"
            + ("; nouns in singular or plural at random, so its answer's noun agrees with the count word it wrote"
               if r.get("b_mixed_number") else "")
            + ") and a question; loss on the answer. Reads clean descriptions: "
            + ", ".join(f"{q} {_pct(v)}" for q, v in b["reading_accuracy"].items()) + ".")
    if "C" in report:
        c = report["C"]
        lines.append(
            f"* **C, projector** ({c['stage_seconds']:.0f} s): A and B frozen, {r.get('c_steps')} steps of batch "
            f"{r.get('c_batch')} on {r.get('c_pictures')} pictures (question types what/colour/shape/count drawn "
            f"{':'.join(str(w) for w in r.get('c_question_weights', (1, 1, 1, 1)))}), lr {r.get('c_lr')}, "
            "warmup 3 %, cosine; labels -100 "
            f"except the answer tokens. Frozen vision features cached once: {c['cache_speedup']:.2f}x faster per step "
            f"than recomputing them ({1000 * c['step_seconds_recomputed']:.0f} ms -> {1000 * c['step_seconds_cached']:.0f} ms).")
    if "D" in report:
        d = report["D"]
        lines.append(
            f"* **D, LLM swap** ({d['stage_seconds']:.0f} s): a copy of B fine-tuned {r.get('d_steps')} steps (lr "
            f"{r.get('d_lr')}) on another wording of the descriptions and the questions ({_pct(r.get('d_old_questions', 0))} "
            "of its batches still asked in the old wording); C's projector plugged in unchanged. The fine-tune reads "
            "text descriptions in its new wording: "
            + ", ".join(f"{q} {_pct(v)}" for q, v in d["reading_accuracy_new_wording"].items())
            + "; in the old: " + ", ".join(f"{q} {_pct(v)}" for q, v in d["reading_accuracy"].items())
            + ". Control: an LLM trained like B "
            f"from seed {r.get('seed', 0) + r.get('control_seed_offset', 0)}.")
    if "total_seconds" in report:
        lines.append(f"* All stages from scratch: {report['total_seconds']:.0f} s on this machine's 2 CPU threads.")
    if "C" in report:
        acc = report["C"]["accuracy"]
        lines += ["", "## Accuracy", "",
                  f"Greedy exact match on {acc['n_pictures']} pictures from seeds never used in training "
                  f"(seeds {HELD_OUT_START} ..), every question type asked about every picture:", "",
                  "| model | what is this? | what colour is the shape? | what shape is it? | how many shapes are there? | all |",
                  "|---|---|---|---|---|---|", _accuracy_row("miniature (A + B + C)", acc)]
    if "D" in report:
        d = report["D"]
        lines += ["", f"LLM swap ({d['original']['n_pictures']} other held-out pictures, projector not retrained):", "",
                  "| LLM under the projector | what | colour | shape | count | all |", "|---|---|---|---|---|---|",
                  _accuracy_row("B, the LLM the projector was trained with", d["original"]),
                  _accuracy_row("B fine-tuned on another wording (D), asked in the old wording", d["swapped"]),
                  _accuracy_row("D, asked in its new wording", d["swapped_new_wording"]),
                  _accuracy_row("control: an LLM trained like B from another seed", d["control"]),
                  "", "The projector maps pictures into the embedding space that one LLM reads. A fine-tune "
                  "keeps most of that space, so the projector still works; an independently trained LLM has its own "
                  "embedding space, where the projected pictures mean nothing."]
    lines.append("")
    (Path(folder) / "README.md").write_text("\n".join(lines))
    _save_report(folder, report)  # the numbers behind the card, for notebooks and tests
