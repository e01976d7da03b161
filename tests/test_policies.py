"""KV policies (scalekv, heatkv, window, streaming): budget semantics, the released tables and schedules, the
paged engine against a dense oracle of each policy, measured pages, page reuse, calibration.

Engine runs use the test-small model in float64, so the paged path and the dense oracle agree to the last bit of the
images. At 256x256 the test-small model has 7 scales (history 265 tokens); budget 0.2 keeps 53 tokens per layer, so
compression starts at scale 3 and every test asserts that it happened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from varserve import Engine, SamplingParams
from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_manager import BlockManager
from varserve.cache.heatkv import prune_counts
from varserve.cache.plan import KVPlan, ScoredCut, StaticCut
from varserve.cache.policy import POLICIES, FullPolicy, make_policy
from varserve.cache.scalekv import PRESETS, allocate, select_kept, window_indices
from varserve.cli import main
from varserve.config import EngineConfig
from varserve.models.config import get_config
from varserve.models.generation import ScaleSampling, num_rows
from varserve.models.reference import PolicyDenseKV, generate_dense
from varserve.models.schedule import parse_size
from varserve.scheduler.request import Request
from scalekv_fixtures import select_for_cut

PAGE = 16
TEST_SMALL = get_config("test-small")
COMPRESSED = ("scalekv", "heatkv", "window", "streaming")
BUDGET = 0.2
PROMPTS = ["a red fox in the snow", "a lighthouse at night"]


# ---- calibration (module fixture: the heatkv tests need its file) ------------------------------------------

@pytest.fixture(scope="module")
def heat_calibration(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return _calibrate(folder, "heatkv", "a.json")


def _calibrate(folder: Path, policy: str, name: str, *extra: str) -> Path:
    out = folder / name
    rc = main(["calibrate", "--model", "test-small", "--policy", policy, "--prompts", str(folder / "prompts.txt"),
               "--size", "256x256", "--seed", "5", "--dtype", "float64", "--out", str(out), "--log-level", "WARNING",
               *extra])
    assert rc == 0
    return out


def test_calibration_is_deterministic_for_a_prompt_file_and_seed(heat_calibration: Path, capsys) -> None:
    again = _calibrate(heat_calibration.parent, "heatkv", "b.json", "--budget", "0.1")
    assert again.read_bytes() == heat_calibration.read_bytes()
    assert "heatkv at kv_budget 0.1 (256x256)" in capsys.readouterr().out
    data = json.loads(heat_calibration.read_text())
    scas = np.array(data["scas"], dtype=float)
    assert scas.shape == (TEST_SMALL.depth, TEST_SMALL.num_heads, 7) and data["num_prompts"] == 2
    assert np.isnan(scas[..., [0, 1, 2, 6]]).all() and (scas[..., 3:6] > 0).all()


def test_scalekv_calibration_is_deterministic_and_sets_the_drafters(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    first, second = _calibrate(tmp_path, "scalekv", "a.json"), _calibrate(tmp_path, "scalekv", "b.json")
    assert first.read_bytes() == second.read_bytes()
    asi = json.loads(first.read_text())["asi"]
    schedule = parse_size("256x256")
    budgets = make_policy("scalekv", BUDGET, str(first)).scale_budgets(TEST_SMALL, schedule)
    for s, b in budgets.items():  # one drafter (round(0.07 * 4) -> at least 1): the layer of lowest ASI
        assert b.drafters == (int(np.argmin(asi[s])),)


def test_the_shipped_tiny_model_brings_its_own_calibrations() -> None:
    """varserve calibrate's files for tiny ship in varserve/cache/presets and apply without kv_calibration."""
    tiny, schedule = get_config("tiny"), parse_size("512x512")
    heat = make_policy("heatkv", 0.1)
    explicit = make_policy("heatkv", 0.1, str(PRESETS / "heatkv-calibration-tiny.json"))
    assert np.array_equal(heat.plan(tiny, schedule).kept, explicit.plan(tiny, schedule).kept)
    assert heat.plan(tiny, schedule).kept.sum() < FullPolicy().plan(tiny, schedule).kept.sum()
    asi = json.loads((PRESETS / "scalekv-calibration-tiny.json").read_text())["asi"]
    for s, b in make_policy("scalekv", 0.1).scale_budgets(tiny, schedule).items():
        assert b.drafters == tuple(sorted(np.argsort(asi[s], kind="stable")[:len(b.drafters)].tolist()))
    with pytest.raises(ValueError, match="none ships for test-small"):  # other models still need a file
        heat.plan(TEST_SMALL, parse_size("256x256"))


# ---- the released tables and formulas ----------------------------------------------------------------------

@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b"])
def test_allocation_rule_reproduces_the_shipped_presets(model: str) -> None:
    """0.1 is the released table (its drafters, Max and Min); the rule gives every capacity from the drafters
    and the average (650). 0.04 and 0.2 are the rule at floor(budget * 6425) with the 0.1 drafters."""
    cfg, schedule = get_config(model), parse_size("1024x1024")
    preset = json.loads((PRESETS / f"scalekv-{model}.json").read_text())
    released = {int(s): tuple(b["drafters"]) for s, b in preset["budgets"]["0.1"]["scales"].items()}
    drafters = lambda s: released[min(max(s, min(released)), max(released))]  # noqa: E731
    for budget, table in preset["budgets"].items():
        assert table["average_tokens"] == (650 if budget == "0.1" else math.floor(float(budget) * 6425))
        derived = allocate(schedule.tokens, cfg.depth, table["average_tokens"], drafters)
        assert {str(s): {"drafters": list(b.drafters), "drafter_capacity": b.drafter_capacity,
                         "refiner_capacity": b.refiner_capacity} for s, b in derived.items()} == table["scales"]
        plan = make_policy("scalekv", float(budget)).plan(cfg, schedule)
        assert plan.kept[:-1].mean(axis=(1, 2)).max() <= table["average_tokens"]  # the layer average holds


def test_released_2b_table_in_our_scale_indices() -> None:
    """The released 'Scale N' entries are cache_sizes[N], indexed by scale_ind + 2: scales 7..11 here."""
    plan = make_policy("scalekv", 0.1).plan(get_config("infinity-2b"), parse_size("1024x1024"))
    assert plan.kept[:7, 5, 0].tolist() == [1, 5, 21, 57, 121, 265, 521]  # 521 <= 650: left alone
    assert plan.kept[7:12, 0, 0].tolist() == [920, 1490, 2510, 4100, 6385]  # block 0 drafts at every scale
    assert plan.kept[7:12, 23, 0].tolist() == [920, 1490, 2510, 4100, 465]  # block 23 drafts up to scale 10
    assert plan.kept[7:12, 5, 0].tolist() == [632, 594, 526, 420, 465]


def test_heatkv_prune_counts_match_the_paper() -> None:
    counts = prune_counts(parse_size("1024x1024"), 32 * 16, 0.1)
    assert counts[:8].tolist() == [0] * 8 and counts[8:].tolist() == [159, 297, 385, 435, 463]


def test_observation_window_generalises_the_4x4_grid() -> None:
    assert window_indices(20, 20) == tuple(r * 20 + c for r in (2, 7, 12, 17) for c in (2, 7, 12, 17))
    tall = window_indices(22, 11)  # a 1:2 map: 4 rows of 5 and 4 columns of 2 tokens
    assert tall == tuple(r * 11 + c for r in (2, 7, 12, 17) for c in (0, 2, 4, 6))
    assert window_indices(2, 4) == (0, 1, 2, 3, 4, 5, 6, 7) and window_indices(1, 1) == (0,)


# ---- plans: budget 1.0, budgets, bounds --------------------------------------------------------------------

SIZES = ["256x256", "1:2@256", "512x512", "3:1@512"]


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize("size", SIZES)
def test_budget_one_plans_exactly_the_full_cache(name: str, size: str) -> None:
    schedule = parse_size(size)
    full, plan = FullPolicy().plan(TEST_SMALL, schedule), make_policy(name, 1.0).plan(TEST_SMALL, schedule)
    np.testing.assert_array_equal(plan.kept, full.kept)
    assert all(plan.cut(s, l) is None for s in range(schedule.num_scales) for l in range(TEST_SMALL.depth))


def _bounds(schedule, budget_tokens: float, rows: int) -> tuple[int, np.ndarray]:
    """(pages of the budget, [S] pages of one layer's current scale) for a request of `rows` rows."""
    pairs = TEST_SMALL.depth * TEST_SMALL.num_heads
    need = rows * (math.ceil(pairs * budget_tokens / PAGE) + pairs)  # at most one partial page per table
    return need, rows * TEST_SMALL.num_heads * -(-np.array(schedule.tokens) // PAGE)


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", [0.1, 0.2, 0.5])
def test_plans_keep_the_budget(name: str, size: str, budget: float, heat_calibration: Path) -> None:
    """After every scale the cache holds at most the budget; while a layer attends, window, streaming and
    heatkv hold at most the budget plus that layer's current scale. ScaleKV's drafters (and refiners whose
    capacity rises) hold their new scale's share while later layers still hold the previous scale's: its
    peak adds that growth of the layers already cut (as the released ScaleKV)."""
    schedule = parse_size(size)
    policy = make_policy(name, budget, str(heat_calibration) if name == "heatkv" else None)
    plan, rows = policy.plan(TEST_SMALL, schedule), 2
    need, current = _bounds(schedule, budget * schedule.history_tokens, rows)
    assert (rows * plan.pages_kept(PAGE).sum(1) <= need).all()
    growth = 0
    if name == "scalekv":
        grown = np.maximum(np.diff(plan.kept, axis=0, prepend=0), 0)
        growth = int(rows * np.ceil(grown / PAGE).sum(axis=(1, 2)).max())
    assert (plan.held_pages(PAGE, rows).max(1) <= need + current + growth).all()
    assert plan.held_pages(PAGE, rows).max() < FullPolicy().plan(TEST_SMALL, schedule).held_pages(PAGE, rows).max()


def test_heatkv_counts_differ_per_head_and_cuts_drop_whole_scales(heat_calibration: Path) -> None:
    schedule = parse_size("256x256")
    plan = make_policy("heatkv", BUDGET, str(heat_calibration)).plan(TEST_SMALL, schedule)
    assert (plan.kept[5] != plan.kept[5, :, :1]).any()
    tokens = np.array(schedule.tokens)
    sums = {int(np.dot(tokens[: 6], m)) for m in np.ndindex(*(2,) * 6) if m[:3] == (1, 1, 1)}
    assert set(plan.kept[:6].ravel().tolist()) - {1, 5} <= sums  # every count is a sum of whole scales
    cuts = [plan.cut(s, l) for s in range(7) for l in range(TEST_SMALL.depth)]
    assert any(isinstance(c, StaticCut) for c in cuts) and all(c is None or isinstance(c, StaticCut) for c in cuts)
    for cut in filter(None, cuts):  # kept tokens only move down, to the front of their table
        assert (cut.dst < cut.src).all()


# ---- the engine against the dense oracle of each policy ----------------------------------------------------

def _engine(name: str, budget: float, calibration: Path | None = None) -> Engine:
    path = str(calibration) if name == "heatkv" and calibration is not None else None
    return Engine("test-small", dtype="float64", num_pages=6000, page_size=PAGE, kv_policy=name, kv_budget=budget,
                  kv_calibration=path)


@pytest.fixture(scope="module")
def full_tall_image() -> np.ndarray:
    engine = Engine("test-small", dtype="float64", num_pages=6000, page_size=PAGE)
    return np.asarray(engine.generate("a tall tree", SamplingParams(size="1:2@256", seed=2, cfg=1.0),
                                      use_tqdm=False)[0].image)


@pytest.mark.parametrize("name", COMPRESSED)
def test_budget_one_gives_the_full_image(name: str, full_tall_image: np.ndarray) -> None:
    out = _engine(name, 1.0).generate("a tall tree", SamplingParams(size="1:2@256", seed=2, cfg=1.0),
                                      use_tqdm=False)[0]
    np.testing.assert_array_equal(np.asarray(out.image), full_tall_image)


@pytest.mark.parametrize("name, size, cfg", [("scalekv", "1:2@256", 4.0), ("heatkv", "1:2@256", 1.0),
                                             ("window", "256x256", 1.0), ("streaming", "256x256", 1.0)])
def test_engine_equals_the_dense_oracle_of_the_policy(name: str, size: str, cfg: float, heat_calibration: Path) -> None:
    engine = _engine(name, BUDGET, heat_calibration)
    params = SamplingParams(size=size, seed=7, cfg=cfg)
    out = engine.generate("a red fox in the snow", params, use_tqdm=False)[0]
    r, schedule, rows = engine.runner, params.schedule, num_rows(cfg, False)
    kv = PolicyDenseKV(TEST_SMALL, schedule, engine.policy)
    image, _ = generate_dense(r.model, r.vae, r.text_encoder, out.prompt, schedule,
                              ScaleSampling(params.cfg, params.tau, params.top_p), params.seed, kv=kv)
    np.testing.assert_array_equal(np.asarray(out.image), image.numpy())
    plan = engine.policy.plan(TEST_SMALL, schedule)
    m = out.metrics
    assert m.peak_kv_pages == plan.held_pages(PAGE, rows).max()  # measured = the admission profile, exactly
    assert m.mean_kv_pages == pytest.approx(rows * plan.pages_kept(PAGE).sum(1).mean())
    assert m.peak_kv_pages < FullPolicy().plan(TEST_SMALL, schedule).held_pages(PAGE, rows).max()  # it compressed
    assert m.nominal_kv_bytes == rows * schedule.history_tokens * TEST_SMALL.depth * TEST_SMALL.num_heads * r.page_bytes // PAGE
    assert engine.cache_stats()["used_pages"] == 0 and engine.cache_stats()["kv_policy"] == name


# ---- pages freed by a compressed request serve another in the same step ------------------------------------

def _request(rid: str, plan: KVPlan, schedule) -> Request:
    return Request(rid, "p", None, schedule, ScaleSampling(4.0, 1.0, 0.97), 0, 2, plan, plan.held_pages(PAGE, 2))


def test_pages_cut_by_a_compressed_request_serve_another_in_the_same_step() -> None:
    schedule = parse_size("256x256")
    plan = make_policy("window", BUDGET).plan(TEST_SMALL, schedule)
    a, b = _request("a", plan, schedule), _request("b", plan, schedule)
    scale_a, scale_b = 5, 3  # A cuts 144 + 53 tokens to 53 at every layer; B grows to its scale 3
    need = int((a.held[scale_a] + b.held[scale_b]).max())
    allocator = BlockAllocator(need + 1)  # exactly the layer-resolved peak of the step
    blocks = BlockManager(allocator, PAGE)
    for req, scale in ((a, scale_a), (b, scale_b)):
        blocks.start(req)
        while req.scale < scale:
            for layer in range(TEST_SMALL.depth):
                blocks.begin_layer([req], layer)
                blocks.end_layer([req], layer)
            req.scale += 1
    reused, freed_by_a = 0, set()
    for layer in range(TEST_SMALL.depth):
        b_before = _pages_of(b, layer)
        blocks.begin_layer([b, a], layer)  # B grows first: beyond what was free, only A's cut pages remain
        reused += len((_pages_of(b, layer) - b_before) & freed_by_a)
        held_by_a = _pages_of(a, layer)
        blocks.end_layer([b, a], layer)
        freed_by_a = held_by_a - _pages_of(a, layer)
        assert freed_by_a  # the window cut freed pages of A at this layer
    assert reused > 0 and allocator.peak_used <= need


def _pages_of(req: Request, layer: int) -> set[int]:
    table = req.tables.table(layer)
    return set(table[table != 0].tolist())


# ---- errors -------------------------------------------------------------------------------------------------

def test_unknown_policy_bad_budget_and_calibration_errors(tmp_path: Path, heat_calibration: Path) -> None:
    with pytest.raises(ValueError, match="unknown kv_policy 'snapkv'"):
        make_policy("snapkv", 0.1)
    for budget in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="kv_budget must be in"):
            make_policy("scalekv", budget)
    tall = parse_size("1:2@256")
    with pytest.raises(ValueError, match="needs S-CAS calibration"):
        make_policy("heatkv", BUDGET).plan(TEST_SMALL, tall)
    with pytest.raises(ValueError, match="does not exist"):
        make_policy("heatkv", BUDGET, str(tmp_path / "missing.json")).plan(TEST_SMALL, tall)
    with pytest.raises(ValueError, match="is a 'heatkv' calibration, not 'scalekv'"):
        make_policy("scalekv", BUDGET, str(heat_calibration)).plan(TEST_SMALL, tall)
    with pytest.raises(ValueError, match="made with 'test-small'"):
        make_policy("heatkv", BUDGET, str(heat_calibration)).plan(get_config("test-deep"), tall)
    with pytest.raises(ValueError, match="kv_budget must be >= 0.0622"):
        make_policy("heatkv", 0.05, str(heat_calibration)).plan(TEST_SMALL, tall)
    with pytest.raises(ValueError, match="kv_calibration is used by scalekv and heatkv only"):
        make_policy("window", BUDGET, str(heat_calibration))
    with pytest.raises(ValueError, match="keeps no token"):
        make_policy("window", 0.001).plan(TEST_SMALL, tall)
    with pytest.raises(ValueError, match="too small for scalekv: 10 tokens"):
        make_policy("scalekv", 0.05).plan(TEST_SMALL, tall)
    assert set(COMPRESSED) | {"full"} == set(POLICIES)
    for options, message in (({"kv_policy": "snapkv"}, "unknown kv_policy 'snapkv'"),
                             ({"kv_budget": 0.5}, "the full policy keeps everything: kv_budget must be 1.0"),
                             ({"kv_policy": "window", "kv_budget": 0.3, "kv_calibration": str(heat_calibration)},
                              "kv_calibration is used by scalekv and heatkv only")):
        with pytest.raises(ValueError, match=message):  # checked when the engine's config is made
            EngineConfig(**options)
    assert isinstance(make_policy("scalekv", BUDGET).plan(TEST_SMALL, tall).cut(4, 1), ScoredCut)


def _kept_by_brute_force(keys: torch.Tensor, window_q: torch.Tensor, cut: ScoredCut) -> np.ndarray:
    """One (row, head): scores summed over the window, window keys excluded, max-pooled (5), the best by score then
    lower position, plus the window, ascending."""
    scores = (window_q @ keys.T).sum(0).numpy() / math.sqrt(keys.shape[-1])
    scores[cut.window_positions] = -np.inf
    padded = np.pad(scores, 2, constant_values=-np.inf)
    pooled = np.array([padded[i : i + 5].max() for i in range(len(scores))])
    pooled[cut.window_positions] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -pooled))
    return np.sort(np.concatenate([order[: cut.capacity - len(cut.window)], cut.window_positions]))


def test_scalekv_selection_of_rows_of_different_cuts_in_one_batch_equals_each_cut_alone() -> None:
    """The engine selects for every cut of a layer at once, rows padded to the longest: each row picks what its cut
    picks alone (NaN keys in the padding change nothing), and that is the plain per-(row, head) rule."""
    g = torch.Generator().manual_seed(5)
    cuts = [ScoredCut(1497, 1497 + 1024, 600, window_indices(32, 32)), ScoredCut(921, 921 + 576, 200,
                                                                                  window_indices(24, 24))]
    rows, heads, d = 3, 4, 32
    keys = [torch.randn(rows, heads, c.attend_len, d, generator=g, dtype=torch.float64) for c in cuts]
    window_q = [torch.randn(rows, len(c.window), heads, d, generator=g, dtype=torch.float64) for c in cuts]
    alone = [select_for_cut(k, q, c) for k, q, c in zip(keys, window_q, cuts)]
    longest = max(c.attend_len for c in cuts)
    padded = torch.cat([F.pad(k, (0, 0, 0, longest - k.shape[2]), value=float("nan")) for k in keys])
    window = torch.cat([torch.as_tensor(c.window_positions).expand(rows, -1) for c in cuts])
    lengths, capacity = (torch.tensor([getattr(c, name) for c in cuts]).repeat_interleave(rows)
                         for name in ("attend_len", "capacity"))
    batched = select_kept(padded, torch.cat(window_q), window, lengths, capacity, max(c.capacity for c in cuts))
    for i, (cut, kept) in enumerate(zip(cuts, alone)):
        assert torch.equal(batched[i * rows : (i + 1) * rows, :, : cut.capacity], kept)
        for row, head in ((0, 0), (rows - 1, heads - 1)):
            np.testing.assert_array_equal(kept[row, head].numpy(), _kept_by_brute_force(
                keys[i][row, head], window_q[i][row, :, head], cut))
