"""Conversion between Hugging Face BERT layouts and ours (any tensor-parallel size)."""

from megatron_narrow.convert.hf_bert import (
    from_hf_state_dict,
    merge_tensor_parallel,
    tensor_parallel_dims,
    to_hf_state_dict,
)

__all__ = ["from_hf_state_dict", "merge_tensor_parallel", "tensor_parallel_dims", "to_hf_state_dict"]
