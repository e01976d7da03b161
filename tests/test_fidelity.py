"""`varserve eval-fidelity` on CPU: the test-small model (random weights), 3 prompts at 256x256 (code path and invariants,
not quality)."""

import json
import math

import numpy as np
import pytest

from varserve.cli import build_parser, main
from varserve.fidelity import PSNR_CAP, _shipped_calibrations, plan_runs, psnr, ssim

FAST = ["--model", "test-small", "--random-weights", "--size", "256x256", "--num-pages", "4096", "--page-size", "16",
        "--no-progress", "--log-level", "WARNING"]


def test_eval_fidelity_end_to_end(tmp_path, capsys):
    out = tmp_path / "fid.json"
    rc = main(["eval-fidelity", *FAST, "--num-prompts", "3", "--policies", "full,window,streaming,heatkv",
               "--budgets", "1.0,0.2", "--seed", "0", "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipping heatkv" in printed and "calibration" in printed  # never silently
    assert printed.count("policy") >= 1 and f"results: {out}" in printed

    data = json.loads(out.read_text())
    for key in ("command", "device", "device_name", "git_commit", "model", "size", "num_prompts", "seed",
                "scene_seed", "prompts", "skipped", "results", "psnr_cap_db", "ssim_definition", "page_bytes"):
        assert key in data, key
    assert data["command"].startswith("varserve eval-fidelity ")
    assert data["num_prompts"] == 3 and len(data["prompts"]) == 3
    assert data["skipped"] == [{"policy": "heatkv", "reason": data["skipped"][0]["reason"]}]
    rows = {(r["policy"], r["kv_budget"]): r for r in data["results"]}
    assert set(rows) == {("full", 1.0), ("window", 1.0), ("window", 0.2), ("streaming", 1.0), ("streaming", 0.2)}
    for r in rows.values():
        for key in ("psnr_mean_db", "ssim_mean", "prompt_acc", "checker", "peak_kv_pages_mean", "peak_kv_mib_mean",
                    "psnr_db", "ssim", "peak_kv_pages", "identical_images"):
            assert key in r, key
        assert len(r["psnr_db"]) == len(r["ssim"]) == len(r["peak_kv_pages"]) == 3
        assert 0.0 <= r["prompt_acc"] <= 1.0
        assert r["peak_kv_pages_mean"] > 0
    # budget 1.0 keeps everything: the very same images as the full cache
    for key in (("full", 1.0), ("window", 1.0), ("streaming", 1.0)):
        r = rows[key]
        assert r["identical_images"] == 3
        assert r["psnr_mean_db"] == PSNR_CAP and r["ssim_mean"] == 1.0
        assert r["prompt_acc"] == rows[("full", 1.0)]["prompt_acc"]
        assert r["peak_kv_pages_mean"] == rows[("full", 1.0)]["peak_kv_pages_mean"]
    for key in (("window", 0.2), ("streaming", 0.2)):
        r = rows[key]
        assert math.isfinite(r["psnr_mean_db"]) and 0 < r["psnr_mean_db"] <= PSNR_CAP
        assert -1.0 <= r["ssim_mean"] <= 1.0 and math.isfinite(r["ssim_mean"])
        assert r["peak_kv_pages_mean"] < rows[("full", 1.0)]["peak_kv_pages_mean"]


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert psnr(a, a) == PSNR_CAP and ssim(a, a) == 1.0
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert 10 < psnr(a, b) < 40
    assert -1.0 <= ssim(a, b) < 1.0
    assert ssim(a, 255 - a) < 0.5
    # one grey level everywhere: MSE 1 -> 48.13 dB
    assert psnr(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16, 3), np.uint8)) == pytest.approx(48.1308, abs=1e-3)


def test_plan_runs_and_parser():
    runs, skipped = plan_runs(["full", "window", "heatkv"], [0.2, 0.1], None)
    assert runs == [("window", 0.2, None), ("window", 0.1, None)]
    assert [s["policy"] for s in skipped] == ["heatkv"]
    runs, skipped = plan_runs(["heatkv"], [0.1], None, shipped=["scalekv", "heatkv"])  # tiny ships its own
    assert runs == [("heatkv", 0.1, None)] and skipped == []
    assert _shipped_calibrations("tiny") == ["scalekv", "heatkv"] and _shipped_calibrations("test-small") == []
    with pytest.raises(ValueError, match="unknown policy"):
        plan_runs(["nope"], [0.2], None)
    with pytest.raises(ValueError, match="budgets"):
        plan_runs(["window"], [1.5], None)
    args = build_parser().parse_args(["eval-fidelity", "--size", "256x256"])
    assert args.num_prompts == 200 and args.policies == ["full", "scalekv", "heatkv", "window", "streaming"]
    assert args.budgets == [0.2, 0.1, 0.04] and args.seed == 0
