"""The demo's learning curves: held-out image and video MC against mixture steps or wall-clock minutes.

Reads the results.json files the demo writes (`demo.py --eval-every K` puts a bench score every K
mixture steps under "curve", with the minutes since the demo started), as kept in benchmarks/results/demo_*.json,
and draws them beside chance and the demo's goal (image MC >= 60, video MC >= 50). A colour per seed; runs with
marks solid, `--no-som` runs dashed; the longest runs drawn with squares. `--x minutes` draws the runs whose
curve carries minutes (results written before it did are left out, each named).

    .venv/bin/python benchmarks/demo_curves.py [results.json ...] [--x steps|minutes] [--out FILE.png]
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
GOAL_MINUTES = 15  # the marks read within 15 minutes on 2 CPU cores: not reached yet (README, Why not 15 minutes)
X_AXES = {"steps": ("step", "mixture steps"),
          "minutes": ("minutes", f"wall-clock minutes since the demo started (dotted: goal {GOAL_MINUTES})")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", default=sorted(glob.glob(os.path.join(HERE, "results", "demo_*.json"))))
    parser.add_argument("--x", choices=X_AXES, default="steps",
                        help="the x axis: mixture steps, or wall-clock minutes since the demo started")
    parser.add_argument("--out", help="the figure (default: benchmarks/results/demo_curves[_minutes].png)")
    args = parser.parse_args()
    name = "demo_curves.png" if args.x == "steps" else "demo_curves_minutes.png"
    args.out = args.out or os.path.join(HERE, "results", name)
    key, xlabel = X_AXES[args.x]
    plt = pyplot()
    if plt is None:
        parser.error("the figure needs matplotlib (pip install matplotlib)")
    if not args.results:
        parser.error("no results.json given, and none kept as benchmarks/results/demo_*.json")
    runs = {path: read_json(path) for path in args.results}
    for path, run in runs.items():
        if not run.get("curve"):
            parser.error(f"{path}: no learning curve in it (the demo writes one with --eval-every K)")
    if args.x == "minutes":
        for path in [p for p, run in runs.items() if "minutes" not in run["curve"][0]]:
            print(f"left out: {path} (its curve has no minutes: written before the demo recorded them)")
            del runs[path]
        if not runs:
            parser.error("no results.json whose curve carries minutes")
    longest = max(run["steps"] for run in runs.values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for path, run in runs.items():
        # what follows the seed in the file's name: "8000x2000", or "8000x4000 rerun" for demo_som_seed0_8000x4000_rerun
        setting = os.path.basename(path).removesuffix(".json").split("_", 3)[-1].replace("_", " ")
        label = f"{'marks' if run['som'] else '--no-som'}, seed {run['seed']}, {setting}"
        for ax, split in zip(axes, GOAL):
            xs, scores = [c[key] for c in run["curve"]], [c["eval"][split] for c in run["curve"]]
            ax.plot(xs, scores, "-" if run["som"] else "--", marker="s" if run["steps"] == longest else "o",
                    color=f"C{run['seed']}", markersize=4, label=label)
            print(f"{label:34s} {split}: " + ", ".join(f"{x}: {v:.1f}" for x, v in zip(xs, scores)))
    for ax, (split, goal) in zip(axes, GOAL.items()):
        ax.axhline(MC_RANDOM, color="grey", linestyle=":", linewidth=1)
        ax.axhline(goal, color="green", linestyle=":", linewidth=1)
        ax.set(title=f"{split} (dotted: chance {MC_RANDOM:.0f}, goal {goal})", xlabel=xlabel, ylim=(0, 100))
        if args.x == "minutes":
            ax.axvline(GOAL_MINUTES, color="green", linestyle=":", linewidth=1)
            ax.set_xlim(left=0)
    axes[0].set_ylabel("held-out MC accuracy, %")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=4)  # under the plots
    fig.tight_layout(rect=(0, 0.045 * -(-len(runs) // 4) + 0.02, 1, 1))
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
