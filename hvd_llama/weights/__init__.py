"""Model weights on disk: hvd_llama checkpoints, Hugging Face and Meta formats."""
