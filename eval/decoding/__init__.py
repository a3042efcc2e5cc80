"""Constrained decoding shared by every generator (TIGER's semantic IDs, the LLM's titles).

| module | holds |
|---|---|
| `trie` | `Trie`: the valid output sequences as dense CSR tables; masking and advancing; `live_nodes` (per-example pruning) |
| `beam` | `beam_search`: one jitted beam search (HF semantics) driven by a step function |
| `sample` | `decode`: greedy and sampled decoding (temperature, top-k, top-p) by the same step function |

A generator supplies `step_fn(tokens, cache, t) -> (logits, cache)` and the logits after
its prefix; the search code knows no model.
"""

from eval.decoding.beam import beam_search, gather_rows
from eval.decoding.sample import decode, filter_logits
from eval.decoding.trie import Trie, TrieArrays

__all__ = ["Trie", "TrieArrays", "beam_search", "decode", "filter_logits", "gather_rows"]
