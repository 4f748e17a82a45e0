"""Measure one training run: phase wall times, throughput, host memory/CPU, GPU via NVML.

Used inside the worker subprocess, one Monitor per run:

    mon = Monitor(gpu_index=None, interval_s=0.2)   # None: first visible GPU if NVML works
    with mon:                                       # starts/stops the sampler thread
        with mon.phase("train"): ...
        mon.record_epoch(epoch=1, seconds=12.3, images=9000)
        mon.record_throughput("train", images=9000, seconds=11.1)
        mon.set_framework_memory({"torch_max_memory_allocated_bytes": 123456789})
    summary = mon.summary()                         # JSON-serializable dict

Schema of a measure (one rule everywhere, also in harness.provenance):

    measured:      {"value": 2048.0, "unit": "MiB"}            (may carry "method": "...")
    not measured:  {"value": None, "reason": "NVML not available: NVMLError_LibraryNotFound"}

A value that could not be measured is never 0. Units: MiB (1 MiB = 1048576 bytes), W, J, %,
"fraction" (0..1), s, images/s. `fmt_measure` renders a measure for the report.

`summary()` returns (example from a GPU run, abbreviated):

    {"schema": 1,
     "wall_s": 61.2,                                 # __enter__ to __exit__
     "phases_s": {"data": 1.1, "build": 0.4, "first_step": 2.0, "train": 55.0, "predict": 2.6},
     "unphased_s": 0.1,                              # wall_s minus the top-level phases
     "epochs": [{"epoch": 1, "seconds": 12.3, "images": 9000, "images_per_s": 731.7}],
     "throughput": {"train": {"value": 810.8, "unit": "images/s", "images": 45000,
                              "seconds": 55.5},
                    "inference": {"value": None, "reason": "not recorded"}},
     "host": {"rss_peak": {"value": 2310.2, "unit": "MiB"},
              "rss_mean": {"value": 2201.7, "unit": "MiB"},
              "rss_peak_getrusage": {"value": 2312.0, "unit": "MiB", "method": "..."},
              "cpu_percent_mean": {"value": 97.5, "unit": "%", "method": "..."},
              "cpu_percent_peak": {"value": 130.0, "unit": "%", "method": "..."},
              "cpu_count_logical": 16},
     "gpu": {"index": 0, "name": "NVIDIA H100 80GB HBM3",
             "memory_total": {"value": 81559.0, "unit": "MiB"},
             "memory_used_peak": ..., "memory_used_mean": ..., "process_memory_peak": ...,
             "utilization_mean": {"value": 71.3, "unit": "%"},
             "utilization_above_80_share": {"value": 0.62, "unit": "fraction"},
             "power_mean": {"value": 310.4, "unit": "W"}, "power_peak": ...,
             "energy": {"value": 18950.1, "unit": "J", "method": "NVML energy counter delta"}},
     "framework_memory": {"torch_max_memory_allocated": {"value": 117.7, "unit": "MiB"}},
     "monitor": {"interval_s": 0.2, "samples": 306, "sampling_time_s": 0.05,
                 "sampling_cpu_s": 0.04, "mean_sample_ms": 0.16, "overhead_share": 0.0008}}

Without a GPU every "gpu" entry (name and index included) is a not-measured measure with the
same reason; `framework_memory` is {"peak": <not measured>} when the backend reports nothing.

Where the readings come from is injectable, so tests compute exact expected values: `clock`
(wall time, time.perf_counter), `thread_clock` (the sampler's CPU time, time.thread_time) and
`process` (cpu_times, memory_info, cpu_percent: a psutil.Process of this process by default).
NVML is the `pynvml` module, imported when the monitor is entered.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol

import psutil

MIB = 1048576
SCHEMA_VERSION = 1
UTILIZATION_BUSY_PERCENT = 80.0

Measure = dict[str, Any]
Clock = Callable[[], float]


class ProcessReadings(Protocol):
    """What the monitor reads of its process (the part of psutil.Process it uses)."""

    def cpu_times(self) -> Any: ...  # .user and .system, in seconds
    def memory_info(self) -> Any: ...  # .rss, in bytes
    def cpu_percent(self, interval: float | None = None) -> float: ...


def measured(value: float, unit: str, method: str | None = None) -> Measure:
    """A measured value with its unit (and how it was obtained, when that matters)."""
    m: Measure = {"value": value, "unit": unit}
    if method:
        m["method"] = method
    return m


def not_measured(reason: str) -> Measure:
    """A value that could not be measured, with the reason why."""
    return {"value": None, "reason": reason}


def is_measured(m: Any) -> bool:
    """True unless `m` is a not-measured measure."""
    return not (isinstance(m, dict) and m.get("value") is None and "reason" in m)


def fmt_measure(m: Any, digits: int = 1) -> str:
    """Render a measure: '1234.5 MiB', '0.62 fraction', or 'not measured (reason)'."""
    if not isinstance(m, dict) or "value" not in m:
        return str(m)
    if m["value"] is None:
        return f"not measured ({m.get('reason', 'no reason given')})"
    value = m["value"]
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    unit = m.get("unit")
    if unit == "%":
        return f"{text}%"
    return f"{text} {unit}" if unit else text


class _Agg:
    """Running count/sum/peak so long runs keep constant memory."""

    __slots__ = ("n", "total", "peak", "above")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.peak = float("-inf")
        self.above = 0

    def add(self, x: float, threshold: float | None = None) -> None:
        self.n += 1
        self.total += x
        if x > self.peak:
            self.peak = x
        if threshold is not None and x > threshold:
            self.above += 1

    @property
    def mean(self) -> float:
        return self.total / self.n


def _nvml_reason(exc: BaseException) -> str:
    return f"NVML not available: {type(exc).__name__}"


def _visible_gpu(nvml: Any) -> tuple[Any, int] | str:
    """Handle and NVML index of the first GPU visible to this process, or a reason."""
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        return "no GPU visible (NVML sees 0 devices)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return nvml.nvmlDeviceGetHandleByIndex(0), 0
    first = visible.split(",")[0].strip()
    if first in ("", "-1", "NoDevFiles"):
        return f"no GPU visible (CUDA_VISIBLE_DEVICES={visible!r})"
    if first.isdigit():
        # NVML enumerates in PCI bus order; CUDA does too when CUDA_DEVICE_ORDER=PCI_BUS_ID,
        # and on single-model machines the two orders agree.
        index = int(first)
        if index >= count:
            return f"CUDA_VISIBLE_DEVICES={visible!r} names GPU {index}; NVML sees {count}"
        return nvml.nvmlDeviceGetHandleByIndex(index), index
    handle = nvml.nvmlDeviceGetHandleByUUID(first)
    for index in range(count):
        uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index))
        if (uuid.decode() if isinstance(uuid, bytes) else uuid) == first:
            return handle, index
    return handle, -1


class _Gpu:
    """NVML state for one device: per-metric readers that switch off on their first error."""

    def __init__(self, nvml: Any, handle: Any, index: int) -> None:
        self.nvml = nvml
        self.handle = handle
        self.index = index
        self.failed: dict[str, str] = {}
        name = nvml.nvmlDeviceGetName(handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        info = self.call("nvmlDeviceGetMemoryInfo")
        self.memory_total_bytes: int | None = None if info is None else int(info.total)
        self.mem = _Agg()
        self.util = _Agg()
        self.power = _Agg()
        self.proc_mem = _Agg()
        self.procs_listed = False
        self.pid_found = False
        self.proc_mem_unavailable = False
        self.energy_start_mj: int | None = None
        self.energy_end_mj: int | None = None
        self.energy_integrated_j = 0.0
        self.last_power: tuple[float, float] | None = None

    def call(self, fn: str) -> Any:
        """Call nvml.<fn>(handle); on NVMLError remember why and return None from now on."""
        if fn in self.failed:
            return None
        try:
            return getattr(self.nvml, fn)(self.handle)
        except self.nvml.NVMLError as exc:
            self.failed[fn] = f"{fn}: {type(exc).__name__}"
            return None

    def read_energy(self) -> int | None:
        return self.call("nvmlDeviceGetTotalEnergyConsumption")

    def sample(self, now: float, pid: int) -> None:
        info = self.call("nvmlDeviceGetMemoryInfo")
        if info is not None:
            self.mem.add(info.used / MIB)
        rates = self.call("nvmlDeviceGetUtilizationRates")
        if rates is not None:
            self.util.add(float(rates.gpu), UTILIZATION_BUSY_PERCENT)
        milliwatts = self.call("nvmlDeviceGetPowerUsage")
        if milliwatts is not None:
            watts = milliwatts / 1000.0
            self.power.add(watts)
            if self.last_power is not None:
                t0, w0 = self.last_power
                self.energy_integrated_j += (w0 + watts) / 2.0 * (now - t0)
            self.last_power = (now, watts)
        procs = self.call("nvmlDeviceGetComputeRunningProcesses")
        if procs:
            self.procs_listed = True
            for p in procs:
                if p.pid == pid:
                    self.pid_found = True
                    if p.usedGpuMemory is None:
                        self.proc_mem_unavailable = True
                    else:
                        self.proc_mem.add(p.usedGpuMemory / MIB)

    def _agg(self, agg: _Agg, fn: str, unit: str, stat: str) -> Measure:
        if fn in self.failed:
            return not_measured(self.failed[fn])
        if agg.n == 0:
            return not_measured("no samples")
        return measured(agg.peak if stat == "peak" else agg.mean, unit)

    def _process_memory(self) -> Measure:
        fn = "nvmlDeviceGetComputeRunningProcesses"
        if fn in self.failed:
            return not_measured(self.failed[fn])
        if self.proc_mem.n:
            return measured(self.proc_mem.peak, "MiB", "NVML per-process used memory, peak")
        if self.pid_found and self.proc_mem_unavailable:
            return not_measured("NVML reports no per-process memory (usedGpuMemory unavailable)")
        if self.procs_listed:
            return not_measured("process ids do not match (container?)")
        return not_measured("no compute process listed on the GPU")

    def _energy(self) -> Measure:
        start, end = self.energy_start_mj, self.energy_end_mj
        if start is not None and end is not None:
            return measured((end - start) / 1000.0, "J", "NVML energy counter delta")
        counter = self.failed.get("nvmlDeviceGetTotalEnergyConsumption", "counter not read")
        if self.power.n >= 2:
            return measured(
                self.energy_integrated_j,
                "J",
                f"integrated from power samples (trapezoid rule); energy counter: {counter}",
            )
        power = self.failed.get("nvmlDeviceGetPowerUsage", "fewer than 2 power samples")
        return not_measured(f"energy counter: {counter}; power: {power}")

    def summary(self) -> dict[str, Any]:
        util = self._agg(self.util, "nvmlDeviceGetUtilizationRates", "%", "mean")
        busy = (
            measured(self.util.above / self.util.n, "fraction", "share of samples > 80%")
            if is_measured(util)
            else util
        )
        total = self.memory_total_bytes
        return {
            "index": self.index,
            "name": self.name,
            "memory_total": (
                measured(total / MIB, "MiB")
                if total is not None
                else not_measured(self.failed["nvmlDeviceGetMemoryInfo"])
            ),
            "memory_used_peak": self._agg(self.mem, "nvmlDeviceGetMemoryInfo", "MiB", "peak"),
            "memory_used_mean": self._agg(self.mem, "nvmlDeviceGetMemoryInfo", "MiB", "mean"),
            "process_memory_peak": self._process_memory(),
            "utilization_mean": util,
            "utilization_above_80_share": busy,
            "power_mean": self._agg(self.power, "nvmlDeviceGetPowerUsage", "W", "mean"),
            "power_peak": self._agg(self.power, "nvmlDeviceGetPowerUsage", "W", "peak"),
            "energy": self._energy(),
        }


GPU_KEYS = (
    "index",
    "name",
    "memory_total",
    "memory_used_peak",
    "memory_used_mean",
    "process_memory_peak",
    "utilization_mean",
    "utilization_above_80_share",
    "power_mean",
    "power_peak",
    "energy",
)


def _ru_maxrss_mib() -> Measure:
    try:
        import resource
    except ImportError:
        return not_measured("resource module not available on this platform")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    mib = maxrss / MIB if sys.platform == "darwin" else maxrss / 1024.0
    return measured(mib, "MiB", "getrusage ru_maxrss: peak since process start")


class Monitor:
    """Phase timer plus a background sampler of host and GPU resources for one run."""

    def __init__(
        self,
        gpu_index: int | None = None,
        interval_s: float = 0.2,
        *,
        clock: Clock = time.perf_counter,
        thread_clock: Clock = time.thread_time,
        process: ProcessReadings | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"Monitor interval_s must be > 0; got {interval_s!r}")
        self.gpu_index = gpu_index
        self.interval_s = float(interval_s)
        self._clock = clock
        self._thread_clock = thread_clock
        self._pid = os.getpid()
        self._proc: ProcessReadings = process if process is not None else psutil.Process(self._pid)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._cpu_start: float | None = None
        self._cpu_end: float | None = None
        self._phases: dict[str, float] = {}
        self._top_level_s = 0.0
        self._depth = 0
        self._epochs: list[dict[str, Any]] = []
        self._throughput: dict[str, Measure] = {}
        self._framework: Measure | dict[str, Measure] = {
            "peak": not_measured("not reported by the backend")
        }
        self._rss = _Agg()
        self._cpu = _Agg()
        self._cpu_primed = False
        self._samples = 0
        self._sampling_s = 0.0
        self._sampling_cpu_s = 0.0
        self._sampler_error: str | None = None
        self._rusage: Measure | None = None
        self._gpu: _Gpu | None = None
        self._gpu_reason = "monitor not started"

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if self._t_start is not None:
            raise RuntimeError("a Monitor measures one span; create a new one per run")
        self._open_gpu()
        self._t_start = self._clock()
        self._cpu_start = self._cpu_seconds()
        if self._gpu is not None:
            self._gpu.energy_start_mj = self._gpu.read_energy()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="harness-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self._t_end = self._clock()
        self._cpu_end = self._cpu_seconds()
        self._rusage = _ru_maxrss_mib()
        if self._gpu is not None:
            if self._gpu.energy_start_mj is not None:
                self._gpu.energy_end_mj = self._gpu.read_energy()
            try:
                self._gpu.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutdown failure must not lose the run
                pass

    def _open_gpu(self) -> None:
        try:
            import pynvml
        except ImportError:
            self._gpu_reason = "NVML not available: pynvml (nvidia-ml-py) not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - any NVML failure means "not measured"
            self._gpu_reason = _nvml_reason(exc)
            return
        try:
            if self.gpu_index is None:
                found = _visible_gpu(pynvml)
            else:
                count = pynvml.nvmlDeviceGetCount()
                found = (
                    (pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index), self.gpu_index)
                    if 0 <= self.gpu_index < count
                    else f"GPU index {self.gpu_index} not found (NVML sees {count} devices)"
                )
            if isinstance(found, str):
                self._gpu_reason = found
            else:
                self._gpu = _Gpu(pynvml, *found)
                return
        except Exception as exc:  # noqa: BLE001
            self._gpu_reason = f"NVML error while opening the GPU: {type(exc).__name__}: {exc}"
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    def _cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - the run goes on without the sampler
                self._sampler_error = f"{type(exc).__name__}: {exc}"
                return

    def sample(self) -> None:
        """Take one sample now (the sampler thread calls this every interval_s)."""
        t0 = self._clock()
        c0 = self._thread_clock()
        rss = self._proc.memory_info().rss / MIB
        cpu = self._proc.cpu_percent(None)
        with self._lock:
            self._rss.add(rss)
            # psutil's first cpu_percent call only sets the reference point.
            if self._cpu_primed:
                self._cpu.add(cpu)
            self._cpu_primed = True
            if self._gpu is not None:
                self._gpu.sample(t0, self._pid)
            self._samples += 1
            self._sampling_s += self._clock() - t0
            self._sampling_cpu_s += self._thread_clock() - c0

    # -- recording -------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a named phase; repeated names add up, nested phases count once in unphased_s."""
        self._depth += 1
        t0 = self._clock()
        try:
            yield
        finally:
            dt = self._clock() - t0
            self._depth -= 1
            self._phases[name] = self._phases.get(name, 0.0) + dt
            if self._depth == 0:
                self._top_level_s += dt

    def record_subphase(self, name: str, seconds: float) -> None:
        """Add time measured elsewhere that lies inside a timed phase (e.g. the first training
        step, timed by the backend inside "train"); like a nested phase, it is not unphased."""
        self._phases[name] = self._phases.get(name, 0.0) + float(seconds)

    def record_epoch(
        self, epoch: int, seconds: float, images: int | None = None, **extra: Any
    ) -> None:
        """Record one epoch's wall time (and images seen, and any JSON-safe extras)."""
        rec: dict[str, Any] = {"epoch": int(epoch), "seconds": float(seconds)}
        if images is not None:
            rec["images"] = int(images)
            rec["images_per_s"] = images / seconds if seconds > 0 else None
        rec.update(extra)
        self._epochs.append(rec)

    def record_throughput(self, kind: str, images: int, seconds: float) -> None:
        """Record images/s for `kind` ("train" excludes the first step, or "inference")."""
        if seconds <= 0 or images <= 0:
            self._throughput[kind] = not_measured(f"invalid span: {images} images in {seconds} s")
            return
        m = measured(images / seconds, "images/s")
        m.update(images=int(images), seconds=float(seconds))
        self._throughput[kind] = m

    def set_framework_memory(
        self, stats: Mapping[str, Any] | None, reason: str | None = None
    ) -> None:
        """Store the backend's memory stats; keys ending in _bytes become MiB without the suffix."""
        if not stats:
            self._framework = {
                "peak": not_measured(reason or "backend reported no framework memory statistics")
            }
            return
        out: dict[str, Measure] = {}
        for key, value in stats.items():
            name = key[: -len("_bytes")] if key.endswith("_bytes") else key
            if value is None:
                out[name] = not_measured("backend returned no value")
            elif key.endswith("_bytes"):
                out[name] = measured(value / MIB, "MiB")
            elif isinstance(value, dict) and "value" in value:
                out[name] = dict(value)
            else:
                out[name] = {"value": value, "unit": ""}
        self._framework = out

    # -- result ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Everything measured so far, JSON-serializable (see the module docstring)."""
        if self._t_start is None:
            raise RuntimeError("Monitor.summary() before the monitor was entered (use `with`)")
        end = self._t_end if self._t_end is not None else self._clock()
        wall = end - self._t_start
        cpu_end = self._cpu_end if self._cpu_end is not None else self._cpu_seconds()
        cpu_start = self._cpu_start if self._cpu_start is not None else cpu_end
        with self._lock:
            host = self._host_summary(wall, cpu_end - cpu_start)
            gpu = self._gpu.summary() if self._gpu is not None else None
            samples, sampling_s, sampling_cpu_s = (
                self._samples,
                self._sampling_s,
                self._sampling_cpu_s,
            )
        if gpu is None:
            gpu = {key: not_measured(self._gpu_reason) for key in GPU_KEYS}
        throughput = {
            "train": not_measured("not recorded"),
            "inference": not_measured("not recorded"),
        }
        throughput.update(self._throughput)
        monitor: dict[str, Any] = {
            "interval_s": self.interval_s,
            "samples": samples,
            "sampling_time_s": sampling_s,
            "sampling_cpu_s": sampling_cpu_s,
            "mean_sample_ms": 1000.0 * sampling_s / samples if samples else None,
            "overhead_share": sampling_s / wall if wall > 0 else None,
        }
        if self._sampler_error:
            monitor["sampler_error"] = self._sampler_error
        return {
            "schema": SCHEMA_VERSION,
            "wall_s": wall,
            "phases_s": dict(self._phases),
            "unphased_s": wall - self._top_level_s,
            "epochs": [dict(e) for e in self._epochs],
            "throughput": throughput,
            "host": host,
            "gpu": gpu,
            "framework_memory": dict(self._framework),
            "monitor": monitor,
        }

    def _host_summary(self, wall: float, cpu_s: float) -> dict[str, Any]:
        rss = self._rss
        cpu = self._cpu
        ncpu = psutil.cpu_count(logical=True)
        return {
            "rss_peak": measured(rss.peak, "MiB") if rss.n else not_measured("no samples"),
            "rss_mean": measured(rss.mean, "MiB") if rss.n else not_measured("no samples"),
            "rss_peak_getrusage": self._rusage or _ru_maxrss_mib(),
            "cpu_percent_mean": (
                measured(100.0 * cpu_s / wall, "%", "process CPU time / wall time; 100 = 1 core")
                if wall > 0
                else not_measured("zero wall time")
            ),
            "cpu_percent_peak": (
                measured(cpu.peak, "%", "peak over sampler intervals; 100 = 1 core")
                if cpu.n
                else not_measured("fewer than 2 samples")
            ),
            "cpu_count_logical": ncpu,
        }
