"""The interval arithmetic of benchmarks/profile_step.py (device busy and idle time between step starts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_PATH = Path(__file__).parents[1] / "benchmarks" / "profile_step.py"
_spec = importlib.util.spec_from_file_location("profile_step", _PATH)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def test_busy_time_in_a_window_equals_the_covered_cells() -> None:
    """Random overlapping kernel intervals on integer times: busy time in any window is the number of unit cells that
    some interval covers."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        starts = rng.integers(0, 100, size=rng.integers(1, 30))
        spans = [(float(s), float(s + rng.integers(1, 15))) for s in starts]
        merged = profile_step.merge_intervals(spans)
        assert (np.diff(merged.ravel()) >= 0).all() and (merged[1:, 0] > merged[:-1, 1]).all()
        covered = np.zeros(130, dtype=bool)
        for s, e in spans:
            covered[int(s):int(e)] = True
        a, b = sorted(rng.integers(0, 130, size=2).tolist())
        assert profile_step.busy_between(merged, a, b) == covered[a:b].sum()


def test_largest_gaps_and_the_host_spans_inside_them() -> None:
    merged = profile_step.merge_intervals([(0, 2), (1, 3), (10, 11), (5, 6)])
    np.testing.assert_array_equal(merged, [[0, 3], [5, 6], [10, 11]])
    assert profile_step.largest_gaps(merged, 5) == [(6.0, 4.0), (3.0, 2.0)]
    host = [(5.5, 9.0, "host:plan_step"), (0.0, 1.0, "host:_decode"), (8.0, 12.0, "host:_forward")]
    assert profile_step.spans_during(host, 6.0, 10.0) == [("host:plan_step", 3.0), ("host:_forward", 2.0)]


def test_every_traced_host_function_exists() -> None:
    """A renamed engine function must not break the profiler's tracing on the GPU."""
    for cls, names in profile_step.TRACED.items():
        assert all(callable(getattr(cls, name, None)) for name in names), cls.__name__


def test_only_kernels_copies_and_memsets_count_as_device_work() -> None:
    """The device-side ranges of record_function labels span idle gaps: counting them hid most of the idle time."""
    def event(device: str, name: str, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(device_type=SimpleNamespace(name=device), name=name, is_user_annotation=annotation)

    assert profile_step.is_device_work(event("CUDA", "nvjet_sm90_tst_192x192"))
    assert profile_step.is_device_work(event("CUDA", "Memcpy HtoD (Pinned -> Device)"))
    assert not profile_step.is_device_work(event("CUDA", "step 3", annotation=True))
    assert not profile_step.is_device_work(event("CUDA", "Command Buffer Full"))
    assert not profile_step.is_device_work(event("CPU", "aten::mm"))


def test_gap_histogram_bins_idle_time_by_gap_length() -> None:
    merged = profile_step.merge_intervals([(0, 10), (15, 20), (70, 80), (580, 590), (30590, 30600)])
    text = profile_step.gap_histogram(merged)
    for part in ("0-20 us: 1 gaps", "20-100 us: 1 gaps", "100-1000 us: 1 gaps", "10000-inf us: 1 gaps, 0.030 s"):
        assert part in text, text
