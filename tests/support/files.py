"""Files the tests write (stand-in programs) or look for (what an interrupted write leaves)."""
from pathlib import Path


def executable(path: Path, text: str) -> Path:
    """A script at `path` (its folder made if missing) that anyone may run: stand-ins for nvidia-smi, srun, ssh."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def no_temp_folders(parent: Path) -> bool:
    """Nothing of an atomic folder write left in `parent`: no `.tmp-` folder being written, no `.old-` one being
    replaced, no prepare's `.OUT.prepare` staging folder."""
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".prepare")]
