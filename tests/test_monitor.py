"""Monitor: phase times, host memory, NVML values through a stand-in pynvml, the schema."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from collections.abc import Iterable
from typing import Any

import numpy as np
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
    mon = Monitor(interval_s=0.05)
    with mon:
        for name, seconds in (("data", 0.10), ("build", 0.05), ("train", 0.20), ("predict", 0.08)):
            with mon.phase(name):
                time.sleep(seconds)
    s = mon.summary()
    phases = s["phases_s"]
    assert list(phases) == ["data", "build", "train", "predict"]
    for name, seconds in (("data", 0.10), ("build", 0.05), ("train", 0.20), ("predict", 0.08)):
        assert seconds <= phases[name] < seconds + 0.05
    total = sum(phases.values())
    assert abs(s["wall_s"] - total) <= max(0.05 * s["wall_s"], 0.02)
    assert s["unphased_s"] == pytest.approx(s["wall_s"] - total)


def test_repeated_phases_add_and_nested_phases_count_once() -> None:
    mon = Monitor(interval_s=1.0)
    with mon:
        for _ in range(3):
            with mon.phase("train"):
                time.sleep(0.02)
        with mon.phase("predict"):
            with mon.phase("predict_batch"):
                time.sleep(0.03)
    s = mon.summary()
    assert 0.06 <= s["phases_s"]["train"] < 0.1
    assert s["phases_s"]["predict_batch"] <= s["phases_s"]["predict"]
    top = s["phases_s"]["train"] + s["phases_s"]["predict"]
    assert s["unphased_s"] == pytest.approx(s["wall_s"] - top)
    assert 0 <= s["unphased_s"] < 0.02


def test_phase_time_recorded_when_the_body_raises() -> None:
    mon = Monitor(interval_s=1.0)
    with pytest.raises(ValueError):
        with mon:
            with mon.phase("train"):
                time.sleep(0.01)
                raise ValueError("boom")
    assert mon.summary()["phases_s"]["train"] >= 0.01


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
    mon = Monitor(interval_s=0.01)
    with mon:
        if allocate_bytes:
            a = np.ones(allocate_bytes // 8, dtype=np.float64)  # ones() touches every page
            time.sleep(0.1)
            del a
        else:
            time.sleep(0.1)
    s = mon.summary()
    assert s["monitor"]["samples"] >= 5
    return float(s["host"]["rss_peak"]["value"])


def test_rss_peak_rises_by_a_known_allocation() -> None:
    size = 200 * 1000 * 1000
    base = _rss_peak(0)
    peak = _rss_peak(size)
    assert peak - base >= 0.8 * size / MIB


def test_host_entries_are_measured() -> None:
    mon = Monitor(interval_s=0.02)
    with mon:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:  # busy: CPU percent should be near one core
            pass
    host = mon.summary()["host"]
    assert host["rss_peak"]["unit"] == "MiB"
    assert host["rss_peak"]["value"] >= host["rss_mean"]["value"] > 0
    assert host["rss_peak_getrusage"]["value"] >= host["rss_peak"]["value"] * 0.9
    assert 50 < host["cpu_percent_mean"]["value"] <= 100 * host["cpu_count_logical"]
    assert host["cpu_percent_peak"]["value"] > 0


def test_summary_reports_its_own_sampling_cost() -> None:
    mon = Monitor(interval_s=0.02)
    with mon:
        time.sleep(0.2)
    m = mon.summary()["monitor"]
    # A sample at enter, one at exit, and about one per interval in between.
    assert 6 <= m["samples"] <= 13
    assert 0 < m["sampling_time_s"] < 0.05
    assert m["mean_sample_ms"] == pytest.approx(1000 * m["sampling_time_s"] / m["samples"])
    assert m["overhead_share"] < 0.05
    assert m["interval_s"] == 0.02


# -- GPU -------------------------------------------------------------------------------------


@pytest.mark.skipif(_nvml_works(), reason="this machine has a working NVML")
def test_gpu_not_measured_without_nvidia_driver() -> None:
    mon = Monitor(interval_s=0.05)
    with mon:
        time.sleep(0.06)
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
    mon = Monitor(interval_s=0.01)
    with mon:
        time.sleep(0.05)
    gpu = mon.summary()["gpu"]
    assert gpu["power_mean"]["value"] == 150.0
    assert gpu["power_peak"]["value"] == 150.0
    assert gpu["utilization_above_80_share"]["value"] == 0.0


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
    fake_nvml(energy_mj=None, power_mw=[150000])
    mon = Monitor(interval_s=0.02)
    with mon:
        time.sleep(0.3)
    s = mon.summary()
    energy = s["gpu"]["energy"]
    assert energy["unit"] == "J"
    assert "integrated" in energy["method"]
    assert "NVMLError_NotSupported" in energy["method"]
    # Constant 150 W over the span between the first and last sample (about wall_s).
    assert energy["value"] == pytest.approx(150.0 * s["wall_s"], rel=0.05)


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
    mon = Monitor(interval_s=0.01)
    with mon:
        with mon.phase("train"):
            time.sleep(0.03)
        mon.record_epoch(1, 0.03, images=10)
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
