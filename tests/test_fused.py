"""The fused block pieces: on CUDA the Triton/compiled versions against the eager math (bf16 tolerance)."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from varserve.models import fused
from varserve.models.config import PRESETS
from varserve.models.infinity import FFN, rope_angles


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv_inputs(tokens: int, heads: int, dim: int, device: str) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(tokens, 3, heads, dim, generator=g).to(device, torch.bfloat16)
    q_bias, v_bias = (torch.randn(heads, dim, generator=g).to(device, torch.bfloat16) for _ in range(2))
    q_scale = torch.rand(heads, 1, generator=g).mul(math.log(100)).exp().to(device)
    angles = torch.cat([rope_angles((h, h), (32, 32), dim, 10000.0) for h in (1, 2, 4, 8, 16, 32)])[:tokens]
    return qkv, q_bias, v_bias, q_scale, angles.cos().float().to(device), angles.sin().float().to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, dim", [(16, 128), (4, 32), (28, 128)])
def test_triton_cosine_qkv_matches_eager(heads: int, dim: int) -> None:
    args = qkv_inputs(1365, heads, dim, "cuda")
    fast = fused.cosine_qkv(*args, torch.bfloat16)
    slow = fused.cosine_qkv_eager(*args, torch.bfloat16)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_error(a, b) < 1e-2


def page_inputs(tokens: int, heads: int, dim: int, device: str) -> fused.PageWrite:
    """Random pools and a PageWrite of the tokens split into 3 rows, each (row, head) with its own history length
    and distinct random pages (page 0 included: no page is special to the write)."""
    g = torch.Generator(device="cpu").manual_seed(2)
    page_size, rows = 16, 3
    lengths = [tokens // rows] * (rows - 1) + [tokens - tokens // rows * (rows - 1)]
    start = torch.randint(0, 40, (rows, heads), generator=g, dtype=torch.int32)
    width = -(-(int(start.max()) + max(lengths)) // page_size)
    num_pages = rows * heads * width
    table = torch.randperm(num_pages, generator=g).view(rows, heads, width).to(torch.int32)
    k_pages, v_pages = (torch.randn(num_pages, page_size, dim, generator=g).to(device, torch.bfloat16) for _ in "kv")
    token_row = torch.repeat_interleave(torch.arange(rows), torch.tensor(lengths))
    token_pos = torch.cat([torch.arange(n) for n in lengths])
    return fused.PageWrite(k_pages, v_pages, *(x.to(device) for x in (table, start, token_row, token_pos)))


def check_page_write(fast: tuple, slow: tuple, pages: fused.PageWrite, before: tuple) -> None:
    """`fast` wrote k and v into `pages`; `slow` returned them: the pages hold exactly slow's k, v at the slots
    (computed here from the table, start and positions), and nothing else changed."""
    q = fast[0]
    slots = (pages.table[pages.token_row[:, None], torch.arange(pages.start.shape[1], device=q.device),
                         (pages.start[pages.token_row] + pages.token_pos[:, None]) // 16].long() * 16
             + (pages.start[pages.token_row] + pages.token_pos[:, None]) % 16)
    assert fast[1] is None and fast[2] is None and torch.equal(q, slow[0])
    assert slots.unique().numel() == slots.numel()
    for pool, old, new in ((pages.k_pages, before[0], slow[1]), (pages.v_pages, before[1], slow[2])):
        expected = old.clone()
        expected.view(-1, old.shape[-1])[slots.reshape(-1)] = new.reshape(-1, old.shape[-1]).to(old.dtype)
        assert torch.equal(pool, expected)


def test_cosine_qkv_writes_k_and_v_into_their_page_slots() -> None:
    args = qkv_inputs(301, 4, 32, "cpu")
    pages = page_inputs(301, 4, 32, "cpu")
    before = (pages.k_pages.clone(), pages.v_pages.clone())
    check_page_write(fused.cosine_qkv(*args, torch.bfloat16, pages), fused.cosine_qkv(*args, torch.bfloat16), pages,
                     before)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, dim", [(16, 128), (4, 32)])
def test_triton_cosine_qkv_writes_pages_bit_for_bit_as_its_outputs(heads: int, dim: int) -> None:
    """The kernel's page write stores what it returns without pages (which the eager comparison above checks)."""
    args, pages = qkv_inputs(1365, heads, dim, "cuda"), page_inputs(1365, heads, dim, "cuda")
    before = (pages.k_pages.clone(), pages.v_pages.clone())
    check_page_write(fused.cosine_qkv(*args, torch.bfloat16, pages), fused.cosine_qkv(*args, torch.bfloat16), pages,
                     before)


@pytest.mark.skipif(fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the Triton kernels on CPU only under TRITON_INTERPRET=1 with triton installed")
def test_cosine_qkv_page_write_in_interpreter() -> None:
    args, pages = qkv_inputs(45, 4, 32, "cpu"), page_inputs(45, 4, 32, "cpu")
    before = (pages.k_pages.clone(), pages.v_pages.clone())
    check_page_write(fused._cosine_qkv_triton(*args, torch.bfloat16, pages),
                     fused._cosine_qkv_triton(*args, torch.bfloat16, None), pages, before)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [256, 200])  # 200: a row the kernels cover with a masked power-of-2 block
def test_row_kernels_match_eager(width: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(777, width, generator=g).cuda()
    scale, shift, gamma = torch.randn(5, 3, width, generator=g).cuda().unbind(1)  # strided rows, as AdaLN's
    rows = torch.randint(0, 5, (777,), generator=g).cuda()
    y = torch.randn(777, width, generator=g).cuda().bfloat16()
    weight, bias = (torch.randn(width, generator=g).cuda().bfloat16() for _ in range(2))
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):  # fp32 out checks the math itself
        pairs = [(fused.ln_modulate(x, scale, shift, rows, 1e-6, dtype),
                  fused.ln_modulate.__wrapped__(x, scale, shift, rows, 1e-6, dtype))]
        for fn, args in ((fused.gated_add_layer_norm, (x, y, gamma, rows, weight, bias, 1e-6, dtype)),
                         (fused.add_ln_modulate, (x, y, scale, shift, rows, 1e-6, dtype))):
            (residual, fast), (expected, slow) = fn(*args), fn.__wrapped__(*args)
            assert residual.dtype == torch.float32 and rel_error(residual, expected) < 1e-6
            pairs.append((fast, slow))
        for fast, slow in pairs:
            assert fast.dtype == slow.dtype == dtype and rel_error(fast, slow) < tolerance
    assert rel_error(fused.gated_add(x, y, gamma, rows), fused.gated_add.__wrapped__(x, y, gamma, rows)) < 1e-6


@pytest.mark.skipif(fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the Triton kernels on CPU only under TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("width", [256, 200])
def test_row_kernels_in_interpreter(width: int) -> None:
    """The launches themselves (strides, masks, row lookup) on CPU; the GPU test checks them compiled."""
    g = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(37, width, generator=g)
    scale, shift, gamma = torch.randn(5, 3, width, generator=g).unbind(1)  # strided rows, as AdaLN's
    rows = torch.randint(0, 5, (37,), generator=g)
    y = torch.randn(37, width, generator=g).bfloat16()
    weight, bias = (torch.randn(width, generator=g).bfloat16() for _ in range(2))
    pairs = [
        (fused._ln_modulate_triton(x, scale, shift, rows, 1e-6, torch.float32),
         fused.ln_modulate.__wrapped__(x, scale, shift, rows, 1e-6, torch.float32)),
        *zip(fused._gated_add_layer_norm_triton(x, y, gamma, rows, weight, bias, 1e-6, torch.float32),
             fused.gated_add_layer_norm.__wrapped__(x, y, gamma, rows, weight, bias, 1e-6, torch.float32)),
        *zip(fused._add_ln_modulate_triton(x, y, scale, shift, rows, 1e-6, torch.float32),
             fused.add_ln_modulate.__wrapped__(x, y, scale, shift, rows, 1e-6, torch.float32)),
        (fused._gated_add_triton(x, y, gamma, rows), fused.gated_add.__wrapped__(x, y, gamma, rows)),
    ]
    column_major = gamma.t().contiguous().t()  # a last stride other than 1: the launch must copy it first
    pairs.append((fused._gated_add_triton(x, y, column_major, rows), fused.gated_add.__wrapped__(x, y, gamma, rows)))
    pairs.append((fused._ln_modulate_triton(x, column_major, shift, rows, 1e-6, torch.float32),
                  fused.ln_modulate.__wrapped__(x, gamma, shift, rows, 1e-6, torch.float32)))
    qkv, q_bias, v_bias, q_scale, cos, sin = qkv_inputs(41, 4, 32, "cpu")
    args = (qkv.float(), q_bias.float(), v_bias.float(), q_scale, cos, sin, torch.float32)
    pairs += zip(fused._cosine_qkv_triton(*args, None), fused.cosine_qkv_eager(*args))
    for fast, slow in pairs:
        assert fast.shape == slow.shape and rel_error(fast, slow) < 1e-6


def group_norm_inputs(shape: tuple[int, ...], offset: float) -> tuple[torch.Tensor, ...]:
    """A map whose mean is `offset` standard deviations off zero (the statistics must not cancel), and an affine."""
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(*shape, generator=g).mul(3).add(3 * offset)
    return x, torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_swish_kernels_match_float64(layout: torch.memory_format) -> None:
    x, weight, bias = group_norm_inputs((2, 96, 67, 41), offset=20.0)  # 2747 pixels: two statistics blocks
    fast = fused.group_norm_swish(x.cuda().bfloat16().contiguous(memory_format=layout), weight.cuda(), bias.cuda(),
                                  24, 1e-6, torch.bfloat16)
    exact = fused.group_norm_swish_eager(x.bfloat16().double(), weight.double(), bias.double(), 24, 1e-6,
                                         torch.float64)
    assert fast.dtype == torch.bfloat16 and fast.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(fast.cpu(), exact) < 1e-2


@pytest.mark.gpu
def test_group_norm_swish_kernels_cover_the_decoders_largest_map() -> None:
    """1024^2 pixels of 256 channels: more pixel tiles than a grid's second axis holds."""
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(1, 256, 1024, 1024, generator=g, device="cuda").bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(2, 256, generator=g, device="cuda")
    fast = fused.group_norm_swish(x, weight, bias, 32, 1e-6, torch.bfloat16)
    assert rel_error(fast, fused.group_norm_swish_eager(x, weight, bias, 32, 1e-6, torch.float32)) < 1e-2


@pytest.mark.skipif(fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the Triton kernels on CPU only under TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("shape, groups", [((2, 96, 9, 5), 24), ((1, 64, 50, 45), 32)])  # 2250 pixels: 2 blocks
def test_group_norm_swish_kernels_in_interpreter(shape: tuple[int, ...], groups: int) -> None:
    x, weight, bias = group_norm_inputs(shape, offset=20.0)
    fast = fused._group_norm_swish_triton(x, weight, bias, groups, 1e-6, torch.float32)
    exact = fused.group_norm_swish_eager(x.double(), weight.double(), bias.double(), groups, 1e-6, torch.float64)
    assert fast.shape == exact.shape and rel_error(fast, exact) < 1e-6


def conv_inputs(channels_in: int, channels_out: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(2, channels_in, 19, 23, generator=g)
    weight = torch.randn(channels_out, channels_in, 3, 3, generator=g) / (3 * channels_in**0.5)
    return x, weight, torch.randn(channels_out, generator=g).mul(4)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_out", [96, 3])
def test_conv_bias_kernel_matches_autocast_conv(channels_out: int) -> None:
    """The bias pass gives autocast's conv exactly (bf16 bias added to the bf16 conv output, rounded once); the
    VAE's last conv has 3 channels."""
    x, weight, bias = (t.cuda() for t in conv_inputs(64, channels_out))
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", torch.bfloat16):
        fast, plain = fused.conv2d(x, weight, bias, 1), torch.nn.functional.conv2d(x, weight, bias, padding=1)
    exact = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    assert fast.dtype == torch.bfloat16 and fast.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(fast, exact) < 1e-2
    assert torch.equal(fast, plain)


@pytest.mark.skipif(fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the Triton kernels on CPU only under TRITON_INTERPRET=1 with triton installed")
def test_conv_bias_kernel_in_interpreter() -> None:
    x, weight, bias = conv_inputs(8, 24)
    out = torch.nn.functional.conv2d(x, weight, None, padding=1).contiguous(memory_format=torch.channels_last)
    fused._channel_bias_add_triton(out.permute(0, 2, 3, 1), bias)
    assert rel_error(out, torch.nn.functional.conv2d(x, weight, bias, padding=1)) < 1e-6


@pytest.mark.gpu
def test_training_on_cuda_keeps_autograd_through_the_fused_paths() -> None:
    """Inputs that require grad run the eager versions (the Triton kernels and the GELU epilogue have no
    backward): the gradients on CUDA are CPU's."""
    def grads(fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
        tensors = [t.detach().requires_grad_() for t in tensors]
        fn(*tensors).square().sum().backward()
        return [t.grad.cpu() for t in tensors]

    x, weight, bias = group_norm_inputs((2, 64, 9, 7), offset=1.0)  # float32: the Triton kernels' dtype
    norm = functools.partial(fused.group_norm_swish, groups=32, eps=1e-6, dtype=torch.float32)
    for cuda, cpu in zip(grads(norm, x.cuda(), weight.cuda(), bias.cuda()), grads(norm, x, weight, bias)):
        assert rel_error(cuda, cpu) < 1e-4
    ffn, x = ffn_inputs()
    expected = grads(ffn, x) + [p.grad.clone() for p in (ffn.fc1.weight, ffn.fc1.bias)]
    ffn.zero_grad()
    got = grads(ffn.cuda(), x.cuda()) + [p.grad.cpu() for p in (ffn.fc1.weight, ffn.fc1.bias)]
    assert all(rel_error(a, b) < 1e-9 for a, b in zip(got, expected))


def test_group_norm_swish_is_the_reference_formula() -> None:
    g = torch.Generator(device="cpu").manual_seed(3)
    x, weight, bias = torch.randn(2, 64, 5, 7, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g)
    h = torch.nn.functional.group_norm(x, 32, weight, bias, 1e-6)
    assert torch.equal(fused.group_norm_swish_eager(x, weight, bias, 32, 1e-6, torch.float32), h * torch.sigmoid(h))
    assert torch.equal(fused.group_norm_swish(x, weight, bias, 32, 1e-6, torch.float32), h * torch.sigmoid(h))


@pytest.mark.gpu
def test_ffn_gelu_epilogue_is_the_tanh_gelu() -> None:
    """On CUDA fc1's GELU runs as cuBLASLt's epilogue: it must be the tanh approximation Infinity uses."""
    ffn, x = ffn_inputs()
    exact, erf = ffn(x), ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x)))
    fast = ffn.to("cuda", torch.float32)(x.cuda().float()).cpu()
    assert rel_error(fast, exact) < 1e-5 < rel_error(fast, erf)
    fast = ffn.to("cuda", torch.bfloat16)(x.cuda().bfloat16()).cpu()
    assert rel_error(fast, exact) < 2e-2


def ffn_inputs() -> tuple[FFN, torch.Tensor]:
    cfg = PRESETS["test-small"]
    g = torch.Generator(device="cpu").manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ffn = FFN(cfg).double()
    return ffn, torch.randn(300, cfg.width, generator=g, dtype=torch.float64).mul(4)


def test_tanh_and_erf_gelu_differ_enough_for_the_ffn_test() -> None:
    ffn, x = ffn_inputs()
    assert rel_error(ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x))), ffn(x)) > 5e-5
