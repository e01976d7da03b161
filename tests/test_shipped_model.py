"""The shipped `tiny` model end to end on CPU: its weights are in the package, and the README's path (`Engine("tiny")`,
no download) draws what six fixed prompts say at its native 512x512, as the analytic checker of the training data
sees it.

Needs the trained weights in varserve/weights/tiny/ (`python examples/train_tiny.py --out varserve/weights/tiny`);
without them these tests fail, saying so.
"""

import numpy as np
import pytest

from varserve import Engine
from varserve.models.checkpoint import PACKAGE_WEIGHTS, WeightsUnavailableError, resolve_weights
from varserve.models.config import get_config
from varserve.training import presets
from varserve.training.data import REGIONS, SIZE_RANGES, ObjectSpec, SceneSpec, check_images

SEED = 0
MAX_WEIGHT_BYTES = 20e6


def scene(background: str, *objects: tuple[str, str, str, str]) -> SceneSpec:
    """A scene of (colour, shape, size, region) objects, each at its cell's centre with its size's mean extent."""
    specs = []
    for colour, shape, size, region in objects:
        row, col = divmod(REGIONS.index(region), 3)
        specs.append(ObjectSpec(colour, shape, size, region, (col + 0.5) / 3, (row + 0.5) / 3,
                                sum(SIZE_RANGES[size]) / 6))
    return SceneSpec(background, tuple(specs))


CASES = [
    ("a red circle at the top left on a white background",
     scene("white", ("red", "circle", "medium", "top left"))),
    ("a blue square at the center on a yellow background",
     scene("yellow", ("blue", "square", "medium", "center"))),
    ("a big green triangle at the bottom right on a black background",
     scene("black", ("green", "triangle", "big", "bottom right"))),
    ("a yellow circle at the top on a gray background",
     scene("gray", ("yellow", "circle", "medium", "top"))),
    ("a purple square at the left and a cyan circle at the right on a white background",
     scene("white", ("purple", "square", "medium", "left"), ("cyan", "circle", "medium", "right"))),
    ("a red triangle at the top right, a blue circle at the bottom left and a big pink square at the center "
     "on a gray background",
     scene("gray", ("red", "triangle", "medium", "top right"), ("blue", "circle", "medium", "bottom left"),
           ("pink", "square", "big", "center"))),
]


def require_weights() -> None:
    try:
        resolve_weights(get_config("tiny"))
    except WeightsUnavailableError as err:
        raise AssertionError(f"the trained tiny weights are not in the package: {err}") from None


def test_shipped_weights_are_in_the_package_and_small():
    require_weights()
    files = [p for p in (PACKAGE_WEIGHTS / "tiny").rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".pth", ".bin")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert sum(p.stat().st_size for p in files) <= MAX_WEIGHT_BYTES


def test_tiny_draws_what_its_prompts_say():
    require_weights()
    assert [spec.prompt for _, spec in CASES] == [prompt for prompt, _ in CASES]  # the training phrasing
    engine = Engine("tiny")
    assert (engine.default_params.cfg, engine.default_params.tau) == (2.0, 0.5)  # tiny's own sampling
    params = [engine.default_params.updated(size=presets.IMAGE_SIZE, seed=SEED + i) for i in range(len(CASES))]
    outputs = engine.generate([prompt for prompt, _ in CASES], params, use_tqdm=False)
    images = np.stack([np.asarray(out.image) for out in outputs])
    assert images.shape == (len(CASES), 512, 512, 3)
    checks, summary = check_images(images, [spec for _, spec in CASES])
    report = "\n".join(f"{'OK ' if c.ok else 'BAD'} {prompt}" for c, (prompt, _) in zip(checks, CASES))
    assert sum(c.ok for c in checks) >= 4, f"prompt accuracy {summary['prompt_acc']:.2f} < 4/6:\n{report}\n{summary}"
    with pytest.raises(ValueError, match="^negative_prompt has words this model was not trained on: zebra"):
        engine.add_request(CASES[0][0], params[0].updated(negative_prompt="a zebra"))
    assert engine.default_params.size == presets.IMAGE_SIZE  # its recommended size: what it was trained at
