"""`python -m hvd_llama.bench MODE ...` (see hvd_llama.bench.run)."""
from hvd_llama.bench.run import main

main()
