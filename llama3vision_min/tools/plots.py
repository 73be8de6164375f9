"""Drawing helpers for the notebooks, so their cells show the idea and not the matplotlib.

Every function takes what a notebook has computed and only draws it (or formats it); none of
them computes anything the notebook teaches. Needs matplotlib (the ``notebooks`` extra).
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

PART_COLOURS = {"before": "#4c72b0", "image": "#dd8452", "after": "#55a868"}
"""Text before the picture, the picture's rows, text after it: the same colours in every drawing."""


# -- 01 and 06: pictures with answers ---------------------------------------------------------
def show_answers(pictures, titles, colours=None, width=3):
    """Pictures side by side, each titled (e.g. question and answer), the title in ``colours[i]``."""
    fig, axes = plt.subplots(1, len(pictures), figsize=(width * len(pictures), 3.4))
    for i, (ax, picture, title) in enumerate(zip(np.atleast_1d(axes), pictures, titles)):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8 if title.count("\n") > 1 else 9, color=colours[i] if colours else "black")
        ax.axis("off")
    plt.tight_layout()
    plt.show()


# -- 02: the token table ----------------------------------------------------------------------
def token_table(tokenizer, ids, sentinel_id):
    """An HTML table of ``ids``: blue before the sentinel, red the sentinel, green after it."""
    from IPython.display import HTML

    sentinel = ids.index(sentinel_id)
    rows = []
    for position, token_id in enumerate(ids):
        if token_id == sentinel_id:
            colour, token = "#f4b6b6", f"{sentinel_id}  (image goes here)"
        else:
            colour = "#c9dcf5" if position < sentinel else "#c8ecc9"
            token = repr(tokenizer.convert_ids_to_tokens(token_id))
        rows.append(f"<tr style='background:{colour}'><td>{position}</td><td><code>{token}</code></td>"
                    f"<td>{token_id}</td></tr>")
    return HTML("<table><tr><th>position</th><th>token</th><th>id</th></tr>" + "".join(rows) + "</table>")


# -- 03: the picture's path -------------------------------------------------------------------
def show_preprocessing(original, resized, pixel_values):
    """The picture as given, resized to the tower's square, and one normalised channel."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    axes[0].imshow(original)
    axes[0].set_title(f"original {original.width} x {original.height}")
    axes[1].imshow(resized)
    axes[1].set_title(f"resized to {resized.width} x {resized.height} (squashed)")
    shown = axes[2].imshow(pixel_values[0, 0].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    axes[2].set_title("normalised, red channel (-1..1)")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    plt.show()


def show_patch_grid(picture, patch, grid):
    """``picture`` (already at the tower's size) with its patch grid; patch numbers in reading order."""
    size = picture.width
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(picture, extent=(0, size, size, 0))
    for k in range(grid + 1):
        ax.axhline(k * patch, color="white", lw=0.8)
        ax.axvline(k * patch, color="white", lw=0.8)
    n_patches = grid * grid
    for index in range(n_patches) if grid <= 12 else (0, grid - 1, n_patches - grid, n_patches - 1):
        row, col = divmod(index, grid)
        ax.text((col + 0.5) * patch, (row + 0.5) * patch, str(index), ha="center", va="center",
                fontsize=max(5, 90 // grid), color="white")
    ax.set_title(f"{grid} x {grid} = {n_patches} patches of {patch} x {patch} pixels")
    plt.show()


def show_layer_similarity(per_patch, similarity, labels, grid, marked):
    """Left: a per-patch map on the patch grid. Right: one value per layer, layer ``marked`` flagged."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    shown = axes[0].imshow(per_patch.reshape(grid, grid).numpy(), cmap="viridis")
    axes[0].set_title("cosine(hidden_states[-2], [-1]), per patch")
    axes[0].set_axis_off()
    fig.colorbar(shown, ax=axes[0], fraction=0.046)
    axes[1].plot(range(len(similarity)), similarity, "o-")
    axes[1].set_xticks(range(len(similarity)), labels)
    axes[1].set_ylim(min(similarity) - 0.05, 1.0)
    axes[1].axvline(marked, color="tab:red", ls="--", label="hidden_states[-2]")
    axes[1].set_xlabel("hidden_states index")
    axes[1].set_ylabel("mean cosine between patches")
    axes[1].legend()
    plt.show()


def show_norms(word_norms, image_norms):
    """Histograms (log scale) of the lengths of word embeddings and of projected image vectors."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    low = min(word_norms.min(), image_norms.min()).item()
    high = max(word_norms.max(), image_norms.max()).item()
    bins = np.geomspace(low * 0.9, high * 1.1, 50)  # log-spaced: the two can differ by orders of magnitude
    ax.hist(word_norms.numpy(), bins=bins, alpha=0.6, density=True, label="word embeddings")
    ax.hist(image_norms.numpy(), bins=bins, alpha=0.6, density=True, label="projected image patches")
    ax.set(xlabel="L2 norm (length of the vector)", xscale="log", ylabel="density")
    ax.legend()
    plt.show()


# -- 04: the spliced sequence, masks and positions ----------------------------------------------
def draw_sequence(ax, parts, label):
    """One horizontal bar, one unit of length per row.

    ``parts``: ``[("before", n), ("image", n), ...]``; a third item replaces the text written on the part.
    """
    start, total = 0, sum(part[1] for part in parts)
    for name, length, *text in parts:
        text = text[0] if text else f"{name}\n{length}"
        ax.barh(0, length, left=start, color=PART_COLOURS[name], edgecolor="white")
        if length >= 0.08 * total:
            ax.text(start + length / 2, 0, text, ha="center", va="center", fontsize=9)
        else:  # too narrow to hold its label: write it above the bar
            ax.text(start + length / 2, 0.45, text.replace("\n", " "), ha="center", va="bottom", fontsize=9)
        start += length
    ax.set_ylim(-0.5, 1.0)
    ax.set_yticks([])
    ax.set_xlim(0, None)
    ax.text(-0.01, 0, label, ha="right", va="center", transform=ax.get_yaxis_transform())


def show_sequences(rows):
    """One bar per ``(label, parts)`` row, all drawn to one scale (see ``draw_sequence``)."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.5 * len(rows)), layout="constrained")
    for ax, (label, parts) in zip(np.atleast_1d(axes), rows):
        draw_sequence(ax, parts, label)
    np.atleast_1d(axes)[-1].set_xlabel("position in the sequence the LLM reads")
    plt.show()


def show_mask_and_positions(attention_mask, position_ids, edges):
    """The attention mask and the position ids of one row as heatmaps; red lines at ``edges``."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 2.4), layout="constrained")
    axes[0].imshow(attention_mask.numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1)
    axes[0].set_title("attention_mask (black = 1 = attend; all ones: no padding)")
    shown = axes[1].imshow(position_ids.numpy(), aspect="auto", cmap="viridis")
    axes[1].set_title("position_ids")
    fig.colorbar(shown, ax=axes[1], aspect=5)
    for ax in axes:
        ax.set_yticks([])
        for edge in edges:
            ax.axvline(edge, color="tab:red")
    plt.show()


def show_causal_mask(causal, key_part, edges):
    """Which key column each query row attends to, coloured by what the key is (``key_part``: 1, 2, 3)."""
    fig, ax = plt.subplots(figsize=(6.5, 6.5), layout="constrained")
    colours = ListedColormap(["white", PART_COLOURS["before"], PART_COLOURS["image"], PART_COLOURS["after"]])
    ax.imshow((causal * key_part).numpy(), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    for edge in edges:
        ax.axvline(edge, color="black", lw=0.6)
        ax.axhline(edge, color="black", lw=0.6)
    ax.set_title("causal mask: query row attends to key column\n(blue: text before, orange: image, green: text after)")
    ax.set(xlabel="key position", ylabel="query position")
    plt.show()


def show_padding(batches):
    """Attention masks and position ids of padded batches side by side: ``batches`` maps a name to a ``SplicedBatch``."""
    fig, axes = plt.subplots(2, len(batches), figsize=(12, 3.8), layout="constrained")
    for column, (name, batch) in enumerate(batches.items()):
        axes[0, column].imshow(batch.attention_mask.cpu().numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1)
        axes[0, column].set_title(f"{name} padding: attention_mask (white = padding)")
        shown = axes[1, column].imshow(batch.position_ids.cpu().numpy(), aspect="auto", cmap="viridis")
        axes[1, column].set_title(f"{name} padding: position_ids")
        for ax in axes[:, column]:
            ax.set_yticks(range(batch.attention_mask.shape[0]))
            ax.set_ylabel("row")
    fig.colorbar(shown, ax=axes[1, :])
    plt.show()


def run_lengths(row):
    """``[0, 0, 0, 1, 1]`` -> ``"0x3 1x2"``: a mask row written short."""
    out = []
    for value in row.tolist():
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return " ".join(f"{value}x{count}" for value, count in out)


# -- 08: inside the towers ------------------------------------------------------------------------
def show_rope(angles, n_positions=64):
    """RoPE's rotation angles: position by frequency pair (wrapped to -pi..pi), and a few pairs' cosines."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), layout="constrained")
    wrapped = wrap_angles(angles[:n_positions])
    shown = axes[0].imshow(wrapped.T.numpy(), aspect="auto", cmap="twilight", vmin=-np.pi, vmax=np.pi)
    axes[0].set(xlabel="position", ylabel="frequency pair (fast -> slow)", title="rotation angle of each pair")
    fig.colorbar(shown, ax=axes[0], fraction=0.046)
    pairs = [0, angles.shape[1] // 4, angles.shape[1] // 2, angles.shape[1] - 1]
    for pair in pairs:
        axes[1].plot(np.cos(angles[:n_positions, pair].numpy()), label=f"pair {pair}")
    axes[1].set(xlabel="position", ylabel="cos(angle)", title="fast pairs turn quickly, slow pairs barely")
    axes[1].legend(fontsize=8)
    plt.show()


def wrap_angles(angles):
    """Angles wrapped into -pi..pi."""
    return (angles + np.pi) % (2 * np.pi) - np.pi


# -- 09: what the LLM sees ---------------------------------------------------------------------------
def _square(picture, size=256):
    """The picture stretched to a square, as the vision tower sees it, at a size fit for drawing."""
    return np.asarray(picture.convert("RGB").resize((size, size)))


def show_heatmaps(picture, maps, titles, mask=None, size=256):
    """Each (grid, grid) map over the squared picture (brighter: more weight); ``mask``: objects outlined."""
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4), squeeze=False)
    for ax, heat, title in zip(axes[0], maps, titles):
        heat = np.asarray(heat, dtype=np.float32)
        ax.imshow(_square(picture, size))
        ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, size, size, 0), interpolation="nearest")
        if mask is not None:
            outline = np.asarray(mask.convert("L").resize((size, size)), dtype=np.float32)
            ax.contour(outline, levels=[127], colors="cyan", linewidths=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    plt.tight_layout()
    plt.show()


def show_patch_words(picture, words, size=320):
    """The squared picture cut into its patches, each labelled with its nearest word (``words``: one per
    patch, in reading order)."""
    grid = int(round(len(words) ** 0.5))
    step = size / grid
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(_square(picture, size))
    for index, word in enumerate(words):
        row, column = divmod(index, grid)
        ax.text((column + 0.5) * step, (row + 0.5) * step, repr(word)[1:-1], ha="center", va="center",
                fontsize=max(4, 60 // grid), color="black", bbox=dict(facecolor="white", alpha=0.6, pad=1, lw=0))
    ax.set_xticks(np.arange(0, size + 1, step), labels=[])
    ax.set_yticks(np.arange(0, size + 1, step), labels=[])
    ax.grid(color="white", linewidth=0.5)
    ax.tick_params(length=0)
    plt.show()


# -- 07: a live loss curve ----------------------------------------------------------------------
class LiveLoss:
    """Redraws the loss curve every ``every`` steps; pass it as ``on_step(step, losses)`` to a trainer."""

    def __init__(self, total_steps, every=25, title="loss"):
        self.total_steps, self.every, self.title = total_steps, every, title
        self.figure, self.axis = plt.subplots(figsize=(7, 3))

    def __call__(self, step, losses):
        from IPython.display import clear_output, display

        if step % self.every == self.every - 1 or step == self.total_steps - 1:
            self.axis.clear()
            self.axis.plot(losses, linewidth=0.8)
            self.axis.set(xlabel="step", ylabel="loss (answer tokens)", yscale="log",
                          title=f"{self.title}, step {step + 1} of {self.total_steps}")
            clear_output(wait=True)
            display(self.figure)

    def close(self):
        plt.close(self.figure)
