"""NarrowBERT configuration: a BertConfig plus the number of full-length layers.

Self-contained (imports only transformers): it is copied next to exported weights and loaded with
`trust_remote_code=True`.
"""

from transformers import BertConfig


class NarrowBertConfig(BertConfig):
    r"""BertConfig for NarrowBERT (sparse queries).

    full_length_layers (`int`, defaults to 2):
        The first layers run as ordinary BERT layers over all positions; their output is the context C.
        Every later ("narrow") layer computes queries only for the query positions, with keys and
        values from C (its own key/value weights), so its parameters are exactly a BertLayer's.
    """

    model_type = "bert"
    """As the official NarrowBERT writes it: AutoConfig and AutoTokenizer load the directory without remote code
    (no prompt); the model classes come from `auto_map` with trust_remote_code=True."""

    full_length_layers: int = 2
