"""The miniature's model card: ``README.md`` beside its weights, written from the training report.

Everything measured comes from ``report.json`` (the numbers of the run that made the weights);
``WHAT_IT_TOOK`` is the history of the recipe, measured while it was developed.
"""

from pathlib import Path

from .world import HELD_OUT_START, QUESTION_TYPES, RADIUS

WHAT_IT_TOOK = """
## What it took

Found by measuring where the errors were, not by training longer (each change below was one full run
of the stages, evaluated on the same held-out pictures):

* **Light backgrounds and objects of one size.** On dark backgrounds the dark colours (blue, purple)
  nearly vanish, and with a lone object larger than one of a group, one big object and two small ones
  looked alike: the tiny tower barely learned shape and count.
* **Stage A batches that hold each of the 75 captions once**, so no pair in a batch is a false
  negative, with `logit_scale` / `logit_bias` started at log 10 / -5 (the SigLIP paper's -10 suits
  batches of thousands and left these negatives without gradient).
* **Stage B reading noisy descriptions** (up to half the content words swapped for wrong ones), so the
  LLM learns to go by what most of its context says -- as it must with picture tokens, each of which
  shows the scene only in part. In validation runs this lifted counting from 73 % to 93 %.
* **From 97.3 % to 99.0 %**: object radii of 10-12 px instead of 9-14 (the tower had counted partly by
  coloured area and read three small objects as two: count 97 % -> 98.6 %); thinner arms on the cross
  (taken for a square: shape 98.6 % -> 100 %); nouns of random number in stage B's descriptions, so the
  LLM makes its noun agree with the count word it wrote instead of copying it ("a red circles"). More
  stage-A steps, a deeper LLM or a higher stage-C learning rate each stayed within 97.0-97.8 %.
* **Stage D keeps half its batches in the old wording.** Without them the fine-tune forgot "what is
  this?" entirely: it answered with the shape, as for its new "what kind of shape is this?".
"""
"""The recipe's history (from the closing notes of the issue that built the miniature)."""


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
        "A complete llama-3-vision-alpha trained from scratch on CPU in minutes, for a world of coloured "
        "shapes",
        "(`llama3vision_min.miniature`): a tiny SigLIP-architecture vision tower (frozen), a tiny "
        "Llama-architecture",
        "LLM (frozen) and a `ProjectionModule` between them -- the only part trained on pictures, with the",
        "LLaVA stage-1 recipe. Same `-hf` layout as `qresearch/llama-3-vision-alpha-hf`; load it with",
        "`llama3vision_min.load_mini()` or `LlamaVision.from_pretrained(this_folder)`.",
        "",
        "```python",
        "from llama3vision_min.miniature import load_mini, sample",
        "model, tokenizer = load_mini()",
        "image, question, answer = sample(10_000_000)",
        "ids = model.answer_question(image, question, tokenizer, do_sample=False)",
        "print(question, tokenizer.decode(ids, skip_special_tokens=True), '| expected:', answer)",
        "```",
        "",
        "## What it is",
        "",
        "* Pictures: 64 x 64 px, one to three copies of one shape (circle, square, triangle, star, cross) "
        "in one",
        "  colour (red, green, blue, yellow, purple) at random places and sizes (radius "
        f"{RADIUS[0]}-{RADIUS[1]} px) on a random light greyish background.",
        f"* Vision tower: SigLIP architecture, patch {r.get('patch_size')}, hidden {r.get('vision_hidden')}, "
        f"{r.get('vision_layers')} layers -> "
        f"{r.get('patch_size') and (64 // r['patch_size']) ** 2} patch tokens; "
        "features from `hidden_states[-2]`.",
        f"* LLM: Llama architecture, hidden {r.get('text_hidden')}, {r.get('text_layers')} layers, "
        f"GQA {r.get('text_heads')}/{r.get('text_kv_heads')} heads; byte-level BPE tokenizer with Llama 3's "
        "special tokens and chat template.",
        f"* Projector: Linear {r.get('vision_hidden')} -> {r.get('text_hidden')}, GELU, "
        f"Linear {r.get('text_hidden')} -> {r.get('text_hidden')}.",
    ]
    if "C" in report and "checkpoint_mb" in report["C"]:
        lines.append(f"* Checkpoint: {report['C']['checkpoint_mb']:.1f} MB of safetensors (float32).")
    lines += ["", "## How it was trained (seed {})".format(r.get("seed")), ""]
    if "A" in report:
        a = report["A"]
        lines.append(
            f"* **A, vision tower** ({a['stage_seconds']:.0f} s): a tiny `SiglipModel` (image and text "
            f"towers) trained {r.get('a_steps')} steps with the sigmoid contrastive loss on picture/caption "
            f"pairs (\"two red circles\"), batches of {r.get('a_batch')} different captions, lr "
            f"{r.get('a_lr')} with {_pct(r.get('a_warmup', 0.03))} warm-up then cosine; logit scale/bias "
            "start at log 10 / -5. Linear probe on mean-pooled `hidden_states[-2]`: "
            f"colour {_pct(a['probe']['colour'])}, shape {_pct(a['probe']['shape'])}, "
            f"count {_pct(a['probe']['count'])} (random tower: {_pct(a['probe_random_tower']['colour'])}, "
            f"{_pct(a['probe_random_tower']['shape'])}, {_pct(a['probe_random_tower']['count'])}).")
    if "B" in report:
        b = report["B"]
        lines.append(
            f"* **B, LLM** ({b['stage_seconds']:.0f} s): trained {r.get('b_steps')} steps, text only, on "
            "Llama 3 chat dialogs whose user turn holds a written description of a scene (padded with filler "
            f"words to as many tokens as the picture has patches; up to {_pct(r.get('b_noise', 0.0))} of its "
            "content words swapped for wrong ones, so it learns to go by what most of the description says"
            + ("; nouns in singular or plural at random, so its answer's noun agrees with the count word "
               "it wrote" if r.get("b_mixed_number") else "")
            + ") and a question; loss on the answer. Reads clean descriptions: "
            + ", ".join(f"{q} {_pct(v)}" for q, v in b["reading_accuracy"].items()) + ".")
    if "C" in report:
        c = report["C"]
        lines.append(
            f"* **C, projector** ({c['stage_seconds']:.0f} s): A and B frozen, {r.get('c_steps')} steps of "
            f"batch {r.get('c_batch')} on {r.get('c_pictures')} pictures (question types "
            "what/colour/shape/count drawn "
            f"{':'.join(str(w) for w in r.get('c_question_weights', (1, 1, 1, 1)))}), lr {r.get('c_lr')}, "
            "warmup 3 %, cosine; labels -100 "
            f"except the answer tokens. Frozen vision features cached once: {c['cache_speedup']:.2f}x faster "
            f"per step than recomputing them ({1000 * c['step_seconds_recomputed']:.0f} ms -> "
            f"{1000 * c['step_seconds_cached']:.0f} ms).")
    if "D" in report:
        d = report["D"]
        lines.append(
            f"* **D, LLM swap** ({d['stage_seconds']:.0f} s): a copy of B fine-tuned {r.get('d_steps')} "
            f"steps (lr {r.get('d_lr')}) on another wording of the descriptions and the questions "
            f"({_pct(r.get('d_old_questions', 0))} of its batches still asked in the old wording); C's "
            "projector plugged in unchanged. The fine-tune reads text descriptions in its new wording: "
            + ", ".join(f"{q} {_pct(v)}" for q, v in d["reading_accuracy_new_wording"].items())
            + "; in the old: " + ", ".join(f"{q} {_pct(v)}" for q, v in d["reading_accuracy"].items())
            + ". Control: an LLM trained like B "
            f"from seed {r.get('seed', 0) + r.get('control_seed_offset', 0)}.")
    if "total_seconds" in report:
        lines.append(f"* All stages from scratch: {report['total_seconds']:.0f} s on this machine's 2 CPU "
                     "threads.")
    if "C" in report:
        acc = report["C"]["accuracy"]
        lines += ["", "## Accuracy", "",
                  f"Greedy exact match on {acc['n_pictures']} pictures from seeds never used in training "
                  f"(seeds {HELD_OUT_START} ..), every question type asked about every picture:", "",
                  "| model | what is this? | what colour is the shape? | what shape is it? "
                  "| how many shapes are there? | all |",
                  "|---|---|---|---|---|---|", _accuracy_row("miniature (A + B + C)", acc)]
    if "D" in report:
        d = report["D"]
        lines += ["", f"LLM swap ({d['original']['n_pictures']} other held-out pictures, projector not "
                      "retrained):", "",
                  "| LLM under the projector | what | colour | shape | count | all |",
                  "|---|---|---|---|---|---|",
                  _accuracy_row("B, the LLM the projector was trained with", d["original"]),
                  _accuracy_row("B fine-tuned on another wording (D), asked in the old wording",
                                d["swapped"]),
                  _accuracy_row("D, asked in its new wording", d["swapped_new_wording"]),
                  _accuracy_row("control: an LLM trained like B from another seed", d["control"]),
                  "", "The projector maps pictures into the embedding space that one LLM reads. A fine-tune "
                  "keeps most of that space, so the projector still works; an independently trained LLM has "
                  "its own embedding space, where the projected pictures mean nothing."]
    lines += ["", WHAT_IT_TOOK.strip()]
    if "C" in report:
        lines += ["", "## The first errors", "",
                  f"The first {len(report['C']['accuracy']['errors'])} wrong answers on the evaluation "
                  "pictures (seed, question, expected -> answered):", ""]
        lines += [f"* {seed}: {question} `{expected}` -> `{got}`"
                  for seed, question, expected, got in report["C"]["accuracy"]["errors"]]
    lines.append("")
    (Path(folder) / "README.md").write_text("\n".join(lines))
