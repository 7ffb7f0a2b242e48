"""Helpers shared by the reference scripts: where the model cache is, and golden-file writing."""

import json
import os
from pathlib import Path

# One BLAS thread, set before numpy loads: the sums then run in one order whatever the core count,
# so the goldens have the same bytes everywhere, and a busy 2-core machine is not slowed further
# by spinning BLAS threads.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"


def cache_dir(argv):
    """The model cache: the first argument, else $TWINFER_MODELS, else ~/.cache/twinfer/models."""
    if len(argv) > 1:
        return Path(argv[1])
    env = os.environ.get("TWINFER_MODELS")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "twinfer" / "models"


def round7(x):
    """Rounds to 7 significant digits: enough for an f32 comparison at 1e-4, half the file size.

    Goes through the decimal string so the JSON text is the short form of the rounded value."""
    return float(f"{float(x):.7g}")


def floats(a):
    """A float array (any shape) as nested lists of 7-digit floats."""
    if getattr(a, "ndim", 0) == 0:
        return round7(a)
    return [floats(row) for row in a]


def write_json(path, obj):
    """Writes compact JSON with one top-level field per line, atomically (a reader never sees half a
    file) and with stable bytes (fields in the given order, no trailing spaces)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
             for k, v in obj.items()]
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    os.replace(tmp, path)
