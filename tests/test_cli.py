"""`varserve generate` and `varserve bench` on CPU with the test-small model (random weights) at 256x256."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from varserve.cli import main, one_line, slugify
from varserve.model_runner import STAGES, StageTimer

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "test-small", "--size", "256x256", "--num-pages", "4096", "--log-level", "WARNING"]  # small pool: fast to allocate


def test_generate_writes_one_png_per_prompt(tmp_path, capsys):
    out = tmp_path / "imgs"
    rc = main(["generate", "a cat on a mat", "A dog!", "--out", str(out), "--seed", "7", *FAST])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000_a-cat-on-a-mat.png", "001_a-dog.png"]
    for f in files:
        assert Image.open(f).size == (256, 256)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    by_path = {line.split("\t")[0]: line for line in lines}
    assert "seed=7" in by_path[str(files[0])] and "seed=8" in by_path[str(files[1])]
    assert all("latency=" in line and "peak_kv_pages=" in line for line in lines)


def test_generate_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red balloon\n\n")
    rc = main(["generate", "--prompts-file", str(prompts), "--out", str(tmp_path), "--cfg", "1", *FAST])
    assert rc == 0
    assert [f.name for f in tmp_path.glob("*.png")] == ["000_a-red-balloon.png"]
    prompts.write_text("\n \n")
    assert main(["generate", "--prompts-file", str(prompts), "--out", str(tmp_path), *FAST]) == 2
    assert f"--prompts-file file {prompts} has no prompts" in capsys.readouterr().err


def test_bad_size_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "varserve.cli", "generate", "a cat", "--out", str(tmp_path), "--size", "100x100"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "unsupported size '100x100'" in proc.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("args, message", [
    ([], "no prompts"),
    (["a cat", "--size", "3:1@2000"], "unsupported pixel budget"),
    (["a cat", "--cfg", "-1"], "cfg:"),
    (["a cat", "--kv-budget", "0.5"], "kv_budget must be 1.0"),
    (["a cat", "--model", "no-such-model"], "neither a preset"),
    (["x" * 300], "over the 128-token limit"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, message):
    argv = ["generate", "--model", "test-small", *args, "--out", str(tmp_path), "--num-pages", "256",
            "--log-level", "WARNING"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varserve generate: error:") and message in err and "\n" not in err


REQUIRED_KEYS = {
    "elapsed_time", "num_requests", "requests_per_second", "tokens_per_second", "total_num_tokens",
    "images_per_second", "scale_tokens_per_second", "image_tokens", "image_tokens_per_second",
    "throughput_time_s", "text_encoder_included", "text_encoder_time_s", "latency_p50_s", "latency_p95_s",
    "peak_gpu_memory_bytes", "peak_kv_pages", "peak_kv_bytes", "kv_pages_per_image_mean", "kv_pages_per_image_peak",
    "max_images_in_flight", "num_steps", "attention_backend", "device_name", "torch_version",
    "varserve_git_commit", "command", "batching", "kv_policy", "model", "size",
}


def _bench(argv, capsys) -> str:
    assert main(["bench", "--num-prompts", "3", "--no-progress", *FAST, *argv]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "Throughput:" in out
    return out


def _check(result: dict, batching: str) -> None:
    assert REQUIRED_KEYS <= result.keys()
    assert result["num_requests"] == 3 and result["batching"] == batching
    assert result["images_per_second"] > 0 and result["requests_per_second"] == result["images_per_second"]
    assert result["elapsed_time"] > 0 and result["throughput_time_s"] > 0
    # 256x256 has 7 scales of 1+4+16+36+64+144+256 = 521 tokens; CFG doubles the rows
    assert result["image_tokens"] == 3 * 521 and result["total_num_tokens"] == 2 * 3 * 521
    assert 0 < result["latency_p50_s"] <= result["latency_p95_s"]
    assert 0 < result["run_p50_s"] <= result["run_p95_s"] <= result["latency_max_s"]
    assert 0 < result["kv_pages_per_image_mean"] <= result["kv_pages_per_image_peak"] <= result["peak_kv_pages"]
    assert result["peak_kv_bytes"] == result["peak_kv_pages"] * result["page_bytes"]
    assert result["peak_gpu_memory_bytes"] is None  # CPU
    assert result["command"].startswith("varserve bench")
    _check_stages(result)


def _check_stages(result: dict) -> None:
    """Every step of these runs holds one scale: the transformer's time splits by scale, with nothing mixed."""
    stages = result["stage_time_s"]
    assert list(stages) == ["text_encoder", "transformer", "sampling", "vae_decode"] and min(stages.values()) > 0
    assert result["device_time_s"] == pytest.approx(sum(stages.values()))
    assert result["device_time_s"] <= result["elapsed_time"]
    assert result["text_encoder_time_s"] == stages["text_encoder"]
    by_scale = result["transformer_time_s_by_scale"]
    assert list(by_scale) == [str(s) for s in range(result["num_scales"])]
    assert result["transformer_time_s_mixed_steps"] == 0
    assert sum(by_scale.values()) == pytest.approx(stages["transformer"])


def test_stage_timer_splits_single_scale_steps_only():
    timer = StageTimer(torch.device("cpu"))
    for scales in ({0}, {1, 2}, {0}):
        timer.lap(begin=scales)
        for _ in STAGES:
            timer.lap()
    report = timer.report()
    assert list(report["transformer_time_s_by_scale"]) == ["0"] and report["transformer_time_s_mixed_steps"] > 0
    total = report["transformer_time_s_by_scale"]["0"] + report["transformer_time_s_mixed_steps"]
    assert report["stage_time_s"]["transformer"] == pytest.approx(total)


def test_bench_static_waves(tmp_path, capsys):
    path = tmp_path / "static.json"
    _bench(["--batching", "static", "--max-num-seqs", "2", "--warmup", "1", "--output-json", str(path)], capsys)
    result = json.loads(path.read_text())
    _check(result, "static")
    assert result["max_images_in_flight"] == 2
    assert result["num_steps"] == 2 * result["num_scales"]  # a wave of 2, then a wave of 1
    assert result["text_encoder_included"] and result["throughput_time_s"] == result["elapsed_time"]


def test_bench_continuous_default_path_and_excluded_text_encoder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bench(["--batching", "continuous", "--warmup", "0", "--exclude-text-encoder"], capsys)
    (path,) = (tmp_path / "benchmarks" / "results").glob("bench-test-small-full-continuous-*.json")
    result = json.loads(path.read_text())
    _check(result, "continuous")
    assert result["max_images_in_flight"] == 3 and result["num_steps"] == result["num_scales"]
    assert not result["text_encoder_included"]
    assert result["throughput_time_s"] == pytest.approx(result["elapsed_time"] - result["text_encoder_time_s"])


def test_helpers():
    assert slugify("  A Cat, on a MAT!! ") == "a-cat-on-a-mat"
    assert slugify("???") == "image"
    assert one_line(ValueError("two\nlines")) == "two lines"


def test_git_commit_prefers_the_environment(monkeypatch):
    from varserve.benchmark import git_commit

    monkeypatch.setenv("VARSERVE_GIT_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("VARSERVE_GIT_COMMIT")
    assert git_commit() != "abc1234"
