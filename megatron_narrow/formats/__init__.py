"""File formats read on both sides of training: the checkpoint directory and the Hugging Face key map."""
