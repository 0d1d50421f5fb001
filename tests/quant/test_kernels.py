"""The kernel layer (dqwhisper/quant/kernels.py): each backend against the fake-quant arithmetic, and the selection.

Tolerances, per output element y of a linear (y_ref: the fake-quant linear evaluated in float64 on the same input;
A = |x_q| @ |w_q|.T + |bias|, the sum of the magnitudes that enter y):
- float:            0 (the same float32 operations as the fake-quant forward)
- fbgemm, onednn, int_mm, float_codes: 2^-21 * A (exact integer sums, then a few float32 roundings of the rescale
  and the bias add); and the four give the same bits
- weight_only:      K * 2^-24 * A (another float32 summation order: the standard gamma_K bound of a K-term dot)
"""

from __future__ import annotations

import copy

import pytest
import torch

from dqwhisper.quant import convert, prepare
from dqwhisper.quant import kernels
from dqwhisper.quant.quantized import QuantizedEmbedding, QuantizedLinear, expected_rows, select_kernels
from tests.quant.conftest import make_student

W8A8 = {
    "enabled": True,
    "scope": "all",
    "embedding": True,
    "weight": {"bits": 8, "lsq": False},
    "activation": {"enabled": True, "bits": 8},
}
W4 = {"enabled": True, "scope": "all", "embedding": True, "weight": {"bits": 4, "lsq": True}}
W4A8_INT8_GROUPS = {
    "enabled": True,
    "scope": "all",
    "weight": {"bits": 4, "lsq": True, "granularity": "per_group_int8", "group_size": 16},
    "activation": {"enabled": True},
}


def _capture(model, mel, tokens):
    """{module name: (input, output)} of every quantized linear / tied projection during one forward."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, (i[0], o))))
        elif isinstance(m, QuantizedEmbedding):
            original = m.project

            def project(x, original=original, n=name):
                y = original(x)
                seen[n] = (x, y)
                return y

            m.project = project
    with torch.no_grad():
        model.decoder(tokens, model.encoder(mel))
    for h in hooks:
        h.remove()
    return seen


def _reference(module, x):
    """(y_ref, A) in float64 for the fake-quant arithmetic of `module` on input x (int8 activations when the
    module was trained with them or its kernel quantizes them)."""
    w = module.quantized_tensor().dequantize().double()
    if module.act_quant or module.kernel in kernels.INT8_ACTIVATION:
        q, s = kernels.quantize_tokens(x.reshape(-1, x.shape[-1]))
        xq = (q.double() * s.double()).reshape(x.shape)
    else:
        xq = x.double()
    bias = getattr(module, "bias", None)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return xq @ w.t() + b, xq.abs() @ w.abs().t() + b.abs()


needs_onednn = pytest.mark.skipif(not kernels.onednn_exact(), reason="no exact oneDNN int8 linear on this CPU")


@pytest.mark.parametrize(
    "backend", ["fbgemm", pytest.param("onednn", marks=needs_onednn), "int_mm", "float_codes", "weight_only"]
)
@pytest.mark.parametrize("config", ["w8a8", "w4", "w4a8_int8groups"])
def test_backend_within_its_stated_tolerance_of_the_fake_quant_arithmetic(backend, config, inputs):
    mel, tokens = inputs
    cfg = {"w8a8": W8A8, "w4": W4, "w4a8_int8groups": W4A8_INT8_GROUPS}[config]
    model = convert(prepare(make_student(), cfg), backend)
    seen = _capture(model, mel, tokens)
    ran = 0
    for name, m in model.named_modules():
        if name not in seen or m.kernel != backend:
            continue
        ran += 1
        x, y = seen[name]
        ref, mag = _reference(m, x)
        k = x.shape[-1]
        tol = (2.0**-21 if backend in kernels.INT8_ACTIVATION else k * 2.0**-24) * mag
        err = (y.double() - ref).abs()
        assert bool((err <= tol).all()), f"{name}: error {float(err.max()):.3g} over its bound"
    assert ran >= 20  # every linear of the tiny model plus the projection ran this backend


def test_fbgemm_split_for_cpus_without_vnni_is_exact(monkeypatch):
    """Without VNNI fbgemm's int16 pair sums saturate; 8-bit weights then run on two halves of the codes. Forced
    here so that the split is checked on every CPU (on an AVX2 CPU the plain path would be off by ~1e5)."""
    monkeypatch.setattr(kernels, "_SATURATES", True)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
    w[0] = 127  # the worst case: every product at its largest
    s = torch.rand(64, generator=g) + 0.5
    x = torch.randn(5, 256, generator=g)
    x[0] = 3.0
    kernel = kernels.FbgemmKernel(w, s)
    assert kernel.split
    q, sx = kernels.quantize_tokens(x)
    acc = q.double() @ w.double().t()  # exact; every |sum| here stays below 2^24
    assert float(acc.abs().max()) < 2**24
    torch.testing.assert_close(kernel(x, None), acc.float().mul(s).mul(sx), atol=0, rtol=0)


def test_float_kernel_equals_fake_quant_bit_for_bit(inputs):
    mel, tokens = inputs
    model = prepare(make_student(), W8A8)
    with torch.no_grad():
        ref = model.decoder(tokens, model.encoder(mel))
        convert(model, "float")
        out = model.decoder(tokens, model.encoder(mel))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_auto_keeps_float_activations_for_a_weight_only_student(inputs):
    model = convert(prepare(make_student(), W4), "auto")
    chosen = {m.kernel for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert chosen <= {"float", "weight_only"}
    assert model.kernel_choices and all("float" in t for _, t in model.kernel_choices.values())


def test_auto_picks_a_measured_kernel_at_least_10_percent_faster_than_float():
    model = convert(prepare(make_student(), W4), "auto")  # weight-only: float unless clearly beaten
    for name, (backend, times) in model.kernel_choices.items():
        assert backend in times
        if backend != "float":
            assert times[backend] <= kernels.MARGIN * times["float"], name
            assert times[backend] == min(times.values()), name


def test_auto_picks_the_fastest_int8_kernel_for_int8_activations_whatever_float_takes():
    """The int8 backends give the same bits; float's sums round, so choosing it by timing would change transcripts."""
    model = convert(prepare(make_student(), W8A8), "auto")
    for name, (backend, times) in model.kernel_choices.items():
        int8 = {n: t for n, t in times.items() if n in kernels.INT8_ACTIVATION}
        assert int8, name  # fbgemm or float_codes runs every w8a8 weight of the tiny model
        assert backend in int8 and times[backend] == min(int8.values()), name


@pytest.mark.parametrize(
    "saturates,cfg,steps_race_codes",
    [(False, W8A8, False), (True, W8A8, True), (True, W4A8_INT8_GROUPS, False)],
    ids=["vnni", "no-vnni-8bit", "no-vnni-4bit"],
)
def test_decoder_step_shapes_race_int8_kernels_only(saturates, cfg, steps_race_codes, monkeypatch):
    """float_codes (4x the weight bytes of int8) is not raced on calls of at most STEP_ROWS rows when an int8
    kernel runs the weight in one pass (a decoder step streams its weights from memory, which a hot-cache race does
    not see); the encoder's and the cross-attention keys' calls still race it. Without VNNI fbgemm runs 8-bit weights
    as two GEMMs: then float_codes races on decoder-step shapes too (4-bit weights still run in one)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm engine in this torch")
    monkeypatch.setattr(kernels, "_SATURATES", saturates)
    monkeypatch.setattr(kernels, "has_fast_kernel", lambda name: name == "fbgemm")  # the same candidates on any CPU
    kernels._TIMES.clear()
    model = convert(prepare(make_student(), cfg), "auto")
    kernels._TIMES.clear()
    n_ctx = model.dims.n_audio_ctx
    for name, (backend, times) in model.kernel_choices.items():
        rows = expected_rows(name, n_ctx, 1)
        assert ("float_codes" in times) is (rows > kernels.STEP_ROWS or steps_race_codes), (name, rows, times)
        if rows <= kernels.STEP_ROWS and not steps_race_codes:
            assert backend == "fbgemm", name


def test_named_kernel_overrides_auto_and_falls_back_to_float_where_it_cannot_run():
    cfg = copy.deepcopy(W4)
    cfg["weight"] = {"bits": 4, "granularity": "per_group", "group_size": 16, "lsq": False}
    model = convert(prepare(make_student(), cfg), "int_mm")  # per-group scales: no int8 row form
    assert {m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)} == {"float"}
    counts = select_kernels(convert(prepare(make_student(), W4), "float"), "fbgemm")
    assert counts == {"fbgemm": sum(counts.values())}


def test_expected_rows_follow_the_module_role():
    assert expected_rows("encoder.blocks.0.mlp.0", 100, 2) == 200
    assert expected_rows("decoder.blocks.1.cross_attn.key", 100, 2) == 200
    assert expected_rows("decoder.blocks.1.attn.query", 100, 2) == 2
    assert expected_rows("decoder.token_embedding", 100, 3) == 3


def test_decode_kernel_names_match_the_kernel_layer():
    from dqwhisper.decoding import KERNELS

    assert KERNELS == kernels.CHOICES


def _awkward_activations(rows: int = 37, k: int = 96) -> torch.Tensor:
    """Rows that stress the per-token codes: ties at .5 after scaling, a zero row, one sign only, large values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[0] = 0.0
    x[1] = x[1].abs()
    x[2] = -x[2].abs()
    x[3] = torch.arange(k) - 48.0  # max |x| 48: codes 127.5 / 48 * j land on .5 ties
    x[4, ::2] = -0.0
    return x


def test_quantize_tokens_equals_the_fake_quant_per_token_codes_bit_for_bit():
    from dqwhisper.quant.fake_quant import quantize_per_token

    x = _awkward_activations()
    for rows in (x, x[:5]):  # many rows and the decoder's few take different paths to max |x|
        q, s = kernels.quantize_tokens(rows)
        q_ref, s_ref = quantize_per_token(rows, 8)
        torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
        torch.testing.assert_close(q, q_ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["int_mm", "fbgemm", pytest.param("onednn", marks=needs_onednn), "float_codes"])
def test_int8_kernels_equal_their_integer_formula_bit_for_bit(backend):
    """Every int8-activation backend gives the bits of one formula: the exact integer sum as float32, times the row
    scale, times the token scale, plus the bias. So auto's timing-dependent choice among them never changes an
    output."""
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-8, 8, (40, 96), dtype=torch.int8, generator=g)
    row_scale = torch.rand(40, generator=g) * 1e-2
    bias = torch.randn(40, generator=g)
    x = _awkward_activations()
    q, s = kernels.quantize_tokens(x)
    acc = q.double() @ w.double().t()  # exact: every product and sum is an integer far below 2^53
    want = acc.float() * row_scale * s + bias
    kernel = {
        "int_mm": kernels.IntMMKernel,
        "fbgemm": kernels.FbgemmKernel,
        "onednn": kernels.OnednnKernel,
        "float_codes": kernels.FloatCodesKernel,
    }
    y = kernel[backend](w, row_scale)(x.reshape(1, 37, 96), bias).reshape(37, 40)
    torch.testing.assert_close(y, want, atol=0, rtol=0)


@needs_onednn
def test_onednn_sums_full_range_codes_exactly():
    """8-bit weights at +-127/-128 against activation codes at both ends: where int16 pair sums would saturate."""
    g = torch.Generator().manual_seed(6)
    w = torch.randint(-128, 128, (48, 512), dtype=torch.int8, generator=g)
    w[0], w[1] = 127, -128
    s = torch.rand(48, generator=g) + 0.5
    x = torch.randn(9, 512, generator=g)
    x[0], x[1] = 5.0, -5.0
    q, sx = kernels.quantize_tokens(x)
    acc = q.double() @ w.double().t()
    assert float(acc.abs().max()) < 2**24
    torch.testing.assert_close(kernels.OnednnKernel(w, s)(x, None), acc.float().mul(s).mul(sx), atol=0, rtol=0)


def test_onednn_is_not_built_where_its_sums_are_not_exact(monkeypatch):
    monkeypatch.setattr(kernels, "_ONEDNN_EXACT", False)
    qt = prepare(make_student(), W8A8)
    linear = next(m for m in convert(qt, "onednn").modules() if isinstance(m, QuantizedLinear))
    assert linear.kernel == "float"
    assert "onednn" not in kernels.candidates(True)


def test_float_codes_is_built_only_where_its_float_sums_are_exact():
    """At most two blocks of input features, each summing exactly (block * 128 * max |code| <= 2^24)."""
    g = torch.Generator().manual_seed(5)
    ok = torch.randint(-64, 65, (8, 2048), dtype=torch.int8, generator=g)  # 2048 * 128 * 64 = 2^24: one block
    assert kernels.FloatCodesKernel.exact(ok) and not kernels.FloatCodesKernel(ok, torch.ones(8)).half
    wide = torch.full((8, 2048), 127, dtype=torch.int8)  # blocks of 1032: two
    assert kernels.FloatCodesKernel.exact(wide) and kernels.FloatCodesKernel(wide, torch.ones(8)).half == 1024
    assert not kernels.FloatCodesKernel.exact(torch.full((8, 2065), 127, dtype=torch.int8))
    ok = torch.cat([ok, ok], 1)
    assert kernels.FloatCodesKernel.exact(ok)  # 4096 at 64: two blocks of 2048
    ok[3, 7] = -128  # int8's abs(-128) is -128: the bound must still see 128 (blocks of 1024)
    assert not kernels.FloatCodesKernel.exact(ok)


@pytest.mark.parametrize("split", [False, True])
def test_float_codes_in_two_blocks_equal_fbgemm_bit_for_bit(split, monkeypatch):
    """8-bit codes at K = 2048 (the encoder's second FFN linear), with integer sums past 2^24 (where float32 rounds):
    float_codes' two exact block sums, added once, give fbgemm's bits (one GEMM with VNNI, two without)."""
    if not split and kernels.fbgemm_saturates():
        pytest.skip("fbgemm saturates int16 pair sums on this CPU (no VNNI): it runs 8-bit weights only split")
    monkeypatch.setattr(kernels, "_SATURATES", split)
    g = torch.Generator().manual_seed(8)
    w = torch.randint(-128, 128, (24, 2048), dtype=torch.int8, generator=g)
    w[0], w[1], w[2] = 127, -128, 127
    w[2, 0] = 126  # against codes of 127: an odd sum past 2^24, which float32 rounds
    s = torch.rand(24, generator=g) + 0.5
    x = torch.randn(7, 2048, generator=g)
    x[0], x[1] = 5.0, -5.0
    q, sx = kernels.quantize_tokens(x)
    acc = q.double() @ w.double().t()
    assert (acc.float().double() != acc).any()  # sums past 2^24 that float32 rounds: the blocks' addition must too
    codes, fb = kernels.FloatCodesKernel(w, s), kernels.FbgemmKernel(w, s)
    assert codes.half == 1024 and fb.split is split
    want = acc.float().mul(s).mul(sx)
    torch.testing.assert_close(codes(x, None), want, atol=0, rtol=0)
    torch.testing.assert_close(fb(x, None), want, atol=0, rtol=0)


def test_fbgemm_splits_a_weight_whose_only_large_code_is_minus_128(monkeypatch):
    monkeypatch.setattr(kernels, "_SATURATES", True)
    w = torch.ones(4, 64, dtype=torch.int8)
    w[1, 2] = -128
    assert kernels.FbgemmKernel(w, torch.ones(4)).split


def test_auto_output_does_not_depend_on_which_int8_kernel_wins(inputs, monkeypatch):
    """A model trained with int8 activations decodes to the same bits whichever int8 backend auto times fastest
    (the choice varies with machine load): each forced in turn, as if it had won every race."""
    mel, tokens = inputs
    model = prepare(make_student(), W4A8_INT8_GROUPS)
    outs = {}
    backends = (
        ("fbgemm", "onednn", "int_mm", "float_codes") if kernels.onednn_exact() else ("fbgemm", "int_mm", "float_codes")
    )
    for backend in backends:
        kernels._TIMES.clear()
        monkeypatch.setattr(kernels, "race", lambda fns, b=backend, **kw: {n: (1.0 if n == b else 2.0) for n in fns})
        monkeypatch.setattr(kernels, "has_fast_kernel", lambda name: True)
        monkeypatch.setattr(kernels, "STEP_ROWS", 0)  # float_codes may win decoder-step shapes too, here
        m = convert(copy.deepcopy(model), "auto")
        assert {q.kernel for q in m.modules() if isinstance(q, QuantizedLinear)} == {backend}
        with torch.no_grad():
            outs[backend] = m.decoder(tokens, m.encoder(mel))
    kernels._TIMES.clear()
    for backend in backends:
        torch.testing.assert_close(outs[backend], outs["fbgemm"], atol=0, rtol=0)


def test_fbgemm_is_a_candidate_wherever_torch_has_its_engine(monkeypatch):
    """No timing probe decides fbgemm (on AVX2 it is ~1.5x float on the probe's small shape, and a noisy probe used
    to drop it for the whole model); the per-shape race does."""

    def no_race(*args, **kwargs):
        raise AssertionError("fbgemm's candidacy must not be timed")

    monkeypatch.setattr(kernels, "race", no_race)
    monkeypatch.setattr(kernels, "_FAST", {"int_mm": False, "weight_only": False})  # as if probed already
    monkeypatch.setattr(kernels, "_ONEDNN_EXACT", False)
    expected = "fbgemm" in torch.backends.quantized.supported_engines
    assert kernels.has_fast_kernel("fbgemm") is expected
    assert kernels.candidates(True) == (["fbgemm"] if expected else []) + ["float_codes"]


def test_race_times_a_candidate_thousands_of_times_slower_only_once():
    """A reference kernel that takes seconds a call (oneDNN's ref_int8 without AMX) costs two calls (one warm-up, one
    timed), not rounds of them: loading a model used to take 4 minutes on such a CPU."""
    now, calls = [0.0], {"float": 0, "fast": 0, "reference": 0}
    cost = {"float": 1e-3, "fast": 5e-4, "reference": 1.0}

    def fn(name):
        def run():
            calls[name] += 1
            now[0] += cost[name]

        return run

    times = kernels.race({n: fn(n) for n in cost}, clock=lambda: now[0])
    assert calls["reference"] == 2  # one untimed, one timed call
    assert times["reference"] == pytest.approx(1.0)
    assert times["fast"] == pytest.approx(5e-4) and times["float"] == pytest.approx(1e-3)
    assert calls["fast"] > 5 and calls["float"] > 5


def test_onednn_is_a_candidate_only_where_it_runs_a_real_kernel(monkeypatch):
    """oneDNN sums exactly on an AMD EPYC with AVX512-VNNI but runs its reference kernel there (~1000x float): the
    speed probe, not exactness alone, decides its candidacy. With AMX its per-call overhead made it 2.3x (and once 9x)
    float on the probe's small shape while it is 0.2-0.5x on the encoder's: between 2x and REFERENCE_KERNEL x the
    probe looks again on 512 rows, and a reference kernel costs no second look."""
    monkeypatch.setattr(kernels, "_ONEDNN_EXACT", True)
    monkeypatch.setattr(kernels, "OnednnKernel", lambda w, s: kernels.FloatKernel(w.float() * s[:, None], True))
    # (time on 64 rows, time on 512 rows or None where it must not be probed, expected); float takes 1.0
    cases = ((1000.0, None, False), (0.5, None, True), (9.3, 0.4, True), (2.3, 3.0, False))
    for small, large, expected in cases:
        monkeypatch.setattr(kernels, "_FAST", {})
        rows_seen = []

        def probe(backend, rows, small=small, large=large):
            rows_seen.append(rows)
            assert rows == 64 or large is not None, "a second probe after a clear answer"
            return (small if rows == 64 else large), 1.0

        monkeypatch.setattr(kernels, "_probe", probe)
        assert kernels.has_fast_kernel("onednn") is expected
        assert rows_seen == ([64] if large is None else [64, 512])
    monkeypatch.setattr(kernels, "_ONEDNN_EXACT", False)
    monkeypatch.setattr(kernels, "_FAST", {})
    assert kernels.has_fast_kernel("onednn") is False


def _cached_steps(model, mel, tokens, n=3):
    """(encoder output, logits of the prompt and of n greedy kv-cached steps)."""
    with torch.no_grad():
        xa = model.encoder(mel)
        cache, hooks = model.install_kv_cache_hooks()
        steps = [model.decoder(tokens, xa, kv_cache=cache)]
        for _ in range(n):
            steps.append(model.decoder(steps[-1][:, -1:].argmax(-1), xa, kv_cache=cache))
        for h in hooks:
            h.remove()
    return xa, steps


@pytest.mark.parametrize(
    "backend", ["fbgemm", "fbgemm-split", pytest.param("onednn", marks=needs_onednn), "int_mm", "float_codes"]
)
def test_fused_query_key_value_give_the_same_bits_as_three_gemms(backend, inputs, monkeypatch):
    """Each self-attention's query/key/value as one GEMM (quantized.FusedProjection): the encoder's output and every
    kv-cached decoder step equal the unfused model's bit for bit; the fused GEMM ran (never the key's or value's own
    kernel), and the cross-attentions stay unfused."""
    if backend == "fbgemm-split":  # a CPU without VNNI: the fused weight runs as two GEMMs (its codes exceed 64)
        monkeypatch.setattr(kernels, "_SATURATES", True)
        backend = "fbgemm"
    mel, tokens = inputs
    model = convert(prepare(make_student(), W8A8), backend)
    select_kernels(model, backend, fuse=False)
    assert all(getattr(m, "fused", None) is None for m in model.modules())
    unfused = _cached_steps(model, mel, tokens)
    select_kernels(model, backend, fuse=True)
    groups = {id(m.fused[0]): m.fused[0] for m in model.modules() if getattr(m, "fused", None) is not None}
    n_self = len(model.encoder.blocks) + len(model.decoder.blocks)
    assert len(groups) == n_self
    assert all(b.cross_attn.query.fused is None for b in model.decoder.blocks)
    calls = []
    for g in groups.values():
        monkeypatch.setattr(g.kernel, "matmul", lambda x, f=g.kernel.matmul: calls.append(1) or f(x))
    for name, m in model.named_modules():
        if name.endswith(("attn.key", "attn.value")) and not name.endswith(("cross_attn.key", "cross_attn.value")):
            monkeypatch.setattr(m, "own", lambda x, n=name: pytest.fail(f"{n} ran its own kernel"))
    fused = _cached_steps(model, mel, tokens)
    assert torch.equal(fused[0], unfused[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], unfused[1]))
    assert len(calls) == len(model.encoder.blocks) + 4 * len(model.decoder.blocks)  # encoder once; prompt + 3 steps


def test_a_fused_key_on_another_input_runs_its_own_kernel(inputs):
    """key(x) answers from the fused GEMM only for the tensor query(x) saw, unchanged since; else its own kernel."""
    model = convert(prepare(make_student(), W8A8), "fbgemm")
    attn = model.encoder.blocks[0].attn
    x = torch.randn(1, 5, attn.query.in_features)
    with torch.no_grad():
        want = [attn.key.own(x), attn.key.own(x + 1), attn.value.own(x)]
        attn.query(x)
        other = attn.key(x + 1)
        x.add_(0)  # an in-place change: the query's outputs are no longer x's
        stale = attn.value(x)
    assert attn.key.fused is not None
    assert torch.equal(other, want[1])
    assert torch.equal(stale, want[2])


def test_fused_projections_run_unfused_on_inference_tensors(inputs):
    """Under torch.inference_mode tensors have no version counter: each projection runs its own kernel, the same
    bits as the fused path under no_grad."""
    mel, tokens = inputs
    model = convert(prepare(make_student(), W8A8), "fbgemm")
    assert model.encoder.blocks[0].attn.query.fused is not None
    want = _cached_steps(model, mel, tokens)
    with torch.inference_mode():
        got = _cached_steps(model, mel, tokens)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_fused_projection_outputs_are_per_thread(inputs, monkeypatch):
    """Another thread's query(x') between one thread's query(x) and key(x): each thread gets its own input's
    columns from the fused GEMM (neither falls back to the key's own kernel)."""
    import threading

    model = convert(prepare(make_student(), W8A8), "fbgemm")
    attn = model.encoder.blocks[0].attn
    xs = [torch.randn(1, 5, attn.query.in_features, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want = [attn.key.own(x) for x in xs]
        monkeypatch.setattr(attn.key, "own", lambda x: pytest.fail("the key ran its own kernel"))
        got = [None, None]
        attn.query(xs[0])
        other = threading.Thread(target=lambda: (attn.query(xs[1]), got.__setitem__(1, attn.key(xs[1]))))
        other.start()
        other.join()
        got[0] = attn.key(xs[0])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_model_with_fused_projections_deep_copies(inputs):
    """copy.deepcopy of an exported model with fused projections: the copy's fused groups are its own and give the
    original's bits."""
    mel, tokens = inputs
    model = convert(prepare(make_student(), W8A8), "fbgemm")
    model.encoder.blocks[0].attn.query(torch.randn(1, 3, model.encoder.blocks[0].attn.query.in_features))  # pending
    twin = copy.deepcopy(model)
    group, twin_group = model.encoder.blocks[0].attn.key.fused[0], twin.encoder.blocks[0].attn.key.fused[0]
    assert twin_group is not group and twin_group.biases[0] is twin.encoder.blocks[0].attn.query.bias
    want, got = _cached_steps(model, mel, tokens), _cached_steps(twin, mel, tokens)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
