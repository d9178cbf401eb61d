"""The package's shape, read from its source with ast: imports follow the data flow (so there is no cycle),
Horovod stays behind hvd_llama/parallel/, the model needs torch alone, no command imports another, modules
stay small; and the tests' shape: test files beside conftest.py, their helpers in tests/support/, each defined
once, nothing read beside the repository."""
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hvd_llama"
TESTS = Path(__file__).resolve().parent
# Every module, upstream first: each may import only modules listed before it (a topological order of the
# import graph, which therefore has no cycle). A new module takes its place here.
FLOW = [
    # foundations: errors, files, processes, the configuration, the model, the tokenizer, the device
    "cli", "files", "procs", "model", "config", "tokenizer", "device", "lora",
    # prep/: raw text -> token shards (the prepare command, which takes hvd_llama.parallel's ranks under a launcher)
    "prep", "prep.text", "prep.token_shards", "prep.settings", "prep.sources", "prep.staging", "prep.corpus",
    "prep.dedup", "prep.split", "prep.encode", "prep.run", "prep.vocabulary", "prep.finish", "prep.build",
    # training/ and parallel/: token shards -> a trained model (the train and plan commands)
    "training", "training.data", "training.zero_layout", "training.preemption", "training.faults", "training.optim",
    "training.metrics", "training.memory", "training.compute", "parallel.zero", "parallel.zero3", "parallel",
    "parallel.elastic", "parallel.report", "prepare",
    # weights/: checkpoints and other formats on disk
    "weights", "weights.checkpoint", "weights.formats", "weights.pretrained",
    "training.checkpointing", "training.builder", "training.trainer", "train", "plan",
    # use/: checkpoints -> numbers, text, other formats (evaluate, generate, convert, doctor)
    "use", "use.inference", "use.decoding", "evaluate", "generate", "convert", "doctor",
    # benchmarks of all of the above
    "bench", "bench.common", "bench.synthetic", "bench.train_steps", "bench.prepare_steps", "bench.throughput",
    "bench.scaling", "bench.quality", "bench.generation", "bench.prepare", "bench.memory", "bench.stages",
    "bench.fsdp", "bench.run", "bench.__main__",
]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p)}


def imports(name: str) -> set[str]:
    """Every module `name` imports anywhere in its file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from hvd_llama import dist` imports the module hvd_llama.parallel
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def internal_imports(name: str) -> set[str]:
    return {m.removeprefix("hvd_llama.") for m in imports(name) if m.startswith("hvd_llama.")} & set(MODULES)


def test_flow_lists_every_module_once():
    assert len(FLOW) == len(set(FLOW)) and set(FLOW) == set(MODULES)


@pytest.mark.parametrize("name", FLOW)
def test_imports_point_down_the_flow(name):
    upstream = set(FLOW[:FLOW.index(name)])
    assert internal_imports(name) <= upstream, f"{name} imports {sorted(internal_imports(name) - upstream)}"


def test_horovod_only_in_parallel_and_the_model_needs_torch_alone():
    for name in MODULES:
        if any(m.split(".")[0] == "horovod" for m in imports(name)):
            assert name.split(".")[0] == "parallel", f"{name} imports horovod"
    third_party = {m.split(".")[0] for m in imports("model")} - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"torch"}


def test_commands_do_not_import_commands():
    commands = {name for name, path in MODULES.items()
                if any(isinstance(node, ast.FunctionDef) and node.name == "main"
                       for node in ast.parse(path.read_text()).body)}
    assert {"prepare", "train", "evaluate", "generate", "convert", "bench.run"} <= commands
    for name in MODULES:
        imported = internal_imports(name) & commands
        assert imported <= ({"bench.run"} if name == "bench.__main__" else set()), f"{name} imports {imported}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_tests_name_no_folder_beside_the_repository():
    """A fresh clone has no ../shared next to it (CI has one): a test reading it would skip everywhere but on CI.
    Looks for the folder's name as a part of a path string, or joined into a path with `/` (this file names it)."""
    here = Path(__file__).resolve()

    def names_it(node) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value:
            return "shared" in node.value.split("/")
        return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
            any(isinstance(side, ast.Constant) and side.value == "shared" for side in (node.left, node.right))

    named = [(path.name, ast.unparse(node)) for path in sorted(TESTS.rglob("*.py")) if path != here
             for node in ast.walk(ast.parse(path.read_text())) if names_it(node)]
    assert not named


def test_the_readmes_module_table_names_every_module_that_exists():
    """README's Architecture table and FLOW describe the same map: every module is in the table (as its file, or in
    a folder the table names whole), and every file the table names exists."""
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Architecture"):readme.index("Libraries beyond the required ones")]
    names = set(re.findall(r"^\|[^|]*\|\s*(.*?)\s*\|", table, re.M))  # the module column
    paths = {p for cell in names for p in re.findall(r"`([\w/]+\.py|[\w]+/)`", cell)}
    files = {p.removesuffix(".py").replace("/", ".") for p in paths if p.endswith(".py")}
    folders = {p.rstrip("/") for p in paths if p.endswith("/")}
    assert files <= set(MODULES), f"the README names modules that do not exist: {sorted(files - set(MODULES))}"
    packages = {name.split(".")[0] for name in MODULES if "." in name}

    def covered(name: str) -> bool:
        return name in files or name.split(".")[0] in folders or \
            (name in packages and any(m.startswith(name + ".") for m in files))

    assert [name for name in FLOW if not covered(name)] == []


def test_tests_folder_holds_test_files_and_conftest_and_support_the_helpers():
    """A module beside the tests is a test file or conftest.py (pytest's hooks and fixtures): whatever the tests
    share is a module of tests/support/, a package the tests import as support.<module>."""
    assert [p.name for p in TESTS.glob("*.py") if p.name != "conftest.py" and not p.name.startswith("test_")] == []
    assert (TESTS / "support" / "__init__.py").is_file()
    assert [p.relative_to(TESTS) for p in TESTS.glob("*/**/*.py") if p.parent != TESTS / "support"] == []


def is_fixture(node: ast.AST) -> bool:
    return any(ast.unparse(d.func if isinstance(d, ast.Call) else d) == "pytest.fixture"
               for d in getattr(node, "decorator_list", []))


def helpers(tree: ast.Module) -> set[str]:
    """The functions and classes a module defines for its tests to call: not the tests themselves, pytest's hooks
    or fixtures (pytest resolves those by name per module, by design)."""
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and not node.name.startswith(("test_", "Test", "pytest_")) and not is_fixture(node)}


def is_job_script(tree: ast.Module) -> bool:
    """A support module run as a program of its own (`python tests/support/x.py`): its helpers serve its own
    processes, which cannot import the support package."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def test_no_helper_is_defined_twice():
    """A helper two test files need lives once in tests/support/; two helpers of one name in two modules are a copy,
    or two meanings of one name: either way, one of them goes (or takes a name of its own)."""
    defined = defaultdict(list)
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if not is_job_script(tree):
            for name in helpers(tree):
                defined[name].append(str(path.relative_to(TESTS)))
    assert {name: paths for name, paths in defined.items() if len(paths) > 1} == {}


def test_test_files_import_no_test_file():
    """What two test files share lives in tests/support/, not in one of them (at any depth: a function's import too)."""
    def imported(path: Path) -> set[str]:
        nodes = ast.walk(ast.parse(path.read_text()))
        return {name for node in nodes for name in
                ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])}

    test_modules = {path.name: sorted(m for m in imported(path) if m.startswith("test_"))
                    for path in TESTS.glob("*.py")}
    assert {name: modules for name, modules in test_modules.items() if modules} == {}


def test_test_files_do_not_redefine_conftests_fixtures():
    """conftest.py's fixtures are the suite's shared ones: a test file defining one again would use its own copy."""
    def fixtures(path: Path) -> set[str]:
        return {node.name for node in ast.parse(path.read_text()).body if is_fixture(node)}

    shared = fixtures(TESTS / "conftest.py")
    assert {path.name: fixtures(path) & shared for path in TESTS.glob("test_*.py") if fixtures(path) & shared} == {}


def test_test_modules_stay_small():
    assert [(str(p.relative_to(TESTS)), n) for p in sorted(TESTS.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES] == []
