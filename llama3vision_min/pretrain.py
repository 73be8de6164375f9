"""Stage 1 of the recipe at real scale: train the projector on image-caption pairs, everything else frozen.

This is how llama-3-vision-alpha's projector was trained (LLaVA's pretraining stage):
SigLIP so400m and Llama 3 are frozen, a fresh ``ProjectionModule`` learns to turn patch
features into vectors the LLM reads, and the loss is the LLM's cross-entropy on the
caption tokens only. The data is LLaVA-Pretrain (558k LAION/CC/SBU pictures with BLIP
captions): a JSON list of ``{"image": "00453/004539375.jpg", "conversations":
[{"from": "human", "value": "<image>\\nRender a clear and concise summary of the photo."},
{"from": "gpt", "value": "a caption"}]}`` and a folder of pictures.

    python -m llama3vision_min.pretrain --data blip_laion_cc_sbu_558k.json --images images/ --out runs/stage1
    accelerate launch --num_processes 8 -m llama3vision_min.pretrain --data ... --images ... --out ...

Defaults are the LLaVA stage-1 recipe: lr 1e-3, global batch 256 (through gradient
accumulation: 256 = per-device batch x devices x accumulation steps), one epoch, cosine
schedule with 3 % warm-up, no weight decay, bf16. The result is ``OUT/mm_projector.safetensors``
with the official key names, which ``load_projector`` (and ``LlamaVision.from_alpha``) read.

It needs a GPU and the Hub (runs on Colab or a GPU server; not exercised offline). The
tests run the same code on the tiny stand-ins: collation, masking, accumulation and
optimizer steps. The miniature's stage C (``llama3vision_min.shapes``) is this recipe at
toy size, with the frozen tower's features cached.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from .constants import EOT_TOKEN, IGNORE_INDEX, IMAGE_PLACEHOLDER
from .prompt import build_prompt
from .token_split import continuation_ids, tokenizer_image_token


# -- the data ------------------------------------------------------------------------------
def caption_example(conversation):
    """A LLaVA-Pretrain conversation -> ``(question, answer)``.

    The human turn holds the ``<image>`` placeholder and an instruction; our prompt format
    always puts the picture first (``build_prompt``), so the placeholder is removed here.
    """
    if len(conversation) != 2 or conversation[0].get("from") != "human" or conversation[1].get("from") != "gpt":
        raise ValueError(f"expected a human turn then a gpt turn, got {[turn.get('from') for turn in conversation]}")
    question = conversation[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    return question, conversation[1]["value"].strip()


class LlavaPretrain(torch.utils.data.Dataset):
    """LLaVA-Pretrain's JSON and picture folder as a dataset of ``{"image", "question", "answer"}``."""

    def __init__(self, json_path, image_folder, limit=None):
        self.image_folder = Path(image_folder)
        entries = json.loads(Path(json_path).read_text())
        if not isinstance(entries, list):
            raise ValueError(f"expected a JSON list of examples in {json_path}, got {type(entries).__name__}")
        self.entries = entries[:limit] if limit else entries
        for entry in self.entries[:1]:  # fail on a wrong file before any training starts
            self._load(entry)

    def __len__(self):
        return len(self.entries)

    def _load(self, entry):
        if "image" not in entry or "conversations" not in entry:
            raise ValueError(f"expected 'image' and 'conversations' in every example, got keys {sorted(entry)}")
        question, answer = caption_example(entry["conversations"])
        path = self.image_folder / entry["image"]
        if not path.is_file():
            raise ValueError(f"picture {entry['image']!r} not found in {self.image_folder}")
        return {"image": Image.open(path).convert("RGB"), "question": question, "answer": answer}

    def __getitem__(self, index):
        return self._load(self.entries[index])


def example_ids(question, answer, tokenizer):
    """``(input_ids, labels)``, 1-D: the prompt with its ``-200`` sentinel, then the answer and ``<|eot_id|>``.

    Labels are ``IGNORE_INDEX`` on the prompt, so the loss is on the answer (and the end of
    turn, so the model learns to stop). The answer is tokenized apart from the prompt, the
    way generation sees it: the prompt ends with the assistant header, the answer follows.
    """
    prompt = tokenizer_image_token(build_prompt(question), tokenizer)  # (L_prompt,) with one -200
    answer_ids = torch.tensor(continuation_ids(answer + EOT_TOKEN, tokenizer))  # (L_answer,)
    input_ids = torch.cat([prompt, answer_ids])
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer_ids])
    return input_ids, labels


class Collator:
    """Examples -> one right-padded training batch for ``LlamaVision.forward``.

    Returns ``input_ids`` (batch, L) padded with the pad id, ``attention_mask`` (batch, L)
    with 0 on padding, ``labels`` (batch, L) with ``IGNORE_INDEX`` on prompt and padding,
    and ``pixel_values`` (batch, 3, H, W) from the model's image processor.
    """

    def __init__(self, tokenizer, preprocess, max_length=None):
        self.tokenizer = tokenizer
        self.preprocess = preprocess  # PIL images -> pixel values, e.g. LlamaVision.preprocess
        self.max_length = max_length  # text tokens per example (the picture adds its patches)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def __call__(self, examples):
        rows = [example_ids(e["question"], e["answer"], self.tokenizer) for e in examples]
        if self.max_length:
            rows = [(ids[: self.max_length], labels[: self.max_length]) for ids, labels in rows]
        longest = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for b, (ids, row_labels) in enumerate(rows):
            input_ids[b, : len(ids)] = ids
            labels[b, : len(ids)] = row_labels
            attention_mask[b, : len(ids)] = 1
        pixel_values = self.preprocess([e["image"] for e in examples])  # (batch, 3, H, W)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values}


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
    save_file(state, str(out / "mm_projector.safetensors"), metadata={"format": "pt"})
    return out / "mm_projector.safetensors"


def train_stage1(model, dataset, tokenizer, out, lr=1e-3, global_batch=256, per_device_batch=16, epochs=1,
                 warmup_ratio=0.03, mixed_precision="bf16", max_steps=None, num_workers=0, seed=0, progress=True):
    """Train ``model.mm_projector`` on ``dataset`` with everything else frozen; returns the loss per update.

    ``accelerate`` places the model, splits batches across processes and accumulates
    gradients: each optimizer update sees ``global_batch`` examples in all. ``max_steps``
    stops after that many updates (for a trial run). Saves the projector in ``out``.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    processes = PartialState().num_processes  # 1, or the number `accelerate launch` started
    per_update = per_device_batch * processes
    if global_batch % per_update:
        raise ValueError(f"global_batch ({global_batch}) must be a multiple of per_device_batch x processes "
                         f"({per_device_batch} x {processes})")
    accelerator = Accelerator(gradient_accumulation_steps=global_batch // per_update, mixed_precision=mixed_precision)
    set_seed(seed)

    params = freeze_all_but_projector(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_device_batch, shuffle=True, num_workers=num_workers,
                                         collate_fn=Collator(tokenizer, model.preprocess))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates = math.ceil(len(loader) / accelerator.gradient_accumulation_steps) * epochs
    if max_steps:
        updates = min(updates, max_steps)
    # A prepared scheduler advances once per process at each update, hence the factor.
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * updates) * accelerator.num_processes,
                                                updates * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)

    losses, window = [], []
    bar = tqdm(total=updates, desc="stage 1 (projector)", disable=not (progress and accelerator.is_main_process))
    for _epoch in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
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
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m llama3vision_min.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="LLaVA-Pretrain JSON (blip_laion_cc_sbu_558k.json)")
    parser.add_argument("--images", required=True, help="folder the JSON's picture paths are relative to")
    parser.add_argument("--out", required=True, help="where mm_projector.safetensors is written")
    parser.add_argument("--llm", default="meta-llama/Meta-Llama-3-8B-Instruct")
    parser.add_argument("--vision", default="google/siglip-so400m-patch14-384")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--per-device-batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (trial runs)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--load-in-4bit", action="store_true", help="the frozen LLM in 4-bit (bitsandbytes)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    from accelerate import PartialState

    from .loading import load_tokenizer
    from .model import LlamaVision

    args = parse_args(argv)
    try:
        dataset = LlavaPretrain(args.data, args.images, limit=args.limit)
        if not torch.cuda.is_available():
            raise ValueError("the real stage-1 recipe needs a CUDA GPU (bf16, an 8B LLM); none was found")
        state = PartialState()
        model = LlamaVision.from_alpha(args.llm, args.vision, projector=None, dtype=torch.bfloat16,
                                       device=state.device, load_in_4bit=args.load_in_4bit)
        tokenizer = load_tokenizer(args.llm)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model.mm_projector.float()  # trained in float32 under bf16 autocast, as LLaVA does
    losses = train_stage1(model, dataset, tokenizer, args.out, lr=args.lr, global_batch=args.global_batch,
                          per_device_batch=args.per_device_batch, epochs=args.epochs,
                          warmup_ratio=args.warmup_ratio, max_steps=args.max_steps,
                          num_workers=args.num_workers, seed=args.seed)
    print(f"{len(losses)} updates, loss {losses[0]:.3f} -> {losses[-1]:.3f}; projector in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
