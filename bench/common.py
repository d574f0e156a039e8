"""What the benchmarks share: the paths to the real data beside the repository (``../shared``) and to their results,
peak memory, a row measured in a fresh process, generated unit vectors, and results written
atomically as JSON. The benchmarks import the package as users do (``pip install -e .``)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")  # the JSON (and PNG) every benchmark writes by default
SHARED = os.path.join(ROOT, "..", "shared", "data")
DOC2DIAL = os.path.join(SHARED, "doc2dial")  # Doc2Dial chunks, pages and dev sets (CC BY 3.0)


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
