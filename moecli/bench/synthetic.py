"""Random-weight GGUF models of real geometries for `bench --synthetic`: written once into the user cache, after a
free-space check, with a progress bar (the bytes on disk, polled while moecli.synth writes).

moecli.synth writes K-quant files through an F32 temporary that llama.cpp's quantizer reads; both files count
against the free space, and the bar follows both (F32 written, then quantized).
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from moecli.errors import MoecliError
from moecli.policy.geometry import BITS_PER_WEIGHT

# Average bits per weight of the types synth writes that BITS_PER_WEIGHT has no entry for (llama.cpp's mixes: the
# larger types they give some tensors included), for the free-space estimate; an upper bound is what matters.
_MIX_BITS = {"Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "IQ4_NL": 4.5, "MXFP4_MOE": 5.0, "Q3_K_S": 3.6, "Q3_K_M": 4.0,
             "Q3_K_L": 4.4, "Q4_K_S": 4.7, "Q4_K_M": 5.0, "Q5_K_S": 5.7, "Q5_K_M": 5.9}
MARGIN = 1.1       # estimate slack (metadata, padding, the mixes' larger tensors)
POLL_S = 0.25


def synthetic_dir() -> Path:
    from moecli.paths import cache_dir

    return cache_dir() / "synthetic"


def estimate_bytes(synth, arch: str, dims, ftype: str) -> tuple[int, int]:
    """(F32 temporary bytes, final file bytes) from synth's tensor plan; (0, final) when no temporary is needed."""
    elems = sum(math.prod(shape) for _, shape, _ in synth._plan(arch, dims))  # synth's own list of tensors
    final = int(elems * (BITS_PER_WEIGHT.get(ftype) or _MIX_BITS.get(ftype, 8.5)) / 8 * MARGIN)
    direct = ftype in getattr(synth, "_DIRECT", ())
    return (0 if direct else elems * 4), final


def check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        from moecli.limits import fmt_gib

        raise MoecliError(f"not enough disk space for {what}: about {fmt_gib(need)} needed, {fmt_gib(free)} free in "
                          f"{folder} (set MOECLI_CACHE to another disk, or use fewer --layers)")


def synthetic_model(geometry: str, n_layer: int, quant: str = "Q4_K_M", seed: int = 0,
                    echo: Callable[[str], None] | None = None, progress: bool = True) -> Path:
    """The cached file of this geometry, layer count, type and seed; written first when missing."""
    try:
        from moecli import synth
    except ImportError:
        raise MoecliError("synthetic models need moecli.synth, which this build lacks") from None
    try:
        dims = synth.geometry(geometry, n_layer=n_layer)
        arch = synth.geometry_arch(geometry)
    except KeyError as e:
        raise MoecliError(str(e.args[0]) if e.args else f"unknown geometry {geometry!r}") from None
    if quant not in synth.FTYPES:
        raise MoecliError(f"unknown --quant {quant!r}; one of {', '.join(synth.FTYPES)}")
    path = synthetic_dir() / f"{geometry}-L{n_layer}-{quant}-s{seed}.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_bytes, final_bytes = estimate_bytes(synth, arch, dims, quant)
    check_space(path.parent, temp_bytes + final_bytes, f"the synthetic {geometry} ({n_layer} layers, {quant})")
    if echo:
        from moecli.limits import fmt_gib

        echo(f"writing synthetic {geometry} ({n_layer} layers, {quant}, about {fmt_gib(final_bytes / MARGIN)}) "
             f"to {path} (once)")
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    before = set(path.parent.iterdir())
    try:
        _write_watched(lambda: synth.write_gguf(tmp, arch, dims, seed=seed, ftype=quant), tmp, before,
                       temp_bytes, final_bytes / MARGIN, progress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for f in set(path.parent.iterdir()) - before:  # synth's F32 temporary, should an error leave it
            if f.name.endswith(".f32.gguf"):
                f.unlink(missing_ok=True)
    return path


def _write_watched(write: Callable[[], None], out: Path, before: set, temp_bytes: int, final_bytes: float,
                   show: bool) -> None:
    """Run `write` on a thread while a Rich bar (stderr) follows the bytes of the files it creates."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    failure: list[BaseException] = []

    def run():
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failure.append(e)

    worker = threading.Thread(target=run, daemon=True)  # daemon: Ctrl-C ends the process, not a stuck write
    total = int(temp_bytes + final_bytes)
    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (show and console.is_terminal))
    temp_seen = 0
    with bar:
        task = bar.add_task("writing F32 weights" if temp_bytes else "writing weights", total=total)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_S)
            temps = [f for f in set(out.parent.iterdir()) - before if f.name.endswith(".f32.gguf")]
            temp_seen = max([temp_seen] + [_size(f) for f in temps])
            written = _size(out)
            if temp_bytes and written:
                bar.update(task, description="quantizing")
            done = temp_seen + written
            bar.update(task, completed=min(done, total))
    if failure:
        raise failure[0]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
