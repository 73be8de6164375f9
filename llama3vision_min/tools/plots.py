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
        ax.set_title(title, fontsize=8 if title.count("\n") > 1 else 9,
                     color=colours[i] if colours else "black")
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
        # the text colour is set with the background: Colab's dark theme would otherwise write light on pastel
        rows.append(f"<tr style='background:{colour};color:#111'><td>{position}</td>"
                    f"<td><code style='background:none;color:#111'>{token}</code></td>"
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
    """The lengths of word embeddings and of projected image vectors: each group's share of its rows per bin
    (log-spaced bins), so 64 or 729 image rows show as clearly as 128,256 words; medians marked."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    low = min(word_norms.min(), image_norms.min()).item()
    high = max(word_norms.max(), image_norms.max()).item()
    bins = np.geomspace(low * 0.9, high * 1.1, 60)  # log-spaced: the two differ by orders of magnitude
    for norms, colour, label in ((word_norms, "tab:blue", "word embeddings"),
                                 (image_norms, "tab:orange", "projected image rows")):
        median = norms.median().item()
        ax.hist(norms.numpy(), bins=bins, weights=np.full(len(norms), 1 / len(norms)), color=colour,
                alpha=0.7, label=f"{label} ({len(norms):,}; median {median:.2f})")
        ax.axvline(median, color=colour, linestyle="--")
    ratio = image_norms.median().item() / word_norms.median().item()
    ax.set(xlabel="L2 norm (length of the vector), log scale", xscale="log", ylabel="share of the rows",
           title=f"image rows are about {ratio:.0f}x longer than word embeddings (medians)")
    ax.legend(loc="upper center")
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


def show_causal_mask(causal, key_part, edges):
    """Which key column each query row attends to, coloured by what the key is (``key_part``: 1, 2, 3)."""
    fig, ax = plt.subplots(figsize=(6.5, 6.5), layout="constrained")
    colours = ListedColormap(["white", PART_COLOURS["before"], PART_COLOURS["image"], PART_COLOURS["after"]])
    ax.imshow((causal * key_part).numpy(), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    for edge in edges:
        ax.axvline(edge, color="black", lw=0.6)
        ax.axhline(edge, color="black", lw=0.6)
    ax.set_title("causal mask: query row attends to key column\n"
                 "(blue: text before, orange: image, green: text after)")
    ax.set(xlabel="key position", ylabel="query position")
    plt.show()


def show_padding(batches):
    """Attention masks and position ids of padded batches side by side: ``batches`` maps a name to a
    ``SplicedBatch``."""
    fig, axes = plt.subplots(2, len(batches), figsize=(12, 3.8), layout="constrained")
    for column, (name, batch) in enumerate(batches.items()):
        axes[0, column].imshow(batch.attention_mask.cpu().numpy(), aspect="auto", cmap="Greys",
                               vmin=0, vmax=1)
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


# -- 05: the KV cache -------------------------------------------------------------------------------
def show_rows_per_pass(with_cache, without_cache):
    """The rows one decoder layer reads in each forward pass while writing, with and without the KV cache."""
    fig, ax = plt.subplots(figsize=(8, 3.4), layout="constrained")
    passes = np.arange(max(len(with_cache), len(without_cache)))
    for shift, rows, colour, name in ((-0.2, without_cache, "#dd8452", "without the cache"),
                                      (0.2, with_cache, "#4c72b0", "with the cache")):
        bars = ax.bar(passes[:len(rows)] + shift, rows, width=0.4, color=colour,
                      label=f"{name}: {sum(rows):,} rows in all")
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set(xlabel="forward pass (0: the prompt, then one per new token)", ylabel="rows read", xticks=passes,
           ylim=(0, 1.4 * max(without_cache + with_cache)),
           title="with the cache the prompt is read once, then one row per new token")
    ax.legend(loc="upper center", ncols=2, fontsize=8)
    plt.show()


# -- 08: inside the towers ------------------------------------------------------------------------
def show_rope(angles, n_positions=64):
    """RoPE's rotation angles (positions 0, 1, ...): position by frequency pair (wrapped to -pi..pi), and
    a few pairs' cosines, each in a panel of its own so that none hides another."""
    angles = angles[:n_positions].float().cpu()
    pairs = [0, angles.shape[1] // 4, angles.shape[1] // 2, angles.shape[1] - 1]
    fig, axes = plt.subplot_mosaic([["heat", f"pair {pair}"] for pair in pairs], figsize=(12, 4.4),
                                   layout="constrained", width_ratios=(1, 1))
    shown = axes["heat"].imshow(wrap_angles(angles).T.numpy(), aspect="auto", cmap="twilight",
                                vmin=-np.pi, vmax=np.pi)
    axes["heat"].set(xlabel="position", ylabel="frequency pair (fast -> slow)",
                     title="rotation angle of each pair")
    fig.colorbar(shown, ax=axes["heat"], fraction=0.046, label="angle (radians)")
    turn = 2 * np.pi / (angles[1] - angles[0]).numpy()  # positions per full turn, per pair
    for row, pair in enumerate(pairs):
        ax = axes[f"pair {pair}"]
        ax.plot(np.cos(angles[:, pair].numpy()), lw=1.6, color=f"C{row}")
        ax.set_ylim(-1.25, 1.25)
        ax.set_yticks([-1, 0, 1])
        ax.set_ylabel(f"pair {pair}\none turn in\n{turn[pair]:,.0f}\npositions", rotation=0, ha="right",
                      va="center", fontsize=8, color=f"C{row}")
        if row < len(pairs) - 1:
            ax.tick_params(labelbottom=False)
    axes[f"pair {pairs[0]}"].set_title("cos(angle) of 4 pairs: fast pairs turn, slow ones stay flat")
    axes[f"pair {pairs[-1]}"].set_xlabel("position")
    plt.show()


def show_attention_weights(weights, titles, edges=(), title=None):
    """Causal attention weights (heads, queries, keys), one panel per head on one shared log colour scale; the
    masked future (above the diagonal) grey; ``edges``: positions where the picture's rows begin and end."""
    from matplotlib.colors import LogNorm

    weights = np.maximum(np.asarray(weights, dtype=np.float32), 1e-12)  # an underflowed 0: the darkest colour
    future = np.triu(np.ones(weights.shape[-2:], dtype=bool), k=1)
    weights = np.ma.masked_array(weights, mask=np.broadcast_to(future, weights.shape))
    fig, axes = plt.subplots(1, len(weights), figsize=(4.4 * len(weights) + 1, 4.4), layout="constrained",
                             squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bbbbbb")
    norm = LogNorm(vmin=max(float(weights.min()), 1e-4), vmax=1)  # smaller weights: the darkest colour
    for ax, panel, panel_title in zip(axes[0], weights, titles):
        shown = ax.imshow(panel, cmap=cmap, norm=norm, interpolation="nearest")
        for edge in edges:
            ax.axvline(edge - 0.5, color="white", lw=0.8, ls="--")
            ax.axhline(edge - 0.5, color="white", lw=0.8, ls="--")
        if len(edges) == 2:  # in the masked corner, above the picture's columns
            ax.text(sum(edges) / 2, 0.03 * panel.shape[1], "the picture's rows", ha="center", va="top",
                    fontsize=8, color="black")
        ax.set(xlabel="key position (looked at)", ylabel="query position (looking)", title=panel_title)
    fig.colorbar(shown, ax=axes[0].tolist(), fraction=0.03,
                 label="attention weight (log scale; grey: masked)")
    if title:
        fig.suptitle(title)
    plt.show()


def wrap_angles(angles):
    """Angles wrapped into -pi..pi."""
    return (angles + np.pi) % (2 * np.pi) - np.pi


# -- 09: what the LLM sees ---------------------------------------------------------------------------
def _square(picture, size=256):
    """The picture stretched to a square, as the vision tower sees it, at a size fit for drawing."""
    return np.asarray(picture.convert("RGB").resize((size, size)))


def _word_label(word):
    """A token as a legend writes it: quoted, or "a byte piece" for part of a character (decoded as
    U+FFFD)."""
    return "a byte piece" if "\ufffd" in str(word) else repr(str(word))


def _outline(ax, mask, size, colour):
    """The objects of ``mask`` (a PIL image, true on an object) outlined on ``ax``, drawn at ``size``."""
    if mask is not None:
        outline = np.asarray(mask.convert("L").resize((size, size)), dtype=np.float32)
        ax.contour(outline, levels=[127], colors=colour, linewidths=1.2)


def show_heatmaps(picture, maps, titles, mask=None, title=None, label="share of the attention", signed=False,
                  size=256):
    """The squared picture, then each (grid, grid) map on ONE colour scale with one colourbar.

    ``signed=False``: 0 (black) to the largest value of all maps (bright); ``signed=True``: a scale
    symmetric about 0 (white), red above and blue below, for drops that can go either way. ``mask``:
    the objects outlined on every panel. ``title``: what to see, above the panels.
    """
    maps = [np.asarray(heat, dtype=np.float32) for heat in maps]
    top = max(float(np.abs(heat).max()) for heat in maps) or 1.0
    scale = dict(cmap="RdBu_r", vmin=-top, vmax=top) if signed else dict(cmap="magma", vmin=0.0, vmax=top)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.8 * len(maps) + 3.6, 3.5), layout="constrained")
    axes[0].imshow(_square(picture, size))
    axes[0].set_title("the picture", fontsize=9)
    for ax, heat, text in zip(axes[1:], maps, titles):
        shown = ax.imshow(heat, extent=(0, size, size, 0), interpolation="nearest", **scale)
        ax.set_title(text, fontsize=9)
    for ax in axes:
        _outline(ax, mask, size, "black" if signed else "cyan")
        ax.set_axis_off()
    fig.colorbar(shown, ax=list(axes[1:]), label=label, shrink=0.85, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    plt.show()


def show_patch_words(picture, words, mask=None, top=9, size=320):
    """The squared picture and its patches coloured by their nearest word (``words``: one per patch, in
    reading order): the ``top`` most frequent words in their own colour, the others white. Up to
    12 x 12 patches each also carries its word; on a larger grid (the real 27 x 27) the legend reads."""
    from collections import Counter

    from matplotlib.patches import Patch

    grid = int(round(len(words) ** 0.5))
    counts = Counter(words).most_common()
    named = [word for word, _ in counts[:top]]
    palette = [plt.get_cmap("Set3").colors[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11)][: len(named)]
    colours = palette + [(1.0, 1.0, 1.0)]  # the last: every other word
    index = np.array([named.index(w) if w in named else len(named) for w in words]).reshape(grid, grid)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6), layout="constrained")
    axes[0].imshow(_square(picture, size))
    axes[0].set_title("the picture", fontsize=9)
    axes[1].imshow(index, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5,
                   extent=(0, size, size, 0), interpolation="nearest")
    step = size / grid
    if grid <= 12:
        for i, word in enumerate(words):
            row, column = divmod(i, grid)
            axes[1].text((column + 0.5) * step, (row + 0.5) * step, repr(word)[1:-1], ha="center",
                         va="center", fontsize=8 if grid <= 8 else 6, color="black")
    axes[1].set_title(f"nearest word of each of the {grid} x {grid} patches", fontsize=9)
    for ax in axes:
        _outline(ax, mask, size, "black")
        ax.set_axis_off()
    others = len(words) - sum(count for _, count in counts[:top])
    handles = [Patch(facecolor=c, edgecolor="grey", label=f"{_word_label(w)}: {n}")
               for c, (w, n) in zip(palette, counts[:top])]
    if others:
        handles.append(Patch(facecolor="white", edgecolor="grey", label=f"other words: {others}"))
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9,
                   title="word: patches", title_fontsize=9)
    plt.show()


def show_lens_shares(shares, words, depths, title):
    """``shares[d, w]``: the share of the picture's patches whose top reading at depth ``d`` is ``words[w]``;
    one row per depth (the input at the top), one colour scale from 0 to 1 with its colourbar."""
    shares = np.asarray(shares, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(1.1 * len(words) + 3.2, 0.22 * len(depths) + 2.0), layout="constrained")
    shown = ax.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(words)), [_word_label(word) for word in words], rotation=40, ha="right")
    every = 1 if len(depths) <= 12 else 4
    ax.set_yticks(range(0, len(depths), every), depths[::every])
    if len(depths) <= 12:
        for (d, w), share in np.ndenumerate(shares):
            ax.text(w, d, f"{share:.0%}", ha="center", va="center", fontsize=8,
                    color="black" if share > 0.6 else "white")
    fig.colorbar(shown, ax=ax, label="share of the picture's patches")
    ax.set_title(title, fontsize=10)
    plt.show()


def show_answer_lens(probabilities, labels, depths, title):
    """One line per question: the probability of its answer's first token at each depth (input first)."""
    fig, ax = plt.subplots(figsize=(8.5, 3.6), layout="constrained")
    for values, label in zip(probabilities, labels):
        ax.plot(range(len(values)), values, "o-", label=label)
    every = 1 if len(depths) <= 12 else 4
    ax.set_xticks(range(0, len(depths), every), depths[::every])
    ax.set(ylim=(-0.03, 1.03), ylabel="p(the answer's first token)", xlabel="read at")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    plt.show()


# -- 07: a live loss curve with held-out checks ---------------------------------------------------
def trailing_mean(values, window):
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


class LiveLoss:
    """One figure that a training loop redraws in place: the loss (left) and held-out accuracy (right).

    ``draw(losses, checks)``: ``losses`` one per step so far; ``checks`` ``{step: {question type: share
    right}}``. The figure is displayed once and then updated through its display handle, so the cell keeps
    one output (nbval compares one figure); call ``close()`` when training is done.
    """

    def __init__(self, total_steps, labels=None, smooth=20, titles=None):
        from IPython.display import display

        self.total_steps, self.labels, self.smooth = total_steps, labels or {}, smooth
        self.titles = titles or ("loss on the answer tokens", "held-out pictures answered exactly right")
        self.figure, self.axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
        self.handle = display(self.figure, display_id=True)

    def draw(self, losses, checks):
        loss_axis, check_axis = self.axes
        loss_axis.clear()
        check_axis.clear()
        steps = np.arange(1, len(losses) + 1)
        loss_axis.plot(steps, losses, color="0.7", lw=0.7, label="each step")
        loss_axis.plot(steps, trailing_mean(losses, self.smooth), color="tab:blue", lw=2,
                       label=f"mean of the last {self.smooth} steps")
        loss_axis.set(xlim=(0, self.total_steps), yscale="log", xlabel="step", ylabel="loss (log axis)",
                      title=self.titles[0])
        loss_axis.legend(loc="upper right", fontsize=9)
        for kind in next(iter(checks.values())):
            check_axis.plot(list(checks), [100 * check[kind] for check in checks.values()], "o-",
                            label=self.labels.get(kind, kind))
        check_axis.set(xlim=(0, self.total_steps), ylim=(0, 102), xlabel="step", ylabel="right (%)",
                       title=self.titles[1])
        check_axis.legend(loc="lower right", fontsize=9)
        self.figure.suptitle(f"training the projector: step {len(losses)} of {self.total_steps}")
        self.handle.update(self.figure)

    def close(self):
        plt.close(self.figure)


# -- 06: one projector, several LLMs --------------------------------------------------------------
RIGHT_COLOUR, WRONG_COLOUR = "#1a7f37", "#c62828"
"""Green for a right answer, red for a wrong one (dark enough to read on the figure's white)."""


def show_llm_answers(pictures, questions, expected, answers, title=None):
    """Pictures side by side, each with its question; under it every LLM's answer, green if right, red if not.

    ``answers`` maps an LLM's name to its answers, one per picture.
    """
    n = len(pictures)
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.3 + 0.32 * len(answers)), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(pictures[i], interpolation="nearest")
        ax.set_title(f"{questions[i]}\n(right: {expected[i]})", fontsize=9)
        ax.axis("off")
        for row, (name, said) in enumerate(answers.items()):
            right = said[i] == expected[i]
            ax.text(0.5, -0.06 - 0.12 * row, f"{name}: {said[i]} {'✓' if right else '✗'}",
                    transform=ax.transAxes, ha="center", va="top", fontsize=9,
                    color=RIGHT_COLOUR if right else WRONG_COLOUR)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(bottom=0.08 + 0.075 * len(answers), top=0.78, wspace=0.25)
    plt.show()
