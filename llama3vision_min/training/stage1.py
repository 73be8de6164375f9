"""Stage 1 of the recipe at real scale: train the projector on image-caption pairs, everything else frozen.

This is how llama-3-vision-alpha's projector was trained (LLaVA's pretraining stage):
SigLIP so400m and Llama 3 are frozen, a fresh ``ProjectionModule`` learns to turn patch
features into vectors the LLM reads, and the loss is the LLM's cross-entropy on the
caption tokens only (the examples: ``data.py``).

    python -m llama3vision_min.training.stage1 --data blip_laion_cc_sbu_558k.json --images images/ \\
        --out runs/stage1
    accelerate launch --num_processes 8 -m llama3vision_min.training.stage1 --data ... --images ... --out ...

Defaults are the LLaVA stage-1 recipe: lr 1e-3, global batch 256 (through gradient
accumulation: 256 = per-device batch x devices x accumulation steps), one epoch, cosine
schedule with 3 % warm-up, no weight decay, bf16 (LLaVA-1.5, arXiv 2310.03744, and its
``scripts/v1_5/pretrain.sh``: https://github.com/haotian-liu/LLaVA/blob/main/scripts/v1_5/pretrain.sh).
The result is ``OUT/mm_projector.safetensors`` with the official key names, which
``load_projector`` (and ``LlamaVision.from_alpha``) read.

The real run needs a GPU and the Hub (Colab or a GPU server). The same command runs on a CPU,
slowly, and offline on the fake Hub of ``tests/fake_hub.py`` (a trial of two updates runs in the
tests); the tests also run collation, masking, accumulation and optimizer steps on the tiny
stand-ins. The miniature's stage C (``llama3vision_min.miniature.stages``) is this recipe at toy
size, with the frozen tower's features cached.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from .data import Collator, LlavaPretrain


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


def train_stage1(model, dataset, tokenizer, out, lr=1e-3, global_batch=256, per_device_batch=16, epochs=1,
                 warmup_ratio=0.03, mixed_precision="bf16", max_steps=None, num_workers=0, seed=0,
                 progress=True):
    """Train ``model.mm_projector`` on ``dataset`` with everything else frozen; returns the loss per update.

    ``accelerate`` places the model, splits batches across processes and accumulates
    gradients: each optimizer update sees ``global_batch`` examples in all. ``max_steps``
    stops after that many updates (for a trial run). Saves the projector in ``out``.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number above 0, got {lr!r}")
    processes = PartialState().num_processes  # 1, or the number `accelerate launch` started
    per_update = check_batches(global_batch, per_device_batch, processes)
    accelerator = Accelerator(gradient_accumulation_steps=global_batch // per_update,
                              mixed_precision=mixed_precision)
    set_seed(seed)

    params = freeze_all_but_projector(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_device_batch, shuffle=True,
                                         num_workers=num_workers,
                                         collate_fn=Collator(tokenizer, model.preprocess))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates = math.ceil(len(loader) / accelerator.gradient_accumulation_steps) * epochs
    if max_steps:
        updates = min(updates, max_steps)
    # A prepared scheduler advances once per process at each update, hence the factor.
    scheduler = get_cosine_schedule_with_warmup(optimizer,
                                                math.ceil(warmup_ratio * updates) * accelerator.num_processes,
                                                updates * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)

    losses, window = [], []
    bar = tqdm(total=updates, desc="stage 1 (projector)",
               disable=not (progress and accelerator.is_main_process))
    for _epoch in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if not torch.isfinite(loss):  # diverged: a projector saved now would answer noise
                    raise ValueError(f"the loss became {loss.item()} after {len(losses)} updates; nothing "
                                     "was saved (try a lower --lr)")
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(loss.item())
            if accelerator.sync_gradients:  # an optimizer update happened
                losses.append(sum(window) / len(window))
                window = []
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) >= updates:
                    break
        if len(losses) >= updates:
            break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_projector(accelerator.unwrap_model(model).mm_projector, out)
    return losses


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
    parser.add_argument("--seed", type=_seed, default=0)
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


def main(argv=None):
    from accelerate import PartialState

    from ..loading import load_tokenizer
    from ..model import LlamaVision

    args = parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; name a folder")
        if (out / "mm_projector.safetensors").exists():
            raise ValueError(f"--out {out} already holds mm_projector.safetensors; choose a new folder")
        if not 0 <= args.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must lie in [0, 1), got {args.warmup_ratio}")
        state = PartialState()
        check_batches(args.global_batch, args.per_device_batch, state.num_processes)  # before any model loads
        dataset = LlavaPretrain(args.data, args.images, limit=args.limit)
        dtype, mixed_precision = precision(state.device)
        model = LlamaVision.from_alpha(args.llm, args.vision, projector=None, dtype=dtype,
                                       device=state.device, load_in_4bit=args.load_in_4bit)
        tokenizer = load_tokenizer(args.llm)
    except (ValueError, OSError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if state.device.type != "cuda":
        print(f"no GPU: training on the CPU in {str(dtype).removeprefix('torch.')} (slow; for trial runs)",
              file=sys.stderr)
    model.mm_projector.float()  # trained in float32 under autocast, as LLaVA does
    try:
        losses = train_stage1(model, dataset, tokenizer, args.out, lr=args.lr, global_batch=args.global_batch,
                              per_device_batch=args.per_device_batch, epochs=args.epochs,
                              warmup_ratio=args.warmup_ratio, mixed_precision=mixed_precision,
                              max_steps=args.max_steps, num_workers=args.num_workers, seed=args.seed)
    except ValueError as error:  # e.g. the loss became NaN: nothing is saved
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{len(losses)} updates, loss {losses[0]:.3f} -> {losses[-1]:.3f}; projector in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
