"""bench/interop.py's runaway count: the rule of our decoder (token cap or compression ratio > 2.4)."""

from bench.interop import MAX_NEW, runaways


def test_runaways_cap_and_repetition():
    texts = {
        "ok": "das ist ein ganz normaler satz",
        "cap": "x",
        "loop": "ja ja ja " * 40,
        "empty": "",
    }
    ids = {"ok": [1, 2, 3], "cap": [7] * MAX_NEW, "loop": [5] * 120, "empty": []}
    assert runaways(ids, texts) == ["cap", "loop"]
