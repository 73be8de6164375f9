"""Draw ``docs/pipeline.png``, the README's picture of the pipeline: notebook 04's drawing, for the real
model.

    python docs/draw_pipeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llama3vision_min.tools.plots import draw_sequence  # noqa: E402


def main():
    fig, axes = plt.subplots(2, 1, figsize=(11, 3.4), layout="constrained")
    draw_sequence(axes[0], [("before", 5, ""), ("image", 1, ""), ("after", 9, "")], "")
    axes[0].text(22, 0, "<- 15 ids: 5 before (BOS, user header), the -200 sentinel, "
                        "9 after (question, assistant header)", va="center", fontsize=9)
    image_rows = ("729 image rows: SigLIP so400m hidden_states[-2]\n"
                  "-> projector (Linear 1152 -> 4096, GELU, Linear 4096 -> 4096)")
    draw_sequence(axes[1], [("before", 5, "5"), ("image", 729, image_rows), ("after", 9, "9")], "")
    axes[0].set_title("1. the prompt '<image>what is this?' as input_ids", loc="left")
    axes[1].set_title("2. what Llama 3 reads after the splice: 743 rows, each 4096 wide", loc="left")
    for ax in axes:
        ax.set_xlim(0, 743)  # one scale for both rows
    axes[1].set_xlabel("position in the sequence")
    fig.savefig(Path(__file__).with_name("pipeline.png"), dpi=100)


if __name__ == "__main__":
    main()
