"""Monitor: phase times, host memory and CPU, NVML values, the schema; no wall-clock bounds.

Time and the process's readings come from stand-ins (a clock that moves only when the test moves
it, a process with scripted readings, a stand-in pynvml), so every value is computed exactly from
them; one test reads the real process to check an allocation shows in the RSS.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

import numpy as np
import psutil
import pytest

from harness.monitor import MIB, Monitor, fmt_measure, is_measured, measured, not_measured


class _Seq:
    """Returns the given values in order, then repeats the last one."""

    def __init__(self, values: Iterable[Any]) -> None:
        self.values = list(values)
        self.i = 0

    def __call__(self, *_: Any) -> Any:
        v = self.values[min(self.i, len(self.values) - 1)]
        self.i += 1
        return v


class FakeClock:
    """A clock (wall or CPU time) that moves only when the test moves it."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeProcess:
    """psutil.Process stand-in: scripted RSS (MiB) and cpu_percent readings, one per sample; CPU
    seconds as the test sets `cpu_s`. Each memory reading costs `read_s` of wall time and
    `read_cpu_s` of the sampler's CPU time (a sample's own cost); `after` runs on reading n."""

    def __init__(
        self,
        clock: FakeClock,
        thread_clock: FakeClock | None = None,
        rss_mib: Iterable[float] = (100.0,),
        cpu_percent: Iterable[float] = (0.0,),
        read_s: float = 0.0,
        read_cpu_s: float = 0.0,
        after: dict[int, Any] | None = None,
    ) -> None:
        self.clock, self.thread_clock = clock, thread_clock
        self.rss, self.percent = _Seq(rss_mib), _Seq(cpu_percent)
        self.read_s, self.read_cpu_s = read_s, read_cpu_s
        self.after = after or {}
        self.cpu_s = 0.0
        self.reads = 0

    def cpu_times(self) -> Any:
        return types.SimpleNamespace(user=self.cpu_s, system=0.0)

    def memory_info(self) -> Any:
        self.reads += 1
        self.clock.advance(self.read_s)
        if self.thread_clock is not None:
            self.thread_clock.advance(self.read_cpu_s)
        if self.reads in self.after:
            self.after[self.reads]()
        return types.SimpleNamespace(rss=int(self.rss() * MIB))

    def cpu_percent(self, interval: float | None = None) -> float:
        return float(self.percent())


def fake_monitor(**process: Any) -> tuple[Monitor, FakeClock, FakeProcess]:
    """A Monitor on a fake clock and process; its sampler thread never samples (1 h interval):
    the samples are the one at enter, the one at exit and those the test takes."""
    clock, thread_clock = FakeClock(), FakeClock()
    proc = FakeProcess(clock, thread_clock, **process)
    mon = Monitor(interval_s=3600, clock=clock, thread_clock=thread_clock, process=proc)
    return mon, clock, proc


def make_fake_nvml(
    *,
    count: int = 1,
    used: int = 2 * 1048576 * 1024,
    total: int = 80 * 1048576 * 1024,
    util: Iterable[int] = (50,),
    power_mw: Iterable[int] = (150000,),
    energy_mj: Iterable[int] | None = (1_000_000, 1_250_000),
    procs: list[tuple[int, int | None]] | None = None,
) -> types.ModuleType:
    """A pynvml stand-in with the calls Monitor and provenance make."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's naming
        pass

    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.calls = []  # type: ignore[attr-defined]
    m.nvmlInit = lambda: m.calls.append("init")  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: m.calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: b"Fake GPU 80GB"  # type: ignore[attr-defined]
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(total=total, used=used, free=total - used)
    )
    util_seq = _Seq(util)
    m.nvmlDeviceGetUtilizationRates = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(gpu=util_seq(), memory=0)
    )
    m.nvmlDeviceGetPowerUsage = _Seq(power_mw)  # type: ignore[attr-defined]
    if energy_mj is None:

        def no_energy(h: Any) -> int:
            raise NVMLError_NotSupported()

        m.nvmlDeviceGetTotalEnergyConsumption = no_energy  # type: ignore[attr-defined]
    else:
        m.nvmlDeviceGetTotalEnergyConsumption = _Seq(energy_mj)  # type: ignore[attr-defined]
    proc_list = [types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in (procs or [])]
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: proc_list  # type: ignore[attr-defined]
    return m


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in pynvml built with the given options; returns the module."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(**kwargs: Any) -> types.ModuleType:
        fake = make_fake_nvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


# -- phases, epochs, throughput ------------------------------------------------------------


def test_phase_times_add_up_to_total() -> None:
    mon, clock, _ = fake_monitor()
    with mon:
        clock.advance(0.125)  # before the first phase: unphased
        for name, seconds in (("data", 0.5), ("build", 0.25), ("train", 2.0), ("predict", 0.375)):
            with mon.phase(name):
                clock.advance(seconds)
        clock.advance(0.0625)
    s = mon.summary()
    assert s["phases_s"] == {"data": 0.5, "build": 0.25, "train": 2.0, "predict": 0.375}
    assert list(s["phases_s"]) == ["data", "build", "train", "predict"]
    assert s["wall_s"] == 3.3125
    assert s["unphased_s"] == 0.1875


def test_repeated_phases_add_and_nested_phases_count_once() -> None:
    mon, clock, _ = fake_monitor()
    with mon:
        for _ in range(3):
            with mon.phase("train"):
                clock.advance(0.25)
        mon.record_subphase("first_step", 0.0625)  # timed inside "train" by the backend
        with mon.phase("predict"):
            clock.advance(0.125)
            with mon.phase("predict_batch"):
                clock.advance(0.5)
        clock.advance(0.125)
    s = mon.summary()
    assert s["phases_s"] == {"train": 0.75, "first_step": 0.0625, "predict": 0.625,
                             "predict_batch": 0.5}
    assert s["wall_s"] == 1.5
    assert s["unphased_s"] == 0.125  # wall minus the top-level phases train and predict


def test_phase_time_recorded_when_the_body_raises() -> None:
    mon, clock, _ = fake_monitor()
    with pytest.raises(ValueError, match="boom"):
        with mon:
            with mon.phase("train"):
                clock.advance(0.25)
                raise ValueError("boom")
    s = mon.summary()
    assert (s["phases_s"], s["wall_s"], s["unphased_s"]) == ({"train": 0.25}, 0.25, 0.0)


def test_epochs_and_throughput() -> None:
    mon = Monitor(interval_s=1.0)
    with mon:
        mon.record_epoch(epoch=1, seconds=12.5, images=9000, loss=0.5)
        mon.record_throughput("train", images=9000, seconds=12.0)
    s = mon.summary()
    assert s["epochs"] == [
        {"epoch": 1, "seconds": 12.5, "images": 9000, "images_per_s": 720.0, "loss": 0.5}
    ]
    assert s["throughput"]["train"] == {
        "value": 750.0,
        "unit": "images/s",
        "images": 9000,
        "seconds": 12.0,
    }
    assert s["throughput"]["inference"] == {"value": None, "reason": "not recorded"}


def test_zero_seconds_throughput_is_not_measured_not_infinite() -> None:
    mon = Monitor(interval_s=1.0)
    with mon:
        mon.record_throughput("inference", images=100, seconds=0.0)
    m = mon.summary()["throughput"]["inference"]
    assert m["value"] is None and "invalid span" in m["reason"]


def test_monitor_is_single_use_and_summary_needs_a_span() -> None:
    mon = Monitor()
    with pytest.raises(RuntimeError, match="before the monitor was entered"):
        mon.summary()
    with mon:
        pass
    with pytest.raises(RuntimeError, match="one span"):
        mon.__enter__()
    with pytest.raises(ValueError, match="interval_s must be > 0; got 0"):
        Monitor(interval_s=0)


# -- host ------------------------------------------------------------------------------------


def _rss_peak(allocate_bytes: int) -> float:
    """Peak RSS of this (real) process over a span, sampled once while `allocate_bytes` live."""
    mon = Monitor(interval_s=3600)
    with mon:
        a = np.ones(allocate_bytes // 8, dtype=np.float64)  # ones() touches every page
        mon.sample()
        del a
    s = mon.summary()
    assert s["monitor"]["samples"] == 3  # enter, the one above, exit
    assert s["host"]["rss_peak"]["unit"] == "MiB"
    return float(s["host"]["rss_peak"]["value"])


def test_rss_peak_rises_by_a_known_allocation() -> None:
    size = 200 * 1000 * 1000
    base = _rss_peak(8)
    peak = _rss_peak(size)
    assert peak - base >= 0.8 * size / MIB


def test_host_values_are_computed_from_the_readings() -> None:
    mon, clock, proc = fake_monitor(rss_mib=[100, 300, 200], cpu_percent=[0.0, 50.0, 150.0])
    with mon:  # enter: rss 100 MiB; psutil's first cpu_percent only sets its reference point
        clock.advance(0.5)
        proc.cpu_s = 0.25
        mon.sample()  # rss 300, cpu 50%
        clock.advance(0.5)
        proc.cpu_s = 0.75
    host = mon.summary()["host"]  # exit: rss 200, cpu 150%
    assert host["rss_peak"] == {"value": 300.0, "unit": "MiB"}
    assert host["rss_mean"] == {"value": 200.0, "unit": "MiB"}
    assert host["cpu_percent_mean"] == {  # 0.75 s of CPU in 1 s of wall time
        "value": 75.0, "unit": "%", "method": "process CPU time / wall time; 100 = 1 core"}
    assert host["cpu_percent_peak"] == {
        "value": 150.0, "unit": "%", "method": "peak over sampler intervals; 100 = 1 core"}
    assert host["cpu_count_logical"] == psutil.cpu_count(logical=True)
    rusage = host["rss_peak_getrusage"]  # the real process's, from getrusage
    assert (rusage["unit"], rusage["method"]) == (
        "MiB", "getrusage ru_maxrss: peak since process start")
    assert rusage["value"] > 0


def test_host_values_before_a_second_sample_and_without_wall_time() -> None:
    mon, _, _ = fake_monitor()
    with mon:
        s = mon.summary()  # only the sample at enter, and the clock has not moved
    assert s["host"]["cpu_percent_peak"] == {"value": None, "reason": "fewer than 2 samples"}
    assert s["host"]["cpu_percent_mean"] == {"value": None, "reason": "zero wall time"}
    assert s["host"]["rss_peak"] == {"value": 100.0, "unit": "MiB"}
    assert (s["wall_s"], s["monitor"]["samples"], s["monitor"]["overhead_share"]) == (0.0, 1, None)


def test_summary_reports_its_own_sampling_cost() -> None:
    mon, clock, _ = fake_monitor(read_s=0.0625, read_cpu_s=0.03125)
    with mon:
        for _ in range(3):
            clock.advance(1.0)
            mon.sample()
    s = mon.summary()
    assert s["wall_s"] == 3.3125  # 3 s of work and 5 samples of 0.0625 s
    assert s["monitor"] == {
        "interval_s": 3600.0,
        "samples": 5,  # enter, 3 taken, exit
        "sampling_time_s": 0.3125,
        "sampling_cpu_s": 0.15625,
        "mean_sample_ms": 62.5,
        "overhead_share": 0.3125 / 3.3125,
    }


def test_sampler_thread_samples_until_exit() -> None:
    clock = FakeClock()
    third = threading.Event()
    proc = FakeProcess(clock, rss_mib=[100, 200, 300, 400], after={3: third.set})
    mon = Monitor(interval_s=0.001, clock=clock, process=proc)
    with mon:
        assert third.wait(timeout=60)  # the thread took samples 2 and 3 (a guard against hangs)
    s = mon.summary()
    assert s["monitor"]["samples"] == proc.reads >= 4  # every reading is one sample, exit too
    assert s["host"]["rss_peak"] == {"value": 400.0, "unit": "MiB"}
    assert "sampler_error" not in s["monitor"]


def test_a_failing_sampler_stops_and_the_run_goes_on() -> None:
    clock = FakeClock()
    failed = threading.Event()

    def fail() -> None:
        failed.set()
        raise RuntimeError("no /proc")

    proc = FakeProcess(clock, after={2: fail})  # the thread's first sample
    mon = Monitor(interval_s=0.001, clock=clock, process=proc)
    with mon:
        assert failed.wait(timeout=60)
    s = mon.summary()
    assert s["monitor"]["sampler_error"] == "RuntimeError: no /proc"
    assert s["monitor"]["samples"] == 2  # enter and exit; the failed one is not counted
    assert proc.reads == 3


# -- GPU -------------------------------------------------------------------------------------


@pytest.mark.skipif(_nvml_works(), reason="this machine has a working NVML")
def test_gpu_not_measured_without_nvidia_driver() -> None:
    mon, clock, _ = fake_monitor()
    with mon:
        clock.advance(0.5)
    s = mon.summary()
    assert set(s["gpu"]) >= {"memory_used_peak", "utilization_mean", "power_mean", "energy"}
    for key, m in s["gpu"].items():
        assert m["value"] is None, key
        assert "NVML" in m["reason"], key
    json.dumps(s, allow_nan=False)


def test_nvml_values_are_converted_exactly(fake_nvml) -> None:
    fake = fake_nvml(
        util=[50, 90, 100, 70, 85],
        power_mw=[100000, 150000, 200000, 150000, 100000],
        procs=[(os.getpid() + 1, 1 * MIB), (os.getpid(), 512 * MIB)],
    )
    mon = Monitor(interval_s=3600)  # no thread samples: enter + 3 explicit + exit = 5
    with mon:
        for _ in range(3):
            mon.sample()
    gpu = mon.summary()["gpu"]
    assert gpu["index"] == 0
    assert gpu["name"] == "Fake GPU 80GB"
    assert gpu["memory_total"] == {"value": 81920.0, "unit": "MiB"}
    assert gpu["memory_used_peak"] == {"value": 2048.0, "unit": "MiB"}
    assert gpu["memory_used_mean"] == {"value": 2048.0, "unit": "MiB"}
    assert gpu["utilization_mean"] == {"value": 79.0, "unit": "%"}
    assert gpu["utilization_above_80_share"]["value"] == 0.6  # 90, 100, 85 of 5
    assert gpu["power_mean"] == {"value": 140.0, "unit": "W"}
    assert gpu["power_peak"] == {"value": 200.0, "unit": "W"}
    assert gpu["energy"] == {"value": 250.0, "unit": "J", "method": "NVML energy counter delta"}
    assert gpu["process_memory_peak"]["value"] == 512.0
    assert gpu["process_memory_peak"]["unit"] == "MiB"
    assert fake.calls == ["init", "shutdown"]


def test_nvml_constant_power_reads_exact_watts(fake_nvml) -> None:
    fake_nvml(power_mw=[150000])
    mon, clock, _ = fake_monitor()
    with mon:
        for _ in range(4):
            clock.advance(0.25)
            mon.sample()
    gpu = mon.summary()["gpu"]
    assert gpu["power_mean"] == {"value": 150.0, "unit": "W"}
    assert gpu["power_peak"] == {"value": 150.0, "unit": "W"}
    assert gpu["utilization_above_80_share"] == {
        "value": 0.0, "unit": "fraction", "method": "share of samples > 80%"}


def test_nvml_pid_mismatch_is_not_measured(fake_nvml) -> None:
    fake_nvml(procs=[(os.getpid() + 1, 100 * MIB)])
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    m = mon.summary()["gpu"]["process_memory_peak"]
    assert m == {"value": None, "reason": "process ids do not match (container?)"}


def test_nvml_no_processes_and_unavailable_process_memory(fake_nvml) -> None:
    fake_nvml(procs=[])
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    assert mon.summary()["gpu"]["process_memory_peak"]["reason"] == (
        "no compute process listed on the GPU"
    )
    fake_nvml(procs=[(os.getpid(), None)])
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    assert "usedGpuMemory unavailable" in mon.summary()["gpu"]["process_memory_peak"]["reason"]


def test_energy_integrated_from_power_when_counter_unsupported(fake_nvml) -> None:
    fake_nvml(energy_mj=None, power_mw=[100000, 200000, 100000])
    mon, clock, _ = fake_monitor()
    with mon:  # samples at t = 0, 0.5 and 1.0 s: 100, 200 and 100 W
        clock.advance(0.5)
        mon.sample()
        clock.advance(0.5)
    energy = mon.summary()["gpu"]["energy"]
    assert energy == {  # trapezoids: (100 + 200) / 2 * 0.5 + (200 + 100) / 2 * 0.5
        "value": 150.0,
        "unit": "J",
        "method": "integrated from power samples (trapezoid rule); energy counter: "
                  "nvmlDeviceGetTotalEnergyConsumption: NVMLError_NotSupported",
    }


def test_gpu_index_out_of_range_and_hidden_gpus(fake_nvml, monkeypatch) -> None:
    fake_nvml(count=1)
    mon = Monitor(gpu_index=3, interval_s=3600)
    with mon:
        pass
    assert mon.summary()["gpu"]["energy"]["reason"] == "GPU index 3 not found (NVML sees 1 devices)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    reason = mon.summary()["gpu"]["power_mean"]["reason"]
    assert reason == "no GPU visible (CUDA_VISIBLE_DEVICES='')"
    fake_nvml(count=0)
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    assert "no GPU visible" in mon.summary()["gpu"]["name"]["reason"]


def test_cuda_visible_devices_picks_the_nvml_index(fake_nvml, monkeypatch) -> None:
    fake_nvml(count=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    assert mon.summary()["gpu"]["index"] == 2


def test_nvml_call_that_fails_is_not_measured_with_its_name(fake_nvml) -> None:
    fake = fake_nvml()

    def unsupported(h: Any) -> int:
        raise fake.NVMLError()

    fake.nvmlDeviceGetPowerUsage = unsupported
    fake.nvmlDeviceGetTotalEnergyConsumption = unsupported
    mon = Monitor(interval_s=3600)
    with mon:
        pass
    gpu = mon.summary()["gpu"]
    assert gpu["power_mean"] == {"value": None, "reason": "nvmlDeviceGetPowerUsage: NVMLError"}
    assert gpu["energy"]["value"] is None
    assert "nvmlDeviceGetTotalEnergyConsumption: NVMLError" in gpu["energy"]["reason"]
    assert gpu["memory_used_peak"]["value"] == 2048.0


# -- framework memory, formatting, JSON ----------------------------------------------------


def test_framework_memory_bytes_become_mib() -> None:
    mon = Monitor(interval_s=1.0)
    with mon:
        pass
    assert mon.summary()["framework_memory"]["peak"]["value"] is None
    mon.set_framework_memory(
        {
            "torch_max_memory_allocated_bytes": 3 * MIB // 2,
            "torch_max_memory_reserved_bytes": None,
            "device": "cuda:0",
        }
    )
    fm = mon.summary()["framework_memory"]
    assert fm["torch_max_memory_allocated"] == {"value": 1.5, "unit": "MiB"}
    assert fm["torch_max_memory_reserved"] == {"value": None, "reason": "backend returned no value"}
    assert fm["device"] == {"value": "cuda:0", "unit": ""}
    mon.set_framework_memory({}, reason="CPU run")
    assert mon.summary()["framework_memory"] == {"peak": {"value": None, "reason": "CPU run"}}


def test_fmt_measure_renders_both_cases() -> None:
    assert fmt_measure({"value": 1234.5, "unit": "MiB"}) == "1234.5 MiB"
    assert fmt_measure(measured(150.0, "W")) == "150.0 W"
    assert fmt_measure(measured(79.04, "%")) == "79.0%"
    assert fmt_measure(measured(0.625, "fraction"), digits=2) == "0.62 fraction"
    assert fmt_measure(measured(3, "images")) == "3 images"
    assert fmt_measure(not_measured("no GPU visible")) == "not measured (no GPU visible)"
    assert is_measured(measured(0.0, "J")) and not is_measured(not_measured("x"))


def test_summary_is_json_serializable(fake_nvml) -> None:
    fake_nvml(procs=[(os.getpid(), MIB)])
    mon, clock, _ = fake_monitor()
    with mon:
        with mon.phase("train"):
            clock.advance(0.25)
        mon.sample()
        mon.record_epoch(1, 0.25, images=10)
        mon.set_framework_memory({"tf_peak_bytes": 10 * MIB})
    s = mon.summary()
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    assert set(s) == {
        "schema",
        "wall_s",
        "phases_s",
        "unphased_s",
        "epochs",
        "throughput",
        "host",
        "gpu",
        "framework_memory",
        "monitor",
    }
