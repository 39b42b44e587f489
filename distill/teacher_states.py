"""The hidden-state term's teacher: its states for the student's input, the shared prompt prefix computed once.

Every training row of a task starts with the same tokens (the chat template's opening and the
task's system prompt: 40 of the embedded default's 80 prompt tokens), and the frozen teacher's
states there are the same in every row and every step. `TeacherStates` finds the prefix a batch
shares, computes the teacher on it once (one row, then kept), and runs the batch's rows only
from there on, reading the prefix from its keys and values: the teacher's part of a step
shrinks by the shared share of its tokens. A batch that shares too little runs whole.

A row's states never change either (the teacher is frozen and reads the row's fixed tokens), so
with `keep_bytes` they are kept per row, on the host, up to that many bytes: a batch whose rows
were all read before (the second epoch's, every validation pass after the first) is put
together from them without running the teacher. Rows past the limit are computed each time.

    states = TeacherStates(state_teacher(path, hidden, dtype), indices=[1, 5, -1], keep_bytes=2**31)
    targets = states(input_ids, attention_mask)     # [B, L, H] per index, as a full forward's
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# below this many shared tokens a separate prefix pass saves less than it costs to manage
MIN_PREFIX = 8
# prefixes kept: one per system prompt and question form a batch may share in full
KEPT_PREFIXES = 8


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading positions where every row has the same real token ([B, L] right-padded rows)."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else input_ids.shape[1]


class TeacherStates:
    """The frozen teacher decoder's hidden states at `indices` (into Hugging Face's
    `hidden_states`: [0] the embeddings, [i + 1] layer i's output, [-1] the normed last), for a
    right-padded batch; equal to one full forward pass up to floating-point rounding (at padded
    positions, which no loss reads, rows put together from kept states hold zeros)."""

    def __init__(self, decoder: torch.nn.Module, indices: list[int], keep_bytes: int = 0):
        self.decoder = decoder
        self.indices = indices
        self.prefixes: OrderedDict[tuple[int, ...], tuple[list, list[torch.Tensor]]] = OrderedDict()
        self.keep_bytes = keep_bytes
        self.rows: dict[bytes, torch.Tensor] = {}  # a row's real tokens -> its states [indices, tokens, H]
        self.kept_bytes = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        if not self.keep_bytes:
            return self._computed(input_ids, attention_mask)
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu().numpy()
        keys = [ids[i, :n].tobytes() for i, n in enumerate(lengths)]
        if all(key in self.rows for key in keys):
            return self._from_kept(keys, lengths, input_ids)
        states = self._computed(input_ids, attention_mask)
        for i, (key, n) in enumerate(zip(keys, lengths)):
            size = len(states) * n * states[0].shape[-1] * states[0].element_size()
            if key not in self.rows and self.kept_bytes + size <= self.keep_bytes:
                self.rows[key] = torch.stack([s[i, :n] for s in states]).cpu()  # a copy: the batch is not held
                self.kept_bytes += size
        return states

    def _from_kept(self, keys: list[bytes], lengths: list[int], input_ids: torch.Tensor) -> list[torch.Tensor]:
        first = self.rows[keys[0]]
        out = torch.zeros((len(self.indices), *input_ids.shape, first.shape[-1]), dtype=first.dtype)
        for i, (key, n) in enumerate(zip(keys, lengths)):
            out[:, i, :n] = self.rows[key]
        return list(out.to(input_ids.device).unbind(0))

    def _computed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        batch, length = input_ids.shape
        shared = min(shared_prefix_length(input_ids, attention_mask), length - 1)  # a suffix to run
        if batch == 1 or shared < MIN_PREFIX:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return [out.hidden_states[i] for i in self.indices]
        kv, prefix_states = self._prefix(input_ids[0, :shared])
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv],
                             config=self.decoder.config)
        out = self.decoder(input_ids=input_ids[:, shared:], attention_mask=attention_mask, past_key_values=cache,
                           use_cache=True, output_hidden_states=True)
        return [torch.cat([p.expand(batch, -1, -1), out.hidden_states[i]], dim=1)
                for p, i in zip(prefix_states, self.indices)]

    def _prefix(self, ids: torch.Tensor) -> tuple[list, list[torch.Tensor]]:
        """(keys and values per layer, states at `indices`) of one prefix, computed once."""
        key = tuple(ids.tolist())
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            return self.prefixes[key]
        out = self.decoder(input_ids=ids[None], use_cache=True, output_hidden_states=True)
        entry = ([(layer.keys, layer.values) for layer in out.past_key_values.layers],
                 [out.hidden_states[i] for i in self.indices])
        self.prefixes[key] = entry
        if len(self.prefixes) > KEPT_PREFIXES:
            self.prefixes.popitem(last=False)
        return entry
