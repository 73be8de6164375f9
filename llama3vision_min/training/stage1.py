"""Stage 1 of the recipe at real scale: train the projector on image-caption pairs, everything else frozen.

This is how llama-3-vision-alpha's projector was trained (LLaVA's pretraining stage):
SigLIP so400m and Llama 3 are frozen, a fresh ``ProjectionModule`` learns to turn patch
features into vectors the LLM reads, and the loss is the LLM's cross-entropy on the
caption tokens only (the examples: ``data.py``).

    python -m llama3vision_min.training.stage1 --data blip_laion_cc_sbu_558k.json --images images/ \\
        --out runs/stage1 --save-every 100 [--resume]
    accelerate launch --num_processes 8 -m llama3vision_min.training.stage1 --data ... --images ... --out ...
    accelerate launch --multi_gpu --num_machines 2 --machine_rank R --main_process_ip HOST \\
        --main_process_port 29500 --num_processes 16 -m llama3vision_min.training.stage1 ...

Defaults are the LLaVA stage-1 recipe: lr 1e-3, global batch 256 (through gradient
accumulation: 256 = per-device batch x devices x accumulation steps), one epoch, cosine
schedule with 3 % warm-up, no weight decay, bf16 (LLaVA-1.5, arXiv 2310.03744, and its
``scripts/v1_5/pretrain.sh``: https://github.com/haotian-liu/LLaVA/blob/main/scripts/v1_5/pretrain.sh).
The result is ``OUT/mm_projector.safetensors`` with the official key names, which
``load_projector`` (and ``LlamaVision.from_alpha``) read, and ``OUT/trainer_state.json``
(loss and learning rate per update).

Any number of processes trains the projector one process does with the same global batch: the
same examples per update (``data.EpochOrder``), gradients averaged, the schedule stepped once per
update. ``--save-every`` writes checkpoints and ``--resume`` goes on from one (``checkpoints.py``).
Verified here on a CPU (``tests/workshop/test_stage1_processes.py``): two processes over gloo equal
one, and a run stopped and resumed equals an uninterrupted one, bit for bit. Not verified here:
GPUs and NCCL, more processes or machines, the real 558K run (docs/stage1.md).

The real run needs a GPU and the Hub (Colab or a GPU server). The same command runs on a CPU,
slowly, and offline on the fake Hub of ``tests/fake_hub.py``. The miniature's stage C
(``llama3vision_min.miniature.stages``) is this recipe at toy size, with the frozen tower's
features cached.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoints import (STATE, check_settings, checkpoints, read_state, register_projector_hooks,
                          save_checkpoint)
from .data import Collator, EpochOrder, LlavaPretrain


# -- the training loop -----------------------------------------------------------------------
def freeze_all_but_projector(model):
    """Stage 1: the vision tower and the LLM are frozen; returns the projector's parameters."""
    model.vision_model.requires_grad_(False).eval()
    model.text_model.requires_grad_(False).eval()
    model.mm_projector.requires_grad_(True).train()
    return list(model.mm_projector.parameters())


def save_projector(projector, out):
    """Write ``OUT/mm_projector.safetensors`` (keys ``model.0.*``/``model.2.*``, float32)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().float().cpu().contiguous() for key, value in projector.state_dict().items()}
    partial = out / f".mm_projector.safetensors.partial-{os.getpid()}"
    try:  # written whole under another name, then renamed: never a truncated projector
        save_file(state, str(partial), metadata={"format": "pt"})
        partial.rename(out / "mm_projector.safetensors")
    finally:
        partial.unlink(missing_ok=True)
    return out / "mm_projector.safetensors"


def check_batches(global_batch, per_device_batch, processes):
    """Examples per update across all processes, once ``global_batch`` is checked to be a multiple of it."""
    per_update = per_device_batch * processes
    if global_batch % per_update:
        raise ValueError(f"global_batch ({global_batch}) must be a multiple of per_device_batch x processes "
                         f"({per_device_batch} x {processes})")
    return per_update


def processes():
    """accelerate's view of the processes: this one alone, or all that ``accelerate launch`` started.

    Without a GPU they talk over gloo; accelerate sets that up only when told it runs on the CPU.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def train_stage1(model, dataset, tokenizer, out, lr=1e-3, global_batch=256, per_device_batch=16, epochs=1,
                 warmup_ratio=0.03, mixed_precision="bf16", max_steps=None, num_workers=0, seed=0,
                 save_every=None, keep=3, resume=None, progress=True):
    """Train ``model.mm_projector`` on ``dataset`` (a ``LlavaPretrain``) with everything else frozen;
    returns the loss per update.

    ``accelerate`` places the model, deals the batches out to the processes, averages the gradients
    across them and accumulates: each optimizer update sees ``global_batch`` examples, in whatever
    number of processes, and the same ones (``data.EpochOrder``). ``max_steps`` stops after that many
    updates (a trial run; the schedule is cut to them). ``save_every`` writes a checkpoint every that
    many updates into ``out`` (``checkpoints.py``), keeping the last ``keep``; ``resume`` names one to
    go on from. Saves the projector in ``out``, with ``trainer_state.json`` (loss and learning rate per
    update).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number above 0, got {lr!r}")
    per_update = check_batches(global_batch, per_device_batch, processes().num_processes)
    accumulation = global_batch // per_update
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision,
                              cpu=not torch.cuda.is_available())
    set_seed(seed)
    order = EpochOrder(len(dataset), global_batch, seed)
    per_epoch = len(order) // global_batch  # updates per epoch
    updates = min(per_epoch * epochs, max_steps or math.inf)
    settings = {"data": dataset.fingerprint(), "examples": len(dataset), "llm": _name(model.text_model),
                "vision": _name(model.vision_model), "global_batch": global_batch, "lr": lr, "epochs": epochs,
                "warmup_ratio": warmup_ratio, "max_steps": max_steps, "seed": seed,
                "mixed_precision": mixed_precision}

    params = freeze_all_but_projector(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Stepped once per update by this loop (a scheduler given to accelerate steps once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * updates), updates)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_device_batch, sampler=order,
                                         num_workers=num_workers,
                                         collate_fn=Collator(tokenizer, model.preprocess))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    register_projector_hooks(accelerator)
    history = []  # {"update", "loss", "lr"} per update
    if resume:
        saved = read_state(resume)
        check_settings(saved["settings"], settings, resume)
        accelerator.load_state(str(resume))  # the projector, AdamW's moments, the random generators
        accelerator.step = 0  # micro-batches into the update: none (it counted the writer's accumulation)
        scheduler.load_state_dict(saved["scheduler"])
        history = saved["history"]
    done = len(history)

    bar = tqdm(total=updates, initial=done, unit="update", desc="stage 1 (projector)",
               disable=not (progress and accelerator.is_main_process))
    window, started = [], time.perf_counter()
    for epoch in range(done // per_epoch, epochs):
        skip = (done - epoch * per_epoch) * accumulation  # this epoch's batches trained on before a resume
        batches = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
        batches.set_epoch(epoch)  # accelerate's count, passed on to the samplers it reaches; and ours
        order.set_epoch(epoch)  # directly (a resumed loader wraps it too deep for accelerate to reach)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                mean = accelerator.reduce(loss.detach(), "mean")  # over the processes: each sees the same
                if not torch.isfinite(mean):  # diverged: a projector saved now would answer noise
                    raise ValueError(f"the loss became {mean.item()} after {len(history)} updates; nothing "
                                     "was saved (try a lower --lr)")
                accelerator.backward(loss)  # DDP averages the gradients across the processes
                optimizer.step()  # only once the global batch is complete (accelerate skips the others)
                optimizer.zero_grad()
            window.append(mean.item())
            if not accelerator.sync_gradients:
                continue
            history.append({"update": len(history) + 1, "loss": sum(window) / len(window),
                            "lr": scheduler.get_last_lr()[0]})
            if not optimizer.step_was_skipped:  # float16's loss scaler skips an update that overflowed
                scheduler.step()
            window = []
            rate = (len(history) - done) * global_batch / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", examples_per_s=f"{rate:.1f}")
            if save_every and len(history) % save_every == 0 and len(history) < updates:
                save_checkpoint(accelerator, out, {"update": len(history), "settings": settings,
                                                   "scheduler": scheduler.state_dict(), "history": history},
                                keep)
            if len(history) >= updates:
                break
        if len(history) >= updates:
            break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / STATE).write_text(json.dumps({"settings": settings, "history": history}, indent=1))
        save_projector(accelerator.unwrap_model(model).mm_projector, out)  # last: its presence means done
    accelerator.wait_for_everyone()
    return [entry["loss"] for entry in history]


def _name(tower):
    """What a tower was loaded from (a Hub id or a folder), as its config records it."""
    return getattr(getattr(tower, "config", None), "name_or_path", None)


# -- command line --------------------------------------------------------------------------------
def _positive_int(text):
    """argparse type: a whole number >= 1 (the command lines of the miniature and of ``tools/cli.py`` use
    it too)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _count(text):
    """argparse type: a whole number >= 0 (data-loading workers)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _seed(text):
    """argparse type: a random seed in [0, 2**32), what torch, numpy and random all take (the command lines
    of the miniature and of ``tools/cli.py`` use it too)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {value}")
    return value


def _positive_float(text):
    """argparse type: a finite number above 0 (the learning rate)."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m llama3vision_min.training.stage1",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="LLaVA-Pretrain JSON (blip_laion_cc_sbu_558k.json)")
    parser.add_argument("--images", required=True, help="folder the JSON's picture paths are relative to")
    parser.add_argument("--out", required=True, help="where mm_projector.safetensors is written")
    parser.add_argument("--llm", default="unsloth/llama-3-8b-Instruct",
                        help="the frozen LLM (default: %(default)s, "
                             "an ungated copy of Meta-Llama-3-8B-Instruct)")
    parser.add_argument("--vision", default="google/siglip-so400m-patch14-384")
    parser.add_argument("--lr", type=_positive_float, default=1e-3)
    parser.add_argument("--global-batch", type=_positive_int, default=256)
    parser.add_argument("--per-device-batch", type=_positive_int, default=16)
    parser.add_argument("--epochs", type=_positive_int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-steps", type=_positive_int, default=None,
                        help="stop after this many updates (trial runs)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use only the first N examples")
    parser.add_argument("--load-in-4bit", action="store_true", help="the frozen LLM in 4-bit (bitsandbytes)")
    parser.add_argument("--num-workers", type=_count, default=4)
    parser.add_argument("--seed", type=_seed, default=0,
                        help="fixes the fresh projector's weights and the data order")
    parser.add_argument("--save-every", type=_positive_int, default=None, metavar="N",
                        help="write a checkpoint every N updates to OUT/checkpoint-STEP")
    parser.add_argument("--keep-last", type=_positive_int, default=3, metavar="K",
                        help="checkpoints kept (the last K; default %(default)s)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                        help="go on from the latest checkpoint in OUT, or from DIR")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUT that holds a projector or checkpoints (they are deleted)")
    return parser.parse_args(argv)


def precision(device):
    """``(dtype of the frozen towers, accelerate's mixed_precision)`` for ``device``.

    LLaVA trains in bfloat16. A GPU without it (a T4) uses float16; a CPU uses bfloat16 where it
    computes it, else float32 -- a CPU run is for trials only.
    """
    from ..model import cpu_computes_bfloat16

    if device.type == "cuda":
        return (torch.bfloat16, "bf16") if torch.cuda.is_bf16_supported() else (torch.float16, "fp16")
    return (torch.bfloat16, "bf16") if cpu_computes_bfloat16() else (torch.float32, "no")


def check_out(out, resume, overwrite):
    """What ``--out``, ``--resume`` and ``--overwrite`` ask for, checked before anything loads: returns the
    checkpoint to resume (or None). Never starts over on a finished projector or an unfinished run's
    checkpoints unless told to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder")
    found = checkpoints(out) if out.is_dir() else {}
    if overwrite:
        if resume:
            raise ValueError("--resume and --overwrite go against each other: give one")
        return None
    if (out / "mm_projector.safetensors").exists():
        raise ValueError(f"--out {out} already holds mm_projector.safetensors (a finished run): choose a new "
                         "folder, or pass --overwrite to start over")
    if resume == "latest":
        if not found:
            raise ValueError(f"--resume: no checkpoint-STEP folder in {out} to go on from")
        return list(found.values())[-1]
    if resume:
        read_state(resume)  # a checkpoint folder, or a clear error
        return Path(resume)
    if found:
        latest = list(found.values())[-1].name
        raise ValueError(f"--out {out} holds checkpoints of an unfinished run (the latest: {latest}): go on "
                         "with --resume, or pass --overwrite to start over")
    return None


def start_over(out):
    """``--overwrite``: delete what an earlier run wrote in ``out`` (only that)."""
    out = Path(out)
    for folder in list(checkpoints(out).values()) + list(out.glob(".checkpoint-*")):
        shutil.rmtree(folder)
    for name in ("mm_projector.safetensors", STATE):
        (out / name).unlink(missing_ok=True)


def main(argv=None):
    from accelerate.utils import set_seed

    from ..loading import load_tokenizer
    from ..model import LlamaVision

    args = parse_args(argv)
    try:
        resume = check_out(args.out, args.resume, args.overwrite)
        if not 0 <= args.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must lie in [0, 1), got {args.warmup_ratio}")
        state = processes()
        check_batches(args.global_batch, args.per_device_batch, state.num_processes)  # before any model loads
        dataset = LlavaPretrain(args.data, args.images, limit=args.limit)
        EpochOrder(len(dataset), args.global_batch, args.seed)  # enough examples for one global batch
        dtype, mixed_precision = precision(state.device)
        set_seed(args.seed)  # from_alpha draws the fresh projector's weights
        model = LlamaVision.from_alpha(args.llm, args.vision, projector=None, dtype=dtype,
                                       device=state.device, load_in_4bit=args.load_in_4bit)
        tokenizer = load_tokenizer(args.llm)
    except (ValueError, OSError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if state.device.type != "cuda" and state.is_main_process:
        print(f"no GPU: training on the CPU in {str(dtype).removeprefix('torch.')} (slow; for trial runs)",
              file=sys.stderr)
    if args.overwrite:
        state.wait_for_everyone()  # every process has looked at OUT before anything in it goes
        if state.is_main_process:
            start_over(args.out)
    model.mm_projector.float()  # trained in float32 under autocast, as LLaVA does
    started = time.perf_counter()
    try:
        losses = train_stage1(model, dataset, tokenizer, args.out, lr=args.lr, global_batch=args.global_batch,
                              per_device_batch=args.per_device_batch, epochs=args.epochs,
                              warmup_ratio=args.warmup_ratio, mixed_precision=mixed_precision,
                              max_steps=args.max_steps, num_workers=args.num_workers, seed=args.seed,
                              save_every=args.save_every, keep=args.keep_last, resume=resume)
    except ValueError as error:  # e.g. the loss became NaN, or a checkpoint of other settings: nothing saved
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    trained = len(losses) - (read_state(resume)["update"] if resume else 0)
    if state.is_main_process:
        print(f"{len(losses)} updates, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"{trained * args.global_batch / (time.perf_counter() - started):.1f} examples/s; "
              f"projector in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
