"""What the benchmarks share: the paths to the real data beside the repository (``../shared``) and
to the results, the command line (:func:`arguments`, :data:`run`), peak memory, a row measured in a
fresh process, generated unit vectors, results written atomically as JSON, and line plots."""

import argparse
import json
import os
import resource
import subprocess
import sys

from longcontrast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")  # the JSON (and PNG) every benchmark writes by default
SHARED = os.path.join(ROOT, "..", "shared", "data")
DOC2DIAL = os.path.join(SHARED, "doc2dial")  # Doc2Dial chunks, pages and dev sets (CC BY 3.0)
run = cli.run  # every benchmark's entry: logging set up, a UserError as one ``error:`` line and exit 2


def arguments(description: str) -> argparse.ArgumentParser:
    """A benchmark's parser: ``description`` as its help, a bad flag or value one ``error:`` line (under :func:`run`)."""
    formatter = argparse.RawDescriptionHelpFormatter
    return cli.one_line_errors(argparse.ArgumentParser(description=description, formatter_class=formatter))


def peak_mb() -> float:
    """This process's peak resident memory in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fresh_process(script: str, *argv: str) -> dict:
    """Run ``python script argv...`` in a new process (its peak memory is its own) and return the
    JSON object its last line of output prints; a failure raises with the process's error output."""
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_unit_vectors(count: int, dim: int, dtype: str = "float16", device: str = "cpu"):
    """(count, dim) random unit vectors stored as ``dtype``, generated 65,536 rows at a time so that no
    float32 copy of the whole matrix exists (seed torch first for the same vectors)."""
    import torch

    vectors = torch.empty(count, dim, dtype=getattr(torch, dtype), device=device)
    for start in range(0, count, 65_536):
        block = torch.randn(min(65_536, count - start), dim, device=device)
        vectors[start: start + len(block)] = (block / block.norm(dim=1, keepdim=True)).to(vectors.dtype)
    return vectors


def write_json(path: str, value, indent: int | None = 2) -> None:
    """``value`` as JSON at ``path`` (``indent=None``: on one line), written whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(value, handle, indent=indent)
    os.replace(path + ".tmp", path)


def line_plots(path: str, panels: list[dict]) -> None:
    """A PNG of side-by-side line plots with one legend under them (3 labels a row: no line hidden).

    Each panel: ``lines`` ({label: [(x, y), ...]}), ``xlabel``, ``ylabel``, optional ``title``,
    ``log2_x`` (x on a log-2 axis, ticked at the points) and ``ylim``."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the tables and JSON say it all
        print(f"matplotlib is not installed: no {path}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for panel in panels for label in panel["lines"]))
    legend_rows = -(-len(labels) // 3)
    height = 4.2 + 0.25 * legend_rows  # inches
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), height), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, points in panel["lines"].items():
            if points:
                axis.plot(*zip(*points), marker="o", label=label, color=f"C{labels.index(label) % 10}")
        if panel.get("log2_x"):
            ticks = sorted({x for points in panel["lines"].values() for x, _ in points})
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(x) for x in ticks])
        axis.set(xlabel=panel["xlabel"], ylabel=panel["ylabel"], title=panel.get("title", ""))
        if "ylim" in panel:
            axis.set_ylim(*panel["ylim"])
        axis.grid(alpha=0.3)
    handles = {label: handle for axis in axes[0] for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.02, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
