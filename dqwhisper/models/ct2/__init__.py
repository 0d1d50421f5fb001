"""CTranslate2 (faster-whisper) Whisper models <-> openai-whisper state dicts, by concern:

    binfile.py      model.bin read/write (CT2ModelFile, Int8Weight), join_parts
    names.py        CT2 variable names <-> openai parameter names
    to_openai.py    ct2_to_openai(dir) -> (dims, state_dict), load_ct2_model
    from_openai.py  openai_to_ct2(dims, state_dict, out_dir, ...), openai_to_ct2_variables
    tokenizer.py    vocabulary.txt, config.json, a matching tokenizer.json

`model.bin` layout (ctranslate2 4.x, binary version 6, little-endian):
    u32 version | str spec name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dims | u8 dtype | u32 n_bytes | raw row-major bytes)
    u32 n_aliases | n_aliases x (str alias | str target)
where a str is a u16 length that counts a trailing NUL, then the bytes and the NUL. Variables are sorted by name.

Naming (CT2 -> openai): see `names.layer_pairs`. The fused self-attention `linear_0` is q|k|v stacked by rows with a
zero key bias (openai's key projection has no bias: a key bias adds the same amount to every score of a query and
cancels in the softmax); the cross-attention `linear_1` is k|v. The output projection is tied to the token
embedding through the alias `decoder/projection/weight -> decoder/embeddings/weight`.

Quantized weights follow CTranslate2's convention: an int8 tensor `q` plus a float32 `<name>_scale` with one value
per output row (per output channel for convolutions), such that `w ~= q / scale` (scale = 127 / max|row|).

Pruned vocabularies (DQWhisper `decoder.vocab_keep`): CT2 needs every token id, so the exporter expands the
embedding with zero rows for pruned ids and writes a projection bias of `PRUNED_LOGIT` at those ids (0 elsewhere),
so CT2 never emits them; the pruned ids are also added to config.json's `suppress_ids`. Such a model is one-way:
`ct2_to_openai` refuses a projection bias.
"""

from dqwhisper.models.ct2.binfile import (
    BINARY_VERSION,
    PRUNED_LOGIT,
    SPEC_NAME,
    SPEC_REVISION,
    CT2ModelFile,
    Int8Weight,
    join_parts,
    model_bin_bytes,
    read_model_bin,
    write_model_bin,
)
from dqwhisper.models.ct2.from_openai import QUANTIZATIONS, openai_to_ct2, openai_to_ct2_variables, quantize_int8_rows
from dqwhisper.models.ct2.to_openai import ct2_to_openai, load_ct2_model, read_ct2_config, set_alignment_heads
from dqwhisper.models.ct2.tokenizer import find_tokenizer_dir, vocabulary_lines, whisper_config, whisper_tokenizer_for

__all__ = [
    "BINARY_VERSION",
    "PRUNED_LOGIT",
    "SPEC_NAME",
    "SPEC_REVISION",
    "CT2ModelFile",
    "Int8Weight",
    "join_parts",
    "model_bin_bytes",
    "read_model_bin",
    "write_model_bin",
    "QUANTIZATIONS",
    "openai_to_ct2",
    "openai_to_ct2_variables",
    "quantize_int8_rows",
    "ct2_to_openai",
    "load_ct2_model",
    "read_ct2_config",
    "set_alignment_heads",
    "find_tokenizer_dir",
    "vocabulary_lines",
    "whisper_config",
    "whisper_tokenizer_for",
]
