"""BERT with NarrowBERT and token-drop paths, built on the tensor-parallel layers of `parallel/`.

Reads top-down: layer_norm, embeddings, attention, layer, token_drop, encoder, heads, bert.
"""

from megatron_narrow.model.bert import (
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    PretrainingOutput,
)

__all__ = [
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "PretrainingOutput",
]
