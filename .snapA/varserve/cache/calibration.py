"""`varserve calibrate`: attention statistics of dense generations, written as a JSON file that the engine
loads (`kv_calibration=PATH`): ASI per (scale, layer) for ScaleKV's drafters, S-CAS per (layer, head, source
scale) for HeatKV's pruning order. Image i of the prompt file uses seed SEED+i, so a prompt file and a seed
give the same file (on the same device and dtype). The run itself lives in varserve/cache/attention_stats.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from varserve.models.config import ModelConfig

POLICIES = ("scalekv", "heatkv")


def load_calibration(path: str | Path) -> dict:
    """A `varserve calibrate` file's content; ValueError if it is missing, unreadable or names no policy."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"kv_calibration file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read kv_calibration file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
        raise ValueError(f"kv_calibration file {str(path)!r} names no policy (not a `varserve calibrate` file)")
    return data


SHIPPED = Path(__file__).parent / "presets"


def calibration_for(policy: str, cfg: ModelConfig, path: str | Path | None) -> str | Path | None:
    """`path` if given, else the calibration shipped for the model (varserve/cache/presets/
    <policy>-calibration-<model>.json, made by `varserve calibrate` on the model's own weights), else None."""
    if path is not None:
        return path
    shipped = SHIPPED / f"{policy}-calibration-{cfg.name}.json"
    return shipped if shipped.is_file() else None


def read_calibration(path: str | Path, policy: str, cfg: ModelConfig) -> dict:
    """The calibration file's content; ValueError if it is missing, unreadable, for another policy or model."""
    data = load_calibration(path)
    if data.get("policy") != policy:
        found = data.get("policy") if isinstance(data, dict) else None
        raise ValueError(f"kv_calibration file {str(path)!r} is a {found!r} calibration, not {policy!r}")
    if (data.get("depth"), data.get("num_heads")) != (cfg.depth, cfg.num_heads):
        raise ValueError(f"kv_calibration file {str(path)!r} was made with {data.get('model')!r} "
                         f"({data.get('depth')} layers, {data.get('num_heads')} heads), not {cfg.name!r} "
                         f"({cfg.depth} layers, {cfg.num_heads} heads)")
    return data


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register `varserve calibrate` (cli.py's subcommands)."""
    p = subparsers.add_parser(
        "calibrate", parents=parents, help="attention statistics for the scalekv and heatkv KV policies",
        description="Generate one image per prompt with the full cache, recording attention statistics, and "
                    "write the JSON that Engine(kv_calibration=PATH) loads.")
    p.add_argument("--policy", required=True, choices=POLICIES, help="which policy's statistics")
    p.add_argument("--model", default="tiny", help="preset (tiny, infinity-2b, infinity-8b, ...) or weights path")
    p.add_argument("--prompts", required=True, type=Path, help="a file of prompts, one per line (blank lines skipped)")
    p.add_argument("--size", default="1024x1024", help="image size of the calibration runs (default: 1024x1024)")
    p.add_argument("--budget", type=float,
                   help="also check that this kv_budget works at --size and print what it keeps per scale")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default: 0)")
    p.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    p.add_argument("--weights", help="local folder or file of official weights (else downloaded)")
    p.add_argument("--random-weights", action="store_true", help="random weights, no download")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from varserve.cache.attention_stats import calibrate, summary

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    prompts = read_prompts(args.prompts)
    data = calibrate(args.policy, args.model, prompts, args.size, args.seed, device=args.device, dtype=args.dtype,
                     weights=args.weights, random_weights=args.random_weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if args.budget is not None:
        print(summary(args.budget, args.out, data))
    print(f"{args.policy} calibration of {args.model} ({len(prompts)} prompts, {args.size}): {args.out}")
    return 0


def read_prompts(path: Path, option: str = "--prompts") -> list[str]:
    """The non-blank lines of a prompt file; ValueError naming `option` if it is unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {option}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{option} file {path} has no prompts")
    return prompts
