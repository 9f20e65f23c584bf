"""Named Llama architectures the benchmarks build or compile for: sizes only, no weights (the
random-weight models of bench_decode.py, the launches of compile_sm90.py)."""

from __future__ import annotations

import collections

# The river ModelConfig fields a shape fixes, under ModelConfig's own names (a shape passes
# straight to it); max_position_embeddings is the context window, the graph runner's capacity.
Shape = collections.namedtuple(
    "Shape",
    "hidden_size intermediate_size num_layers num_heads num_kv_heads head_dim vocab_size "
    "tie_word_embeddings max_position_embeddings",
)

# The HF configs' sizes (rope scaling left out: it changes no cost), in Shape's field order:
#                    hidden inter layers heads kv head_dim vocab  tied   window
SMOLLM2_135M = Shape(576, 1536, 30, 9, 3, 64, 49152, True, 8192)
LLAMA_3_2_1B = Shape(2048, 8192, 16, 32, 8, 64, 128256, True, 131072)
LLAMA_3_1_8B = Shape(4096, 14336, 32, 32, 8, 128, 128256, False, 131072)
TINY = Shape(64, 128, 4, 4, 2, 16, 256, True, 256)  # the CPU smoke test's
