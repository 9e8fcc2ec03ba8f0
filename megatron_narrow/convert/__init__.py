"""Conversion between Hugging Face BERT layouts and ours (any tensor-parallel size)."""

from megatron_narrow.formats.hf_bert import from_hf_state_dict, to_hf_state_dict
from megatron_narrow.parallel import merge_tensor_parallel, tensor_parallel_dims

__all__ = ["from_hf_state_dict", "merge_tensor_parallel", "tensor_parallel_dims", "to_hf_state_dict"]
