"""NarrowBERT as a Hugging Face remote-code model: these two files are copied beside exported weights and
loaded with `trust_remote_code=True`, so they import only torch and transformers."""

from megatron_narrow.convert.hf_narrow.configuration_narrow_bert import NarrowBertConfig
from megatron_narrow.convert.hf_narrow.modeling_narrow_bert import (
    NarrowBertForMaskedLM,
    NarrowBertForSequenceClassification,
    NarrowBertForTokenClassification,
    NarrowBertModel,
)

__all__ = ["NarrowBertConfig", "NarrowBertForMaskedLM", "NarrowBertForSequenceClassification",
           "NarrowBertForTokenClassification", "NarrowBertModel"]
