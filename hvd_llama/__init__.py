"""hvd_llama: data-parallel LLaMA training with Horovod."""

__version__ = "0.1.0"
