"""Which keys each query may attend, stated as segments, from which every kernel takes the form it needs.

A row of the batch holds one sample (unpacked) or several (packed segments, data.packing=segments); a query
may attend the real keys of its own segment. Dense kernels (`math`, `sdpa`) read the boolean mask
(B, 1, Q or 1, S); the variable-length kernel (`varlen`) reads the segments themselves and computes each
segment's attention alone, so packed rows cost what their real tokens cost instead of what the padded
square costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMask:
    """key_segments (B, S): the segment of each key, 0 on padding (unpacked rows: 1 on every real token).
    query_segments (B, Q): the segment of each query row, or None when every query of a row may attend every
    real key of that row (unpacked rows: whatever the queries are, all tokens, narrow positions or kept
    tokens). A query of segment 0 (a padding row nobody reads) may attend every real key, as unpacked padding
    does: a row with no key at all would make the softmax NaN, and NaN leaks into gradients."""

    key_segments: torch.Tensor
    query_segments: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, mask: AttentionMask | torch.Tensor) -> AttentionMask:
        """A mask as given: an AttentionMask, a key mask (B, S) bool, or a dense per-query mask (B, Q, S)
        bool (its segments unknown: only the dense kernels can use it)."""
        if isinstance(mask, AttentionMask):
            return mask
        if mask.dim() == 2:
            return cls(key_segments=mask.to(torch.int32))
        return cls(key_segments=mask.any(dim=1).to(torch.int32), _dense=mask)

    @property
    def has_segments(self) -> bool:
        """Whether the segments say it all (a mask made from a dense (B, Q, S) tensor does not)."""
        return self._dense is None or self.query_segments is not None

    def dense(self) -> torch.Tensor:
        """(B, 1, Q or 1, S) bool, True where the query may attend the key (broadcast over heads); built once."""
        if self._dense is None:
            keys = self.key_segments != 0
            if self.query_segments is None:
                self._dense = keys[:, None, :]
            else:
                queries, key_ids = self.query_segments.unsqueeze(-1), self.key_segments.unsqueeze(1)
                self._dense = keys.unsqueeze(1) & ((queries == key_ids) | (queries == 0))
        return self._dense[:, None]

    def rows(self, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query segments (B, Q), key segments (B, S)) with the unpacked case written out: every query of a
        row in segment 1, every real key in segment 1."""
        keys = self.key_segments
        if self.query_segments is not None:
            return self.query_segments, keys
        queries = torch.ones(keys.shape[0], num_queries, dtype=keys.dtype, device=keys.device)
        return queries, (keys != 0).to(keys.dtype)
