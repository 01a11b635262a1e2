"""The suite's own rules: every test carries the markers of the real components it needs (so that
`make test-fast` runs none of them), test modules share helpers through tests/helpers.py only,
each dependency is pinned once, and the checkout's root is computed in one place."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import FIXTURE_MARKERS, ROOT, missing_markers

REGISTERED = [line.split(":")[0] for line in
              tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]]


def test_fixtures_imply_their_markers_through_the_fixture_closure():
    # What pytest hands the hook for a test that takes `server`: the fixture and all it depends on.
    closure = {"server", "torchserve", "artifacts", "tmp_path_factory"}
    assert missing_markers(closure, set()) == {"torchserve", "slow"}
    assert missing_markers(closure, {"torchserve", "slow", "parametrize"}) == set()
    assert missing_markers({"fleet", "artifacts"}, {"torchserve"}) == {"gateway", "slow"}
    assert missing_markers({"tmp_path", "fashion_test_set"}, set()) == set()
    assert set().union(*FIXTURE_MARKERS.values()) <= set(REGISTERED)


def test_collection_fails_for_a_test_using_a_server_fixture_without_its_marker(tmp_path):
    (tmp_path / "test_unmarked.py").write_text("def test_uses_the_server(server):\n    pass\n")
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n\n@pytest.mark.torchserve\n@pytest.mark.slow\n"
        "def test_uses_the_server(server):\n    pass\n")
    def collect(name):
        return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tests.conftest",
                               "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                               "-p", "no:cacheprovider", str(tmp_path / name)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    unmarked = collect("test_unmarked.py")
    assert unmarked.returncode != 0
    assert "test_uses_the_server: add @pytest.mark.slow, @pytest.mark.torchserve" in unmarked.stdout + unmarked.stderr
    marked = collect("test_marked.py")
    assert marked.returncode == 0, marked.stdout + marked.stderr
    assert "1 test collected" in marked.stdout


def test_an_unmarked_test_that_starts_torchserve_itself_fails():
    from serve.process import TorchServeProcess
    with pytest.raises(pytest.fail.Exception, match="starts TorchServe: mark it @pytest.mark.torchserve"):
        TorchServeProcess(ROOT / "model_store", ROOT / "never-created").start()
    assert not (ROOT / "never-created").exists()


def test_the_fast_tier_leaves_out_every_registered_marker():
    fast = re.search(r"^FAST_MARKERS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert fast == f"not ({' or '.join(REGISTERED)})"


def test_test_modules_import_helpers_not_each_other():
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            names += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name} imports {name}" for name in names
                          if re.match(r"tests\.(test_\w+|conftest)$", name)]
    assert not offenders, offenders


def requirement_lines(path) -> dict[str, str]:
    """{normalized package name: its line} of one requirements file, comments and -r lines left out."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"): line
            for line in lines if line and not line.startswith(("#", "-r"))}


def test_each_package_is_pinned_in_one_file_and_the_image_repeats_those_pins():
    pinned: dict[str, str] = {}
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        for name in requirement_lines(path):
            assert name not in pinned, f"{name} is pinned in {path.name} and in {pinned[name]}"
            pinned[name] = path.name
    lines = {name: line for path in (ROOT / "requirements").glob("*.txt")
             for name, line in requirement_lines(path).items()}
    image = requirement_lines(ROOT / "deploy" / "requirements-image.txt")
    assert image and all(lines.get(name) == line for name, line in image.items()), \
        {name: (line, lines.get(name)) for name, line in image.items() if lines.get(name) != line}
    assert "psutil" in pinned  # serve/main.py and the tests import it
    for top, runtime in (("requirements.txt", "edge.txt"), ("requirements-gpu.txt", "gpu.txt")):
        included = re.findall(r"^-r requirements/(\S+)$", (ROOT / top).read_text(), re.M)
        assert set(included) == set(pinned.values()) - {"edge.txt", "gpu.txt"} | {runtime}, top


def test_the_checkout_root_is_computed_in_one_place():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    computing = [name for name in tracked
                 if re.search(r"^ROOT = .*__file__", (ROOT / name).read_text(), re.M)]
    assert computing == ["contract/paths.py"]
