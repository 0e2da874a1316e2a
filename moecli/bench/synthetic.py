"""Random-weight GGUF models of real geometries for `bench --synthetic`: written once into the user cache, after a
free-space check, with a progress bar over the bytes moecli.synth reports as it writes them.

moecli.synth writes every type in one pass (K-quants through ggml's quantizer slice by slice, no F32 temporary), so
the file's own size is all the space needed.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from moecli.errors import MoecliError

MARGIN = 1.02      # metadata (the tokenizer) and padding beyond the tensor bytes
POLL_S = 0.25


def synthetic_dir() -> Path:
    from moecli.paths import cache_dir

    return cache_dir() / "synthetic"


def estimate_bytes(synth, arch: str, dims, ftype: str) -> int:
    """Bytes the file will take (its tensors in the types synth gives them, plus a margin for metadata)."""
    return int(synth.tensor_bytes(arch, dims, ftype) * MARGIN) + (1 << 20)


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
    need = estimate_bytes(synth, arch, dims, quant)
    check_space(path.parent, need, f"the synthetic {geometry} ({n_layer} layers, {quant})")
    if echo:
        from moecli.limits import fmt_gib

        echo(f"writing synthetic {geometry} ({n_layer} layers, {quant}, about {fmt_gib(need)}) to {path} (once)")
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        _write_watched(lambda step: synth.write_gguf(tmp, arch, dims, seed=seed, ftype=quant, progress=step), need,
                       progress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_watched(write: Callable[[Callable[[int], None]], None], total: int, show: bool) -> None:
    """Run `write(step)` on a thread while a Rich bar (stderr) advances by the bytes it reports through `step`."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    failure: list[BaseException] = []
    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (show and console.is_terminal))
    with bar:
        task = bar.add_task("writing weights", total=total)

        def run():
            try:
                write(lambda n: bar.update(task, advance=n))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failure.append(e)

        worker = threading.Thread(target=run, daemon=True)  # daemon: Ctrl-C ends the process, not a stuck write
        worker.start()
        while worker.is_alive():
            worker.join(POLL_S)
    if failure:
        raise failure[0]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
