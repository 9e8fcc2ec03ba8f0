"""Token dropping (Hou et al. 2022): a running per-token-id MLM loss decides which tokens the middle
layers may skip.

The importance vector is a non-trainable buffer (so it lives in every checkpoint): initialised to
`importance_init`, special tokens pinned high and [PAD] pinned low, and updated after each step with
an EMA of the per-target losses, averaged over duplicates of an id in the batch. Sums and counts are
all-reduced over data parallel first, so every replica holds the same vector. It stays float32 when the
model is cast to fp16/bf16: in bf16 an average moving from 10.0 towards 4.0 by 0.5% a step would stall
at 8.0 (the next value rounds back to it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_narrow.parallel import GroupInfo

PINNED_HIGH = 1e4
PINNED_LOW = -1e4


@torch.no_grad()
def tally_target_losses(tally: torch.Tensor | None, target_ids: torch.Tensor, losses: torch.Tensor,
                        valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add one micro-batch's per-target losses to a (2, vocab) float64 tally of per-id sums and counts."""
    ids = target_ids[valid]
    if tally is None:
        tally = torch.zeros(2, vocab_size, dtype=torch.float64, device=ids.device)
    tally[0].index_add_(0, ids, losses[valid].double())
    tally[1].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
    return tally


class TokenImportance(nn.Module):
    """The importance vector, its update and the choice of kept tokens.

    force_targets: keep every MLM target position as well as the special tokens (model.token_drop_force_keep
    = targets); otherwise only tokens whose input id is special are forced, as in the official code."""

    def __init__(self, vocab_size: int, *, special_ids: tuple[int, ...], pad_id: int, init: float = 10.0,
                 beta: float = 0.995, force_targets: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.force_targets = force_targets
        self.special_ids = tuple(i for i in special_ids if i != pad_id)
        self.pad_id = pad_id
        self.register_buffer("importance", torch.full((vocab_size,), float(init)))
        self._pending: torch.Tensor | None = None  # (2, vocab) sums and counts of the step so far
        self._pin()

    def _apply(self, fn, recurse: bool = True):
        """Module casts (.half(), .bfloat16(), DeepSpeed's precision setup) move the vector but keep it float32."""
        importance = self.importance
        super()._apply(fn, recurse)
        if self.importance.dtype != torch.float32:
            self.importance = importance.to(device=self.importance.device, dtype=torch.float32)
        return self

    def _pin(self) -> None:
        self.importance[list(self.special_ids)] = PINNED_HIGH
        self.importance[self.pad_id] = PINNED_LOW

    @torch.no_grad()
    def accumulate(self, target_ids: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor) -> None:
        """Add one micro-batch's per-target losses to this step's per-id sums and counts."""
        self._pending = tally_target_losses(self._pending, target_ids, losses, valid, self.importance.numel())

    @torch.no_grad()
    def apply(self, data_group: GroupInfo, tally: torch.Tensor | None = None) -> None:
        """End of a step: imp[id] = beta * imp[id] + (1 - beta) * mean loss of id's targets in the global batch.

        The tally is this step's accumulate()s, or one passed in: a pipeline's importance lives on the
        stage that drops tokens, its losses on the last stage, which sends the tally over."""
        pending, self._pending = (self._pending if tally is None else tally), None
        if pending is None:
            return
        if data_group.size > 1:
            dist.all_reduce(pending, group=data_group.group)
        sums, counts = pending
        seen = counts > 0
        mean = (sums[seen] / counts[seen]).float()
        self.importance[seen] = self.beta * self.importance[seen] + (1 - self.beta) * mean
        self._pin()

    def update(self, target_ids: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor,
               data_group: GroupInfo) -> None:
        """accumulate + apply: one batch that is a whole step."""
        self.accumulate(target_ids, losses, valid)
        self.apply(data_group)

    def select(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, forced_positions: torch.Tensor | None,
               forced_valid: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence, the k positions to keep, in original order, and which of them are real tokens.

        Special tokens are always kept (and the MLM targets too under force_targets), padding never (while
        real tokens remain); the rest by importance of their id, ties going to the earliest positions (a
        stable sort: torch.topk's order among equal scores is unspecified, and at the start every score is
        equal). Returns kept (B, k) int64 and kept_real (B, k) bool.
        """
        score = self.importance[input_ids].float()  # (B, S), a copy
        score[torch.isin(input_ids, torch.tensor(self.special_ids, device=input_ids.device))] = float("inf")
        if self.force_targets and forced_positions is not None:
            forced = torch.zeros_like(attention_mask, dtype=torch.bool)
            forced.scatter_(1, forced_positions, forced_valid if forced_valid is not None else True)
            score[forced] = float("inf")
        score[attention_mask == 0] = float("-inf")
        ranked = score.argsort(dim=1, descending=True, stable=True)
        kept = ranked[:, :k].sort(dim=1).values  # original order
        return kept, attention_mask.gather(1, kept).bool()
