"""Side-by-side benchmark: ``python benchmarks/bench.py [--sizes tiny,medium,real] [--quick]``
(``make bench``).

Every figure is a *ratio measured in the same run*: the paths being compared run interleaved
(A, B, C, A, B, C, ...) on identical weights, and the median of the repeats is kept, so a
machine shared with other work shifts both sides alike. Rows per size:

* forward (full logits) and greedy generation of N tokens: ours vs ``LlavaForConditionalGeneration``
  (the same tensors, shared, via ``llava_export.to_llava``) and vs the literal original
  (``llama3vision_original.py``); and our from-scratch towers (``implementation="scratch"``, the same
  tensors again) vs ours on transformers' towers;
* batched ``answer_questions`` on P pictures vs P sequential ``answer_question`` calls;
* a follow-up chat turn that reuses the KV cache of the picture and the history (``CachedChat``)
  vs the original's way (re-encode the whole text history, without the picture) and vs
  ``ChatSession`` (re-encode everything, picture included) -- full turn and first token;
* projector training steps with cached vision features vs features recomputed every step;
* with ``--llama-cpp`` (needs llama-cpp-python: ``make llama-cpp``): the same weights exported to GGUF
  (f32) and run by llama.cpp vs ours -- time to the first token and decode tokens/s, on the shipped miniature
  and the medium random model;
* with ``--stage1``: the stage-1 trainer's command line in one process and in two (``accelerate launch``,
  gloo), on the fake Hub's tiny model (``tests/fake_hub.py``) and generated pairs -- examples/s as the
  trainer reports it (loading excluded), the same global batch on both sides;
* the peak memory (resident set size above the start of the call) of each path.

Sizes (random weights from ``llama3vision_min.miniature.stand_ins.SIZES``: speed only):

    tiny    the tests' tiny stand-in (SigLIP 32 px / patch 8 / 2 x 32 wide; Llama 2 x 64 wide)
    medium  SigLIP 224 px / patch 14 (256 patches) / 4 x 384 wide; Llama 6 x 512 wide, GQA 8/4
    real    SigLIP so400m geometry (384 px / patch 14 = 729 patches, 1152 wide) and Llama-3-8B width
            (4096, GQA 32/8, vocab 128256), two layers each, float32

Every size uses the tiny byte-level tokenizer (with Llama 3's special tokens), so prompts are
short; the image dominates the sequence (16, 256 or 729 rows).
"""

import argparse
import copy
import ctypes
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import llama3vision_original as original
import torch

from llama3vision_min.chat import CachedChat
from llama3vision_min.constants import IGNORE_INDEX
from llama3vision_min.generation import stop_token_ids
from llama3vision_min.image import vision_features
from llama3vision_min.miniature.stand_ins import random_parts
from llama3vision_min.model import LlamaVision
from llama3vision_min.prompt import build_prompt
from llama3vision_min.scratch.weights import llm_from_transformers, vision_from_transformers
from llama3vision_min.token_split import tokenizer_image_token
from llama3vision_min.tools.llava_export import llava_processor, to_llava

QUESTION = "what is this?"
FOLLOW_UP = "what colour is the shape?"

SETTINGS = {
    # repeats: timed runs per path (median kept); warmup: untimed first runs per path;
    # threads: torch threads (small sizes: one, so small ops never wait on a busy core; real: all cores)
    "tiny": dict(repeats=7, warmup=1, pictures=8, new_tokens=32, train_batch=8, dtype=torch.float32,
                 threads=1),
    "medium": dict(repeats=5, warmup=1, pictures=8, new_tokens=32, train_batch=8, dtype=torch.float32,
                   threads=1),
    # About 5 minutes on 2 free cores: a warm-up and three timed runs per path (a single run let the first
    # path pay a first-call cost: 20 % on the forward), 2 pictures of 8 tokens for the batch row, no
    # training row (a step is a forward and a backward over 729 rows and a 128256-wide head: minutes).
    # float32: on CPUs bfloat16 matmuls of a few rows fall to a slow path (a 40-token prefill took 10x
    # longer).
    "real": dict(repeats=3, warmup=1, pictures=2, new_tokens=32, batch_new_tokens=8, train_batch=None,
                 dtype=torch.float32, threads=os.cpu_count()),
}
QUICK = dict(repeats=2, warmup=1, pictures=4, new_tokens=8, batch_new_tokens=8, train_batch=2)
"""``--quick``: a smoke run (real geometry: one run per path, no warm-up)."""


# -- building the models ---------------------------------------------------------------------
def build(size, seed=0):
    """``(LlamaVision, tokenizer)`` for one size, in eval mode, vision tower and LLM frozen."""
    vision_model, text_model, projector, tokenizer = random_parts(size, seed, dtype=SETTINGS[size]["dtype"])
    model = LlamaVision(vision_model, text_model, projector).eval()
    model.vision_model.requires_grad_(False)
    model.text_model.requires_grad_(False)
    return model, tokenizer


def pictures(n, seed=0):
    """``n`` random RGB pictures of odd sizes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rgb = torch.randint(0, 256, (41 + i, 57 + 2 * i, 3), generator=generator, dtype=torch.uint8)
        out.append(Image.fromarray(rgb.numpy(), mode="RGB"))
    return out


# -- measuring ---------------------------------------------------------------------------------
def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next peak starts clean
    except (OSError, AttributeError):
        pass


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak resident set size of a block, above the RSS at its start (Linux; ``mb`` is None elsewhere).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) on entry and reads
    ``VmHWM`` on exit.
    """

    def __enter__(self):
        self.mb = None
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            self.start = _status_kb("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            self.mb = max(_status_kb("VmHWM") - self.start, 0) / 1024
        return False


def compare(paths, repeats, warmup):
    """Time every path interleaved; returns ``({name: median seconds}, {name: peak MB})``.

    ``paths`` maps a name to ``run`` or to ``(setup, run)``: ``setup()`` runs untimed before every
    call and its result is passed to ``run``. The peak memory is taken on each path's first call.
    """
    paths = {name: (value if isinstance(value, tuple) else (None, value)) for name, value in paths.items()}
    times = {name: [] for name in paths}
    peaks = {}

    def call(name, timed):
        setup, run = paths[name]
        args = () if setup is None else (setup(),)
        with PeakMemory() as memory:
            start = time.perf_counter()
            run(*args)
            elapsed = time.perf_counter() - start
        peaks.setdefault(name, memory.mb)
        if timed:
            times[name].append(elapsed)

    for name in paths:
        for _ in range(warmup):
            call(name, timed=False)
    for _ in range(repeats):
        for name in paths:
            call(name, timed=True)
    return {name: statistics.median(values) for name, values in times.items()}, peaks


@dataclass
class Row:
    size: str
    comparison: str
    a: str
    b: str
    time_a: float  # median seconds
    time_b: float
    ratio: float
    meaning: str
    goal: str
    peak_a: float | None  # MB
    peak_b: float | None


def _row(size, comparison, times, peaks, a, b, meaning, goal=""):
    """A row whose ratio is time(a)/time(b) when ``meaning`` starts with 'time', else time(b)/time(a)."""
    ratio = times[a] / times[b] if meaning.startswith("time") else times[b] / times[a]
    return Row(size, comparison, a, b, times[a], times[b], ratio, meaning, goal, peaks.get(a), peaks.get(b))


# -- the benchmark of one size -----------------------------------------------------------------
def bench_size(size, quick=False, log=print):
    """All rows for one size."""
    settings = dict(SETTINGS[size])
    if quick:
        # real geometry: one run per path, no warm-up, and still no training row
        settings.update(QUICK if size != "real" else dict(repeats=1, warmup=0, new_tokens=QUICK["new_tokens"],
                                                          batch_new_tokens=QUICK["batch_new_tokens"]))
    repeats, warmup = settings["repeats"], settings["warmup"]
    n_new, n_pictures = settings["new_tokens"], settings["pictures"]
    batch_new = settings.get("batch_new_tokens", n_new)
    log(f"[{size}] building ...")
    model, tokenizer = build(size)
    llava = to_llava(model, tokenizer)  # shares every tensor with `model`: identical weights, no copy
    scratch = LlamaVision(vision_from_transformers(model.vision_model),
                          llm_from_transformers(model.text_model),
                          model.mm_projector).eval()  # our from-scratch towers, the same tensors again
    processor = llava_processor(model, tokenizer)
    images = pictures(max(n_pictures, settings["train_batch"] or 0))
    image = images[0]
    rows = []
    fixed = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new)  # same work on every path

    # forward: full logits over the spliced prompt
    ids = tokenizer_image_token(build_prompt(QUESTION), tokenizer)  # (L,) with one -200
    pixel_values = model.preprocess([image])  # (1, 3, H, W)
    llava_inputs = processor(images=[image], text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True), return_tensors="pt")
    llava_inputs = {k: v for k, v in llava_inputs.items()
                    if k in ("input_ids", "attention_mask", "pixel_values")}
    llava_inputs["pixel_values"] = llava_inputs["pixel_values"].to(model.vision_model.dtype)

    def ours_forward(which=model):
        with torch.inference_mode():
            return which(input_ids=ids.unsqueeze(0), pixel_values=pixel_values).logits

    def llava_forward():
        with torch.inference_mode():
            return llava(**llava_inputs).logits

    def original_forward():
        with torch.inference_mode():
            features = model.vision_model(pixel_values.to(model.vision_model.dtype),
                                          output_hidden_states=True).hidden_states[-2]
            embeds, mask = original.process_tensors(ids.unsqueeze(0), model.mm_projector(features),
                                                     model.text_model.get_input_embeddings())
            return model.text_model(inputs_embeds=embeds, attention_mask=mask).logits

    paths = {"ours": ours_forward, "LLaVA": llava_forward, "original": original_forward,
             "scratch": lambda: ours_forward(scratch)}
    log(f"[{size}] forward ...")
    times, peaks = compare(paths, repeats, warmup)
    rows.append(_row(size, "forward (full logits)", times, peaks, "ours", "LLaVA", "time ours/other",
                     "<= 1.00"))
    rows.append(_row(size, "forward (full logits)", times, peaks, "ours", "original", "time ours/other"))
    rows.append(_row(size, "forward (full logits)", times, peaks, "scratch", "ours",
                     "time scratch/transformers", "<= 1.25"))

    # greedy generation of n_new tokens, from picture and question (tokenization and pixels included)
    def ours_generate(which=model):
        return which.answer_question(image, QUESTION, tokenizer, **fixed)

    def llava_generate():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        inputs = processor(images=[image],
                           text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           return_tensors="pt")
        stops = stop_token_ids(tokenizer)
        with torch.inference_mode():
            return llava.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  pixel_values=inputs["pixel_values"].to(model.vision_model.dtype),
                                  eos_token_id=stops, pad_token_id=stops[0], **fixed)

    def original_generate():
        return original.answer_question(image, QUESTION, tokenizer, vision_model=model.vision_model,
                                         text_model=model.text_model, mm_projector=model.mm_projector,
                                         processor=model.processor, image_size=model.image_size, **fixed)

    paths = {"ours": ours_generate, "LLaVA": llava_generate, "original": original_generate,
             "scratch": lambda: ours_generate(scratch)}
    log(f"[{size}] generate ...")
    times, peaks = compare(paths, repeats, warmup)
    label = f"greedy generation, {n_new} tokens"
    rows.append(_row(size, label, times, peaks, "ours", "LLaVA", "time ours/other", "<= 1.00"))
    rows.append(_row(size, label, times, peaks, "ours", "original", "time ours/other"))
    rows.append(_row(size, label, times, peaks, "scratch", "ours", "time scratch/transformers", "<= 1.00"))

    # batched answer_questions vs sequential answer_question
    batch_images = images[:n_pictures]
    questions = [QUESTION] * n_pictures
    batch_fixed = dict(do_sample=False, max_new_tokens=batch_new, min_new_tokens=batch_new)
    paths = {
        "batched": lambda: model.answer_questions(batch_images, questions, tokenizer, **batch_fixed),
        "sequential": lambda: [model.answer_question(im, QUESTION, tokenizer, **batch_fixed)
                               for im in batch_images],
    }
    log(f"[{size}] batch ...")
    times, peaks = compare(paths, repeats, warmup)
    rows.append(_row(size, f"{n_pictures} pictures x {batch_new} tokens", times, peaks, "batched",
                     "sequential", "throughput batched/sequential", ">= 3"))

    # a follow-up chat turn
    log(f"[{size}] chat ...")
    session = CachedChat(model, image, tokenizer, **fixed)
    session.ask(QUESTION)  # turn 1 (untimed): the cache now holds picture, question and answer
    history = list(session.history)

    def full_session():
        chat = model.chat(image, tokenizer, **fixed)
        chat.history = list(history)
        return chat

    for label, extra in ((f"chat follow-up turn, {n_new} tokens", {}),
                         ("chat follow-up, first token", dict(max_new_tokens=1, min_new_tokens=1))):
        paths = {
            "cached": (session.fork, lambda s: s.ask(FOLLOW_UP, **extra)),
            "original": lambda: original.follow_up_turn(model.text_model, tokenizer, history, FOLLOW_UP,
                                                        **{**fixed, **extra}),
            "re-encode all": (full_session, lambda s: s.ask(FOLLOW_UP, **extra)),
        }
        times, peaks = compare(paths, repeats, warmup)
        rows.append(_row(size, label, times, peaks, "cached", "original", "speed-up of cached", ">= 5"))
        rows.append(_row(size, label, times, peaks, "cached", "re-encode all", "speed-up of cached"))

    # projector training: cached vision features vs recomputed every step
    if settings["train_batch"]:
        log(f"[{size}] train ...")
        rows.append(train_row(size, model, tokenizer, images[: settings["train_batch"]], repeats, warmup))
    return rows


def train_row(size, model, tokenizer, images, repeats, warmup):
    """Steps/s of projector training (AdamW, LLaVA stage-1 style labels) with cached vs recomputed
    features."""
    prompt = tokenizer_image_token(build_prompt(QUESTION), tokenizer)  # (L,)
    answer = torch.tensor(tokenizer("a red circle.<|eot_id|>").input_ids[1:])
    row_ids = torch.cat([prompt, answer])  # (L + A,)
    input_ids = row_ids.expand(len(images), -1)  # (batch, L + A)
    labels = input_ids.clone()
    labels[:, : len(prompt)] = IGNORE_INDEX  # loss on the answer only
    pixel_values = model.preprocess(images)  # (batch, 3, H, W)
    with torch.no_grad():
        cached = vision_features(model.vision_model, pixel_values)  # (batch, P, vision_hidden), computed once
    saved = copy.deepcopy(model.mm_projector.state_dict())
    optimizer = torch.optim.AdamW(model.mm_projector.parameters(), lr=1e-3, weight_decay=0.0)

    def step(**inputs):
        loss = model(input_ids=input_ids, labels=labels, **inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.mm_projector.train()
    try:
        times, peaks = compare({"cached features": lambda: step(vision_features=cached),
                                "recomputed": lambda: step(pixel_values=pixel_values)}, repeats, warmup)
    finally:
        model.mm_projector.load_state_dict(saved)
        model.mm_projector.eval()
    return _row(size, f"projector training step, batch {len(images)}", times, peaks, "cached features",
                "recomputed", "steps/s cached/recomputed")


# -- llama.cpp ---------------------------------------------------------------------------------
def bench_llama_cpp(name, repeats=5, warmup=1, new_tokens=32, log=print):
    """Rows for llama.cpp vs ours on ``name`` ("mini": the shipped miniature, or a size of ``SETTINGS``):
    time to the first token, and decode tokens/s over ``new_tokens`` forced tokens (stop tokens barred)."""
    import tempfile

    from llama3vision_min.generation import stop_token_ids
    from llama3vision_min.tools.gguf_export import export_gguf
    from llama3vision_min.tools.llama_cpp_runner import LlamaCppVision, square_picture

    log(f"[{name}] llama.cpp: exporting ...")
    if name == "mini":
        from llama3vision_min import load_mini

        model, tokenizer = load_mini()
    else:
        model, tokenizer = build(name)
    scratch = LlamaVision(vision_from_transformers(model.vision_model),
                          llm_from_transformers(model.text_model),
                          model.mm_projector).eval()  # the same tensors; decoded by scratch/generate.py
    image = square_picture(pictures(1)[0], model.image_size)  # square: llama.cpp would pad another
    stops = stop_token_ids(tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        export_gguf(model, tokenizer, folder, dtype="f32")
        with LlamaCppVision(folder, n_threads=os.cpu_count()) as runner:
            def ours(n, which=model):
                return lambda: which.answer_question(image, QUESTION, tokenizer, do_sample=False,
                                                     max_new_tokens=n, min_new_tokens=n)

            def theirs(n):
                barred = {token: -1e9 for token in stops}  # no early stop: exactly n tokens on both sides
                return lambda: runner.answer(image, QUESTION, n, logit_bias=barred)

            log(f"[{name}] llama.cpp: timing ...")
            paths = {f"{who} {n}": (theirs(n) if who == "llama.cpp" else ours(n, which))
                     for n in (1, new_tokens)
                     for who, which in (("llama.cpp", None), ("ours", model), ("ours-scratch", scratch))}
            times, peaks = compare(paths, repeats, warmup)
    rows = [_row(name, "time to the first token",
                 {"llama.cpp": times["llama.cpp 1"], "ours": times["ours 1"]},
                 {}, "llama.cpp", "ours", "time llama.cpp/ours")]
    decode = {who: (new_tokens - 1) / (times[f"{who} {new_tokens}"] - times[f"{who} 1"])
              for who in ("llama.cpp", "ours", "ours-scratch")}
    for a, b, goal in (("llama.cpp", "ours", ""),
                       ("llama.cpp", "ours-scratch", "<= 2.5" if name == "mini" else "<= 1.5"),
                       ("ours-scratch", "ours", ">= 1.00")):
        rows.append(Row(name, f"decode tokens/s ({new_tokens} tokens)", a, b, 1 / decode[a], 1 / decode[b],
                        decode[a] / decode[b], f"tokens/s {a}/{b}", goal, None, None))
    return rows


# -- stage 1 in one process and in two ------------------------------------------------------
def bench_stage1(repeats=3, pairs=64, epochs=2, log=print):
    """One row: the stage-1 trainer's throughput in two processes vs one, runs interleaved, the
    median of ``repeats`` each. Global batch 8 (per-device 4: accumulation 2 in one process, none in
    two); each run is a fresh command (loading is outside the examples/s the trainer reports)."""
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fake_hub import build_fake_hub

    rates = {"1 process": [], "2 processes": []}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        log("[stage 1] building the fake Hub ...")
        home = build_fake_hub(folder / "hf-home")
        (folder / "images").mkdir()
        entries = []
        for i, picture in enumerate(pictures(pairs)):
            picture.save(folder / "images" / f"{i}.png")
            entries.append({"image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": f"a picture, number {i}"}]})
        (folder / "data.json").write_text(json.dumps(entries))
        env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
        for run in range(repeats):
            for name, launch in (("1 process", []),
                                 ("2 processes", ["-m", "accelerate.commands.launch", "--multi_gpu",
                                                  "--num_processes", "2", "--num_machines", "1",
                                                  "--mixed_precision", "no", "--dynamo_backend", "no"])):
                out = folder / f"out-{name[0]}-{run}"
                argv = ["--data", str(folder / "data.json"), "--images", str(folder / "images"),
                        "--out", str(out), "--global-batch", "8", "--per-device-batch", "4",
                        "--epochs", str(epochs), "--num-workers", "0"]
                trainer = ["-m", "llama3vision_min.training.stage1"]
                done = subprocess.run([sys.executable, *launch, *trainer, *argv], env=env,
                                      capture_output=True, text=True, timeout=600)
                if done.returncode:
                    raise RuntimeError(f"stage 1 in {name} failed: {done.stderr[-2000:]}")
                rates[name].append(float(done.stdout.split(" examples/s")[0].rsplit(" ", 1)[-1]))
                log(f"[stage 1] {name}: {rates[name][-1]:.1f} examples/s")
    rate = {name: statistics.median(values) for name, values in rates.items()}
    return [Row("tiny", f"stage 1 trainer, global batch 8 ({pairs} pairs x {epochs} epochs)", "2 processes",
                "1 process", 8 / rate["2 processes"], 8 / rate["1 process"],
                rate["2 processes"] / rate["1 process"], "examples/s 2 processes/1", "", None, None)]


# -- printing ----------------------------------------------------------------------------------
def _seconds(value):
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _mb(value):
    return "n/a" if value is None else f"{value:.0f}"


def table(rows):
    """A markdown table of the rows."""
    lines = ["| size | comparison | A | B | A median | B median | ratio | meaning | goal "
             "| peak MB A | peak MB B |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.size} | {r.comparison} | {r.a} | {r.b} | {_seconds(r.time_a)} "
                     f"| {_seconds(r.time_b)} | "
                     f"{r.ratio:.2f} | {r.meaning} | {r.goal} | {_mb(r.peak_a)} | {_mb(r.peak_b)} |")
    return "\n".join(lines)


def machine():
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, "
            f"transformers {transformers.__version__}, "
            f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, load average at start {load:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--sizes", default="tiny,medium,real", help="comma-separated: tiny, medium, real "
                                                                    "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer repeats, tokens and pictures")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama.cpp vs ours on the miniature and the medium model "
                             "(needs llama-cpp-python)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every size (default: 1 for tiny and medium -- on a machine "
                             "shared with other jobs, more threads than free cores make small ops wait on "
                             "each other -- and all cores for real)")
    parser.add_argument("--stage1", action="store_true",
                        help="also the stage-1 trainer in one process vs two (tiny model, fake Hub)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {sorted(SETTINGS)}")
    print(f"machine: {machine()}")
    rows = []
    for size in sizes:
        torch.set_num_threads(args.threads or SETTINGS[size]["threads"])
        print(f"[{size}] {torch.get_num_threads()} torch thread(s)")
        start = time.perf_counter()
        rows += bench_size(size, quick=args.quick)
        print(f"[{size}] done in {time.perf_counter() - start:.0f} s")
    if args.llama_cpp:
        torch.set_num_threads(os.cpu_count())  # llama.cpp gets every core too
        for name in ("mini", "medium"):
            rows += bench_llama_cpp(name, repeats=2 if args.quick else 5, new_tokens=8 if args.quick else 32)
    if args.stage1:
        rows += bench_stage1(repeats=1 if args.quick else 3, pairs=16 if args.quick else 64)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
