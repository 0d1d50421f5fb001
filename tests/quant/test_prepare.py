"""prepare swaps exactly the modules the scope names; convert reproduces the fake-quant forward; config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dqwhisper.models.student import load_checkpoint, save_checkpoint
from dqwhisper.quant import (
    FakeQuantizedConv1d,
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    QuantConfig,
    QuantizedEmbedding,
    QuantizedLinear,
    convert,
    prepare,
    resolve_config,
)
from dqwhisper.quant.fake_quant import FAKE_QUANTIZED_TYPES
from dqwhisper.quant.prepare import quantized_modules
from dqwhisper.utils import DQWhisperError
from tests.quant.conftest import make_student


def fq_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, FAKE_QUANTIZED_TYPES)}


def expected_names(model, prefixes, embedding=True, conv=True):
    names = set()
    for n, m in model.named_modules():
        if not n.startswith(prefixes):
            continue
        if (
            isinstance(m, nn.Linear)
            or (conv and isinstance(m, nn.Conv1d))
            or (embedding and n == "decoder.token_embedding")
        ):
            names.add(n)
    return names


@pytest.mark.parametrize(
    "scope,prefixes",
    [("decoder", ("decoder.",)), ("encoder", ("encoder.", "ctc_head")), ("all", ("encoder.", "decoder.", "ctc_head"))],
)
def test_scope_touches_exactly_its_modules(scope, prefixes):
    model = make_student(ctc_units=10)
    float_model = make_student(ctc_units=10)
    prepare(model, {"enabled": True, "scope": scope})
    want = expected_names(float_model, prefixes)
    assert fq_names(model) == want
    assert len(want) > 0
    for n, m in model.named_modules():  # and nothing else changed type
        if n not in want and not any(n.startswith(w + ".") for w in want):
            assert type(m) is type(float_model.get_submodule(n)), n
    assert model.quant_config["scope"] == scope and model.quant_config["enabled"]


def test_decoder_scope_counts():
    model = prepare(make_student(), {"enabled": True})
    n_layers = model.dims.n_text_layer
    assert sum(isinstance(m, FakeQuantizedLinear) for m in model.modules()) == 10 * n_layers  # q,k,v,o x2 + fc1,fc2
    assert isinstance(model.decoder.token_embedding, FakeQuantizedEmbedding)
    assert not any(isinstance(m, FAKE_QUANTIZED_TYPES) for m in model.encoder.modules())


def test_include_exclude_and_flags():
    model = prepare(
        make_student(),
        {"enabled": True, "scope": "all", "include": [r"\.mlp\.", "conv"], "exclude": [r"blocks\.0\."], "conv": False},
    )
    names = fq_names(model)
    assert names and all(".mlp." in n and "blocks.0." not in n for n in names)
    model = prepare(make_student(), {"enabled": True, "embedding": False, "scope": "all"})
    assert "decoder.token_embedding" not in fq_names(model)
    assert isinstance(model.encoder.conv1, FakeQuantizedConv1d)


def test_parameters_are_shared_not_copied():
    model = make_student()
    w = model.decoder.blocks[0].mlp[0].weight
    prepare(model, {"enabled": True})
    assert model.decoder.blocks[0].mlp[0].weight is w


def test_accepts_dataclass_dictconfig_dict():
    for cfg in (
        QuantConfig(enabled=True),
        OmegaConf.structured(QuantConfig(enabled=True)),
        OmegaConf.create({"enabled": True, "weight": {"bits": 4}}),
        {"enabled": True},
    ):
        assert fq_names(prepare(make_student(), cfg))


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"weight": {"bits": 1}}, "quant.weight.bits = 1"),
        ({"weight": {"bits": 9}}, "quant.weight.bits = 9"),
        ({"embedding_bits": 16}, "quant.embedding_bits"),
        ({"scope": "everything"}, "quant.scope = 'everything'"),
        ({"weight": {"granularity": "per_row"}}, "granularity"),
        ({"weight": {"bitz": 4}}, "unknown key"),
        ({"include": ["("]}, "not a regex"),
        ({"activation": {"enabled": True, "bits": 4}}, "only 8-bit"),
        ({"module_bits": ["encoder.conv"]}, "not REGEX=BITS"),
        ({"module_bits": ["encoder.conv=16"]}, r"quant.module_bits\['encoder.conv=16'\] = 16"),
        ({"module_bits": ["(=8"]}, "module_bits pattern '\\(' is not a regex"),
        (
            {"module_bits": ["conv=8"], "weight": {"bits": 4, "granularity": "ggml_q4_0"}, "conv": False},
            "a ggml file has one type",
        ),
    ],
)
def test_bad_configs_fail_clearly(cfg, match):
    with pytest.raises(DQWhisperError, match=match):
        resolve_config({"enabled": True, **cfg})


def test_module_bits_first_match_wins_over_embedding_bits():
    cfg = {
        "enabled": True,
        "scope": "all",
        "embedding_bits": 3,
        "module_bits": ["blocks\\.0\\.attn\\.query=8", "blocks\\.0=6", "token_embedding=5"],
        "weight": {"bits": 4},
    }
    model = prepare(make_student(), cfg)
    bits = {n: m.weight_fake_quantizer.spec.bits for n, m in quantized_modules(model)}
    assert bits["encoder.blocks.0.attn.query"] == 8 and bits["decoder.blocks.0.attn.query"] == 8
    assert bits["encoder.blocks.0.mlp.0"] == 6 and bits["encoder.blocks.1.mlp.0"] == 4
    assert bits["decoder.token_embedding"] == 5 and bits["encoder.conv1"] == 4


def test_group_size_not_dividing_width_fails_before_changing_the_model():
    model = make_student()  # d = 64
    with pytest.raises(DQWhisperError, match="group_size 48 does not divide the input width 64"):
        prepare(model, {"enabled": True, "weight": {"granularity": "per_group", "group_size": 48}})
    assert not fq_names(model)


def test_prepare_twice_and_empty_selection_fail():
    model = prepare(make_student(), {"enabled": True})
    with pytest.raises(DQWhisperError, match="already quantized"):
        prepare(model, {"enabled": True})
    with pytest.raises(DQWhisperError, match="selects no module"):
        prepare(make_student(), {"enabled": True, "include": ["nothing_has_this_name"]})


def test_disabled_is_a_no_op():
    model = prepare(make_student(), {"enabled": False})
    assert not fq_names(model) and model.quant_config is None


CONFIGS = {
    "w8": {"enabled": True},
    "w8_tensor_dec": {"enabled": True, "embedding": False, "weight": {"granularity": "per_tensor"}},
    "w4g16_lsq_all": {
        "enabled": True,
        "scope": "all",
        "weight": {"bits": 4, "granularity": "per_group", "group_size": 16, "lsq": True},
    },
    "w3_asym_lsq": {"enabled": True, "scope": "all", "weight": {"bits": 3, "symmetric": False, "lsq": True}},
    "w2_emb4": {
        "enabled": True,
        "embedding_bits": 4,
        "weight": {"bits": 2, "granularity": "per_group", "group_size": 32},
    },
    "w8a8": {"enabled": True, "scope": "all", "activation": {"enabled": True}},
    "w4a8_int8groups": {  # group scales that are integer multiples of a row scale: exact on the int8 kernels
        "enabled": True,
        "scope": "all",
        "weight": {"bits": 4, "lsq": True, "granularity": "per_group_int8", "group_size": 16},
        "activation": {"enabled": True},
    },
    "w4a8_mixed": {  # module_bits: chosen modules at 8 bits, the rest at 4
        "enabled": True,
        "scope": "all",
        "module_bits": ["encoder\\.conv=8", "encoder\\.blocks\\.0\\.attn\\.(query|value)=8"],
        "weight": {"bits": 4, "lsq": True},
        "activation": {"enabled": True},
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_convert_dequant_equals_fake_quant_exactly(name, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), CONFIGS[name])
    with torch.no_grad():
        xa = model.encoder(mel)
        ref = model.decoder(tokens, xa)
        convert(model, "dequant")
        xa2 = model.encoder(mel)
        out = model.decoder(tokens, xa2)
    assert not any(isinstance(m, FAKE_QUANTIZED_TYPES) for m in model.modules())
    # bit-exact: the converted weights are the fake-quant weights (fp16-valued scales, integer codes, same fp32 ops)
    torch.testing.assert_close(xa2, xa, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_quantized_forward_differs_from_float(inputs):
    mel, tokens = inputs
    model = make_student()
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel))
        prepare(model, {"enabled": True, "weight": {"bits": 4}})
        out = model.decoder(tokens, model.encoder(mel))
    keep = torch.isfinite(ref)
    assert not torch.allclose(out[keep], ref[keep])
    assert float((out[keep] - ref[keep]).abs().mean()) < 0.5 * float(ref[keep].abs().mean())


def test_checkpoint_roundtrip_of_prepared_lsq_model(tmp_path, inputs):
    mel, tokens = inputs
    model = prepare(make_student(), CONFIGS["w4g16_lsq_all"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FAKE_QUANTIZED_TYPES):
                m.weight_fake_quantizer.scale.mul_(1.1)  # as if trained: differs from any init
        ref = model.decoder(tokens, model.encoder(mel))
    save_checkpoint(model, tmp_path / "q.pt")
    loaded = load_checkpoint(tmp_path / "q.pt")
    with torch.no_grad():
        out = loaded.decoder(tokens, loaded.encoder(mel))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["fbgemm", "int_mm"])
def test_named_int8_kernel_close_to_dequant(backend, inputs):
    """A weight-only student on an int8-activation kernel when asked by name (auto would keep float activations)."""
    mel, tokens = inputs
    a = prepare(make_student(), {"enabled": True, "scope": "all"})
    b = prepare(make_student(), {"enabled": True, "scope": "all"})
    convert(a, "dequant")
    convert(b, backend)
    assert isinstance(b.decoder.token_embedding, QuantizedEmbedding) and b.decoder.token_embedding.kernel == backend
    assert all(m.kernel == backend for m in b.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        ra = a.decoder(tokens, a.encoder(mel))
        rb = b.decoder(tokens, b.encoder(mel))
    keep = torch.isfinite(ra)
    assert torch.equal(keep, torch.isfinite(rb))
    # int8 per-token activations add an error of at most half a step (1/255 of each token's max) per input
    rel = (rb[keep] - ra[keep]).abs().max() / ra[keep].abs().max()
    assert 0 < float(rel) < 0.05


@pytest.mark.parametrize("backend", ["auto", "fbgemm", "int_mm"])
def test_int8_equals_fake_quant_with_activation_quant(backend, inputs):
    """With 8-bit activation fake-quant the int8 kernels compute the same integers (each linear within a few float32
    roundings of the fake-quant arithmetic: test_kernels.py). Over the whole model the float32 sums of the fake-quant
    reference can land an activation on the other side of a rounding boundary, moving that code by one step (1/255
    of its token's range), so the stated tolerance is 2% of the largest |logit| (measured: at most 0.6% on AVX512
    and emulated AVX2, seeds 0-3), with the argmax kept."""
    mel, tokens = inputs
    model = prepare(make_student(), CONFIGS["w8a8"])
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel))
        convert(model, backend)
        out = model.decoder(tokens, model.encoder(mel))
    if backend != "auto":
        assert all(m.kernel == backend for m in model.modules() if isinstance(m, QuantizedLinear))
    keep = torch.isfinite(ref)
    assert torch.equal(keep, torch.isfinite(out))
    assert float((out[keep] - ref[keep]).abs().max()) <= 0.02 * float(ref[keep].abs().max())
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "conf" / "quant").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_quant_yaml_resolves_and_prepares(path):
    cfg = resolve_config(OmegaConf.merge(OmegaConf.structured(QuantConfig), OmegaConf.load(path)))
    model = prepare(make_student(), cfg)
    assert bool(fq_names(model)) == cfg.enabled


def test_a_training_pass_quantizes_the_tied_embedding_once_with_the_same_gradients(inputs):
    mel, tokens = inputs
    model = prepare(make_student(vocab_keep=None), CONFIGS["w4a8_int8groups"]).train()
    emb = model.decoder.token_embedding
    calls = []
    emb.weight_fake_quantizer.register_forward_hook(lambda *_: calls.append(1))
    xa = model.encoder(mel).detach()

    def grads(one_weight: bool):
        model.zero_grad()
        calls.clear()
        if one_weight:
            logits = model.decoder.forward_features(tokens, xa)[0]
        else:  # the embedding's two uses, each with its own quantization
            h = emb(tokens) + model.decoder.positional_embedding[: tokens.shape[1]]
            for block in model.decoder.blocks:
                h = block(h, xa, mask=model.decoder.mask)
            logits = emb.project(model.decoder.ln(h))
        logits.float().logsumexp(-1).sum().backward()
        q = emb.weight_fake_quantizer
        return len(calls), logits.detach(), emb.weight.grad.clone(), q.scale.grad.clone()

    n1, logits1, gw1, gs1 = grads(True)
    n2, logits2, gw2, gs2 = grads(False)
    assert (n1, n2) == (1, 2)
    assert emb._one_weight is None  # nothing kept after the pass
    torch.testing.assert_close(logits1, logits2, atol=0, rtol=0)
    torch.testing.assert_close(gw1, gw2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gs1, gs2, atol=1e-6, rtol=1e-5)
    assert gw1.abs().sum() > 0 and gs1.abs().sum() > 0
