"""Shared pieces of the benchmark scripts (launch/bench_*.py): machine and version info, interleaved timing with
medians, and writing `results/bench/<name>.md|json` with the machine, the versions and the exact command.

Benchmarks compare variants measured in one process, interleaved (the order rotates every repeat), so a slow spell
of a shared machine hits every variant alike; the median of the repeats is what gets reported.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch

from hwtools.device import usable_cores

VERSIONED_PACKAGES = ("torch", "torchvision", "transformers", "timm", "accelerate", "peft", "datasets",
                      "bitsandbytes")


# ---------------------------------------------------------------------------------------------- machine / versions


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, Optional[str]]:
    """Installed version of each package (None when it is not installed)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: "torch.device | str | None" = None) -> dict:
    """What the numbers were measured on: OS, CPU, cores, RAM, torch threads, load average, and the GPU if any."""
    import psutil

    usable = usable_cores()
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_cores_logical": os.cpu_count(),
            "cpu_cores_usable": usable, "torch_threads": torch.get_num_threads(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_average_1m": load_average(),
            "device": str(device) if device is not None else None, "gpu": None, "gpu_memory_gb": None,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        props = torch.cuda.get_device_properties(index or 0)
        info["gpu"], info["gpu_memory_gb"] = props.name, round(props.total_memory / 2**30, 1)
    return info


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): above the core count, others shared the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def command_line() -> str:
    """The exact command this process was started with, interpreter included, quoted for a shell."""
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)


def set_threads(n: int) -> int:
    """Use n torch threads (0 keeps torch's default, one per core); -> the count in use. On a CPU that other
    processes share, one thread avoids threads of one op waiting on each other for a time slice."""
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else is taken as a torch device string."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ---------------------------------------------------------------------------------------------------------- timing


def synchronize(device: "torch.device | str | None") -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Run(NamedTuple):
    """One timed call: wall seconds, CPU seconds of this process (all its threads) and what the function returned.

    With one torch thread the CPU seconds are the work itself, barely touched by other processes on a shared
    machine; with several they also count the threads' spin-waiting."""

    seconds: float
    cpu_seconds: float
    value: Any


def timed(fn: Callable[[], Any], device=None) -> Run:
    """Call fn once and time it (wall and process CPU time), synchronising the device before and after."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    value = fn()
    synchronize(device)
    return Run(time.perf_counter() - start, time.process_time() - cpu_start, value)


def interleaved_runs(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device=None, warmup_fns: Optional[Mapping[str, Callable[[], Any]]] = None
                     ) -> dict[str, list[Run]]:
    """Call every fn `warmup` times untimed (or the cheaper `warmup_fns` instead), then `repeats` times each,
    interleaved: repeat r starts at variant r mod n, so no variant always runs first (cold caches) or last.
    -> {name: [Run per repeat]}."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            (warmup_fns or fns)[name]()
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for r in range(repeats):
        for name in order_for_repeat(names, r):
            runs[name].append(timed(fns[name], device))
    return runs


def order_for_repeat(names: Sequence[str], r: int) -> list[str]:
    """The variants rotated by r: [a, b, c] -> [b, c, a] for r = 1."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def summarize(values: Sequence[float]) -> dict:
    """Median, min, max and every value (the spread shows how noisy the machine was)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def rate(items: float, seconds: float) -> float:
    """items per second (inf for a zero duration, so a ratio never divides by zero)."""
    return items / seconds if seconds > 0 else math.inf


def peak_cuda_memory_mb(device) -> Optional[float]:
    """torch.cuda.max_memory_allocated in MiB since the last reset (None on CPU)."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak_memory(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Window:
    """A timed window, opened by the first start() (later calls do nothing) and closed once by stop(), the device
    synchronised at both ends: wall seconds, and CPU seconds of this process (on a CPU shared with other jobs the
    wall clock also counts time spent waiting for a core, CPU time mostly does not)."""

    def __init__(self, device):
        self.device = device
        self.wall = self.cpu = None

    def start(self) -> None:
        if self.wall is None:
            synchronize(self.device)
            self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        synchronize(self.device)  # only ever called once, at the very end: no sync inside the run
        return {"seconds": time.perf_counter() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


def current_rss_mb() -> float:
    """This process's resident set size in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_while(fn: Callable[[], dict], interval_s: float = 0.005) -> tuple[dict, float, float]:
    """Run fn while a thread samples this process's RSS -> (fn's value, RSS before, peak RSS seen) in MiB.
    Sampled rather than ru_maxrss: the kernel's high-water mark is only updated now and then, and covers the
    whole process life, not this run."""
    import threading

    before = current_rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(interval_s):
            peak[0] = max(peak[0], current_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = fn()
    finally:
        done.set()
        sampler.join()
    return value, before, max(peak[0], current_rss_mb())


def free_device_memory(device) -> None:
    """Collect garbage and hand cached CUDA blocks back, then restart the peak counters: the next measurement
    starts from what is really still allocated."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def busy_cpu_notes(machine: dict, unit: str) -> list[str]:
    """The results note for a CPU that other jobs loaded as the benchmark started (load average above 0.8 per
    usable core: absolute `unit` figures are pessimistic, the interleaved ratios still hold); [] otherwise."""
    load, cores = machine.get("load_average_1m"), machine.get("cpu_cores_usable") or 1
    if load is None or load <= 0.8 * cores:
        return []
    return [f"The CPU was shared with other jobs: load average {load} on {cores} cores at the start. Absolute {unit} "
            f"are pessimistic and noisy; ratios come from interleaved runs (every repeat runs every variant, in a "
            f"rotating order) and are the figures to read."]


# ---------------------------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits (or more before the point)."""
    def cell(v):
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(output_dir: "str | os.PathLike", name: str, title: str, results: dict, body_md: str,
                  settings: Optional[dict] = None, notes: Sequence[str] = (), machine: Optional[dict] = None,
                  started_at: Optional[float] = None) -> tuple[Path, Path]:
    """Write `<output_dir>/<name>.json` (machine, versions, command, settings, results, notes) and `<name>.md`
    (the same header, then `body_md`); -> (md path, json path)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine or machine_info()
    machine = {**machine, "load_average_1m_end": load_average()}
    versions = library_versions()
    command = command_line()
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started_at or time.time()))
    payload = {"name": name, "title": title, "command": command, "started_at": when,
               "duration_s": None if started_at is None else round(time.time() - started_at, 1),
               "machine": machine, "versions": versions, "settings": settings or {}, "results": results,
               "notes": list(notes)}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")

    gpu = f"{machine['gpu']} ({machine['gpu_memory_gb']} GiB, CUDA {machine['cuda']})" if machine.get("gpu") \
        else "none"
    lines = [f"# {title}", "", "Command:", "", "```", command, "```", "",
             f"Measured {when}" + (f" in {payload['duration_s']} s" if payload["duration_s"] is not None else "")
             + f" on device `{machine.get('device')}`.", "",
             markdown_table(["machine", ""], [
                 ["CPU", f"{machine['cpu']}, {machine['cpu_cores_usable']} usable cores "
                         f"({machine['cpu_cores_logical']} logical), torch threads {machine['torch_threads']}"],
                 ["RAM", f"{machine['ram_gb']} GiB"],
                 ["GPU", gpu],
                 ["load average (1 min)", f"{machine.get('load_average_1m')} at start, "
                                          f"{machine.get('load_average_1m_end')} at end"],
                 ["OS", machine["platform"]]]),
             "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += [body_md.rstrip(), ""]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return md_path, json_path


def _json_default(obj):
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
