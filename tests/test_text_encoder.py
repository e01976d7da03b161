import string
from dataclasses import replace

import huggingface_hub
import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from varserve.models.checkpoint import WeightsUnavailableError
from varserve.models.text_encoder import (
    TEXT_ENCODER_PRESETS,
    ByteTokenizer,
    HFTokenizer,
    SmallTextEncoder,
    TextEncoder,
    WordTokenizer,
)

TINY = TEXT_ENCODER_PRESETS["tiny"]
# flan-t5-xl's code path (HF folder, HF tokenizer) with a model small enough to build here.
SMALL_FLAN = replace(TEXT_ENCODER_PRESETS["flan-t5-xl"], d_model=64)
PROMPTS = ["a cat on a mat", "", "a photo of a dog, in the snow", "Ünïcödé ✓"]
WORDS = ["a", "the", "cat", "dog", "on", "mat", "photo", "of", "in", "snow"]


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return TextEncoder.load(TINY)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """An HF-format T5 folder like google/flan-t5-xl's, in miniature: config, safetensors, T5 unigram tokenizer."""
    folder = tmp_path_factory.mktemp("flan-t5-small")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.punctuation]
    vocab += [("▁" + w, -1.0) for w in WORDS]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    config = T5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)
    return folder


def test_tiny_is_deterministic(tiny):
    again = TextEncoder.load(TINY)
    assert torch.equal(tiny.encode(PROMPTS).features, again.encode(PROMPTS).features)


def test_packed_layout(tiny):
    batch = tiny.encode(PROMPTS)
    lengths = [len(p.encode()) + 1 for p in PROMPTS]  # bytes + </s>
    assert batch.lengths == lengths
    assert batch.features.shape == (sum(lengths), TINY.d_model)
    assert batch.features.dtype == torch.float32
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]


def test_empty_prompt_is_one_eos_token(tiny):
    assert tiny.tokenizer.token_ids([""]) == [[ByteTokenizer.eos_id]]
    assert tiny.encode([""]).features.shape == (1, TINY.d_model)


def test_different_prompts_differ(tiny):
    a, b = tiny.encode(["a red cube"]).features, tiny.encode(["a red ball"]).features
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_batch_invariance(tiny):
    together = tiny.encode(PROMPTS).features
    alone = torch.cat([tiny.encode([p]).features for p in PROMPTS])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    chunked = TextEncoder(TINY, tiny.model, tiny.tokenizer, batch_size=3).encode(PROMPTS).features
    torch.testing.assert_close(chunked, together, rtol=0, atol=1e-5)


class PadSpy(torch.nn.Module):
    """Records each call's input ids and keyword arguments, then runs the encoder."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.model(**kwargs)


def test_prompts_run_unpadded_and_unmasked_in_order(tiny):
    """A padding mask makes the HF encoder wait for the device; prompts of one token count run together instead."""
    prompts = ["ab", "abcd", "cd", "", "ef", "abcd", "gh"]
    spy = PadSpy(tiny.model)
    batch = TextEncoder(TINY, spy, tiny.tokenizer, batch_size=2).encode(prompts)
    assert all(set(call) == {"input_ids"} for call in spy.calls)
    assert all((call["input_ids"] != tiny.tokenizer.pad_id).all() for call in spy.calls)
    assert sorted(call["input_ids"].shape[1] for call in spy.calls) == [1, 3, 3, 5]  # 2 prompts a call at most
    alone = torch.cat([tiny.encode([p]).features for p in prompts])
    torch.testing.assert_close(batch.features, alone, rtol=0, atol=1e-5)


def test_over_long_prompt_is_rejected(tiny):
    fits = "x" * (TINY.max_length - 1)
    assert tiny.encode([fits]).lengths == [TINY.max_length]
    limit = TINY.max_length
    with pytest.raises(ValueError, match=rf"prompt 1 is {limit + 1} tokens long .* over the {limit}-token limit"):
        tiny.encode(["ok", fits + "y"])


def test_no_prompts(tiny):
    batch = tiny.encode([])
    assert batch.features.shape == (0, TINY.d_model) and batch.lengths == [] and batch.cu_seqlens.tolist() == [0]


def test_lower_precision_still_returns_float32():
    encoder = TextEncoder.load(TINY, dtype=torch.bfloat16)
    assert encoder.model.dtype == torch.bfloat16
    assert encoder.encode(["a cat"]).features.dtype == torch.float32


def test_tiny_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = TextEncoder.load(TINY, tmp_path)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    saved, read = tiny.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
    # Equal weights, but transformers >= 5 maps them from the file, at addresses whose alignment sends the CPU
    # matmuls down another path: features then differ in the last bits (7e-7 seen).
    torch.testing.assert_close(loaded.encode(PROMPTS).features, tiny.encode(PROMPTS).features, rtol=0, atol=1e-5)


def official_encode(folder, prompts, max_length):
    """tools/run_infinity.py encode_prompt: pad to max_length, run the encoder, keep each prompt's valid tokens."""
    tokenizer = T5Tokenizer.from_pretrained(folder)
    model = T5EncoderModel.from_pretrained(folder)
    tokens = tokenizer(text=prompts, max_length=max_length, padding="max_length", truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state.float()
    lengths = tokens.attention_mask.sum(-1).tolist()
    return torch.cat([h[:n] for n, h in zip(lengths, hidden)]), lengths


def test_hf_folder_matches_official_recipe(t5_folder):
    encoder = TextEncoder.load(SMALL_FLAN, t5_folder)
    assert isinstance(encoder.tokenizer, HFTokenizer)
    prompts = ["a cat on a mat", "", "the dog, in the snow!"]
    batch = encoder.encode(prompts)
    features, lengths = official_encode(t5_folder, prompts, SMALL_FLAN.max_length)
    assert batch.lengths == lengths
    torch.testing.assert_close(batch.features, features, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prompt 0 is 601 tokens long"):
        encoder.encode(["cat " * 600])


def test_hf_folder_with_wrong_width(t5_folder):
    with pytest.raises(ValueError, match="expects d_model 2048, but the loaded T5 encoder has d_model 64"):
        TextEncoder.load(TEXT_ENCODER_PRESETS["flan-t5-xl"], t5_folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.load(SMALL_FLAN, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face T5 folder"):
        TextEncoder.load(SMALL_FLAN, tmp_path)


def test_download_path(t5_folder, monkeypatch):
    calls = []

    def snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(t5_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    for path in (None, "google/flan-t5-xl"):
        assert isinstance(TextEncoder.load(SMALL_FLAN, path).tokenizer, HFTokenizer)
    assert [repo for repo, _ in calls] == ["google/flan-t5-xl"] * 2
    assert "model*.safetensors" in calls[0][1] and "tokenizer.json" in calls[0][1]


def test_download_failure_explains_the_local_path(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(WeightsUnavailableError) as err:
        TextEncoder.load(TEXT_ENCODER_PRESETS["flan-t5-xl"])
    message = str(err.value)
    assert "google/flan-t5-xl" in message and "model*.safetensors" in message
    assert "hf download google/flan-t5-xl" in message
    assert "TextEncoder.load(config, path=" in message and "weights=" in message


# ---- the small word-level encoder of models trained here --------------------------------------------------------

SMALL = replace(TINY, name="small-test", max_length=16, num_layers=2, architecture="small")


def test_word_tokenizer_splits_words_and_marks_and_refuses_unknown_words(tmp_path):
    tok = WordTokenizer(["a", "cat", ",", "dog"])
    assert tok.token_ids(["A cat, a DOG", ""]) == [[3, 4, 5, 3, 6, 1], [1]]
    with pytest.raises(ValueError, match="prompt 1 has words this model was not trained on: bird, zebra"):
        tok.token_ids(["a cat", "a zebra, a bird"])
    tok.save_pretrained(tmp_path)
    assert WordTokenizer.from_pretrained(tmp_path).words == tok.words
    with pytest.raises(ValueError, match="twice"):
        WordTokenizer(["a", "a"])


def test_architecture_is_checked():
    with pytest.raises(ValueError, match="architecture must be"):
        replace(TINY, architecture="bert")


def plain_small_encoder(model: SmallTextEncoder, ids: torch.Tensor) -> torch.Tensor:
    """Pre-norm encoder layers written out in float64: x += MHA(LN(x)); x += FFN(LN(x)); final LN."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["embed.weight"][ids] + sd["positions"][: ids.shape[1]]
    heads, d = model.config.num_heads, model.config.d_model
    ln = torch.nn.functional.layer_norm
    for i in range(model.config.num_layers):
        p = {k.split(f"layers.layers.{i}.", 1)[1]: v for k, v in sd.items() if k.startswith(f"layers.layers.{i}.")}
        h = ln(x, (d,), p["norm1.weight"], p["norm1.bias"], 1e-5)
        q, k, v = (h @ p["self_attn.in_proj_weight"].T + p["self_attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.view(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / (d // heads) ** 0.5).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(x.shape) @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]
        h = ln(x, (d,), p["norm2.weight"], p["norm2.bias"], 1e-5)
        f = torch.nn.functional.gelu(h @ p["linear1.weight"].T + p["linear1.bias"])
        x = x + f @ p["linear2.weight"].T + p["linear2.bias"]
    return ln(x, (d,), sd["layers.norm.weight"], sd["layers.norm.bias"], 1e-5)


def test_small_encoder_equals_a_plain_float64_encoder_and_ignores_padding(tmp_path):
    tok = WordTokenizer(WORDS)
    encoder = TextEncoder.load(SMALL, tokenizer=tok)
    with torch.no_grad():  # random layer norms and biases too, so every parameter matters
        for p in encoder.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompts = ["a cat on a mat", "a photo of a dog in the snow", "the dog"]
    batch = encoder.encode(prompts)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor(tok.token_ids([prompt]))
        want = plain_small_encoder(encoder.model, ids)[0]
        got = batch.features[batch.cu_seqlens[i]:batch.cu_seqlens[i + 1]]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    encoder.save_pretrained(tmp_path)
    loaded = TextEncoder.load(SMALL, tmp_path)
    assert isinstance(loaded.model, SmallTextEncoder) and loaded.tokenizer.words == tok.words
    assert torch.equal(loaded.encode(prompts).features, batch.features)
    with pytest.raises(ValueError, match="over the 16-token limit"):
        loaded.encode([" ".join(["a"] * 16)])
