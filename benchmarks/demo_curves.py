"""The demo's learning curves: held-out image and video MC against mixture steps, one line per run.

Reads the results.json files the demo writes (`demo.py --eval-every K` puts a bench score every K
mixture steps under "curve"), as kept in benchmarks/results/demo_*.json, and draws them beside chance and the
demo's goal (image MC >= 60, video MC >= 50). A colour per seed; runs with marks solid, `--no-som` runs
dashed; the longest runs drawn with squares.

    .venv/bin/python benchmarks/demo_curves.py [results.json ...] [--out benchmarks/results/demo_curves.png]
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import pyplot, read_json  # noqa: E402
from evaluate import MC_RANDOM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GOAL = {"image_mc": 60, "video_mc": 50}  # the demo's goal (README, The demo)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", default=sorted(glob.glob(os.path.join(HERE, "results", "demo_*.json"))))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "demo_curves.png"))
    args = parser.parse_args()
    plt = pyplot()
    if plt is None:
        parser.error("the figure needs matplotlib (pip install matplotlib)")
    if not args.results:
        parser.error("no results.json given, and none kept as benchmarks/results/demo_*.json")
    runs = {path: read_json(path) for path in args.results}
    for path, run in runs.items():
        if not run.get("curve"):
            parser.error(f"{path}: no learning curve in it (the demo writes one with --eval-every K)")
    longest = max(run["steps"] for run in runs.values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for path, run in runs.items():
        scenes_steps = os.path.basename(path).rsplit("_", 1)[-1].removesuffix(".json")  # e.g. 8000x2000
        label = f"{'marks' if run['som'] else '--no-som'}, seed {run['seed']}, {scenes_steps}"
        for ax, split in zip(axes, GOAL):
            steps, scores = [c["step"] for c in run["curve"]], [c["eval"][split] for c in run["curve"]]
            ax.plot(steps, scores, "-" if run["som"] else "--", marker="s" if run["steps"] == longest else "o",
                    color=f"C{run['seed']}", markersize=4, label=label)
            print(f"{label:34s} {split}: " + ", ".join(f"{s}: {v:.1f}" for s, v in zip(steps, scores)))
    for ax, (split, goal) in zip(axes, GOAL.items()):
        ax.axhline(MC_RANDOM, color="grey", linestyle=":", linewidth=1)
        ax.axhline(goal, color="green", linestyle=":", linewidth=1)
        ax.set(title=f"{split} (dotted: chance {MC_RANDOM:.0f}, goal {goal})", xlabel="mixture steps", ylim=(0, 100))
    axes[0].set_ylabel("held-out MC accuracy, %")
    axes[0].legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
