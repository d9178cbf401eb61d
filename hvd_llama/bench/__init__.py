"""Benchmarks of hvd_llama, one module per benchmark; run them with `python -m hvd_llama.bench`."""
