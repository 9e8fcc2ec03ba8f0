"""NarrowBERT (sparse queries) for Hugging Face transformers, in the official NarrowBERT's layout: BertForMaskedLM's
parameter names, with the narrow layers in a second stack (`bert.encoder_narrow.layer.j` is layer F + j).

The first `config.full_length_layers` layers are ordinary BERT layers over all positions; their output
is the context C. Each later ("narrow") layer keeps its own weights and computes queries only for the
query rows, keys and values from C for all positions (padding masked), then attention output,
residual, LayerNorm and FFN on the query rows only; the MLM head runs on those rows.

With `query_positions=None` every position is a query row (logits (B, S, V)), so the fill-mask
pipeline works; the narrow layers still read K/V from C, so this is NarrowBERT, not BERT.

Self-contained (imports only torch, transformers and its sibling configuration file): it is copied
next to exported weights and loaded with `trust_remote_code=True`.
"""

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput, TokenClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertLayer,
    BertOnlyMLMHead,
    BertPooler,
    BertPreTrainedModel,
    eager_attention_forward,
)
from transformers.pytorch_utils import apply_chunking_to_forward
from transformers.utils.generic import can_return_tuple

from .configuration_narrow_bert import NarrowBertConfig


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, S, H) at (B, Q) positions -> (B, Q, H)"""
    return torch.take_along_dim(hidden, positions[..., None], dim=1)


def narrow_layer_forward(layer: BertLayer, queries: torch.Tensor, context: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A BertLayer whose queries are `queries` (B, Q, H) and whose keys/values come from `context` (B, S, H)."""
    attn = layer.attention.self
    d = attn.attention_head_size
    q = attn.query(queries).view(*queries.shape[:-1], -1, d).transpose(1, 2)  # (B, h, Q, d)
    k = attn.key(context).view(*context.shape[:-1], -1, d).transpose(1, 2)  # (B, h, S, d)
    v = attn.value(context).view(*context.shape[:-1], -1, d).transpose(1, 2)  # (B, h, S, d)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=attn.dropout.p if attn.training else 0.0,
                       scaling=attn.scaling)  # (B, Q, h, d)
    out = layer.attention.output(out.reshape(*queries.shape[:-1], -1), queries)  # (B, Q, H)
    return apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward, layer.seq_len_dim, out)


class NarrowBertPreTrainedModel(BertPreTrainedModel):
    config_class = NarrowBertConfig


class BertLayerStack(nn.Module):
    """Consecutive BertLayers under `.layer`, as the official NarrowBERT keeps its two stacks."""

    def __init__(self, config: NarrowBertConfig, indices: range):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, layer_idx=i) for i in indices])


class NarrowBertModel(NarrowBertPreTrainedModel):
    """Embeddings, the full-length layers (`encoder`) and the narrow layers (`encoder_narrow`: the official
    NarrowBERT's names); returns hidden states at the query rows. The pooler, when added, is applied by the
    sequence classifier to the [CLS] row."""

    def __init__(self, config: NarrowBertConfig, add_pooling_layer: bool = False):
        super().__init__(config)
        full, total = config.full_length_layers, config.num_hidden_layers
        if not 0 <= full <= total:
            raise ValueError(f"full_length_layers={full} is out of range [0, num_hidden_layers={total}]")
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertLayerStack(config, range(full))
        self.encoder_narrow = BertLayerStack(config, range(full, total))
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, query_positions: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids, attention_mask (B, S) 1 = real -> (B, Q, H) at query_positions, or (B, S, H)."""
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        self_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.encoder.layer:
            hidden = layer(hidden, self_mask)
        context = hidden  # C: fixed from here on
        queries = context if query_positions is None else gather_rows(context, query_positions)
        if len(self.encoder_narrow.layer):
            # (B, 1, Q, S) key-padding mask in the form the configured attention implementation expects
            cross_mask = create_bidirectional_mask(config=self.config, inputs_embeds=queries,
                                                   attention_mask=attention_mask, encoder_hidden_states=context)
            for layer in self.encoder_narrow.layer:
                queries = narrow_layer_forward(layer, queries, context, cross_mask)
        return queries


class QueryRowsForward:
    """The forward of the heads that give one row of logits per query position (masked LM, token tags):
    `head` maps the encoder's query rows to logits, `output_class` is the Hugging Face output."""

    output_class: type

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                query_positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **kwargs):
        r"""
        query_positions (`torch.LongTensor` of shape `(batch_size, num_queries)`, *optional*):
            Positions whose logits to compute (the narrow layers and the head run on these rows only).
            None: every position, logits of shape `(batch_size, sequence_length, num_outputs)`.
        labels (`torch.LongTensor`, *optional*):
            Aligned with the logits: `(batch_size, sequence_length)` as for Hugging Face's BERT heads, or
            `(batch_size, num_queries)` when query_positions is given; -100 is ignored.
        """
        hidden = self.bert(input_ids, attention_mask, token_type_ids, query_positions, position_ids)
        logits = self.head(hidden)  # (B, Q, outputs) or (B, S, outputs)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
        return self.output_class(loss=loss, logits=logits)


class NarrowBertForMaskedLM(QueryRowsForward, NarrowBertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: NarrowBertConfig):
        super().__init__(config)
        self.bert = NarrowBertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    output_class = MaskedLMOutput

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls(hidden)


class NarrowBertClassifierBase(NarrowBertPreTrainedModel):
    """NarrowBERT + dropout + a linear classifier on its query rows (BERT's names: bert, classifier)."""

    add_pooling_layer = False

    def __init__(self, config: NarrowBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = NarrowBertModel(config, add_pooling_layer=self.add_pooling_layer)
        rate = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if rate is None else rate)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class NarrowBertForSequenceClassification(NarrowBertClassifierBase):
    """[CLS] is the only query row: the narrow layers compute nothing else. BertForSequenceClassification's
    parameter names (bert.pooler, classifier)."""

    add_pooling_layer = True

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        cls = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, cls, position_ids)  # (B, 1, H)
        logits = self.classifier(self.dropout(self.bert.pooler(hidden)))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = CrossEntropyLoss()(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class NarrowBertForTokenClassification(QueryRowsForward, NarrowBertClassifierBase):
    """Tags at the query rows (e.g. each word's first sub-token); every position when query_positions is None.
    BertForTokenClassification's parameter names (no pooler)."""

    output_class = TokenClassifierOutput

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


__all__ = ["NarrowBertForMaskedLM", "NarrowBertForSequenceClassification", "NarrowBertForTokenClassification",
           "NarrowBertModel", "NarrowBertPreTrainedModel"]
