"""What the tests share: each helper defined once, here (tests/test_structure.py checks it), imported as
`support.<module>` (pytest puts tests/ on sys.path, for conftest.py). Modules that run as programs of their own
(zero_job.py, memory_step.py, train_digests.py: jobs the tests start) live here too."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository: the jobs' working folder, where launch/ and configs/ are
