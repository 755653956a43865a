"""Run transformers' common model, generation, configuration and processor tests against a tiny Flaminko.

    python checks/transformers_common/run.py [--transformers-tests DIR] [pytest arguments]

Downloads the source distribution of the installed transformers (pip download, no install) to a
temporary folder, places flaminko_common_tests.py among its tests and runs pytest there. The
source distribution lacks GenerationTesterMixin (tests/generation/test_utils.py) and a few
repository-only helpers the mixins import. They are taken from a folder laid out as transformers'
repository (--transformers-tests; by default shared/transformers-tests beside this checkout, when
it is there); whatever is still missing is stubbed here, and without GenerationTesterMixin the
generation tests are not run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
REPOSITORY_ROOT = HERE.parents[1]
# The project's shared folder, beside each checkout (and CI's clone), keeps transformers' repository-only
# test files; the repository itself does not copy transformers' tests.
SHARED_TESTS = REPOSITORY_ROOT.parent / "shared" / "transformers-tests"
# Stand-ins for the repository-only files that no --transformers-tests folder gave.
STUBS = {
    "tests/exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "tests/generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # Only read by ConfigTester for configs without sub-configs.
    "tests/utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
    # Imported by test_processing_common from the repository's utils/ folder; its media are only used
    # by tests that read videos or audio from the Hub, which do not apply here.
    "utils/fetch_hub_objects_for_ci.py": "def url_to_local_path(url, **kwargs):\n    return url\n",
}


def unpacked_source(version: str, workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
         f"transformers=={version}", "-d", str(workdir)],
        check=True,
    )
    # A --keep folder may hold other versions' archives too.
    archive = workdir / f"transformers-{version}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / f"transformers-{version}"


def prepare_tests(source: Path, repository_tests: Path | None) -> Path:
    tests = source / "tests"
    stubs = {source / relative: text for relative, text in STUBS.items()}
    if repository_tests is not None:
        # The source distribution's own files stay: they are the installed version's. A stub an earlier
        # run left in a --keep folder gives way.
        for path in sorted(repository_tests.rglob("*.py")):
            target = source / path.relative_to(repository_tests)
            if not target.exists() or (target in stubs and target.read_text() == stubs[target]):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    for path, text in stubs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text)
    target = tests / "models" / "flaminko"
    target.mkdir(parents=True, exist_ok=True)
    for package in (tests, tests / "exporters", tests / "generation", tests / "utils", tests / "models", target):
        (package / "__init__.py").touch()
    shutil.copy(HERE / "flaminko_common_tests.py", target / "test_modeling_flaminko.py")
    return target / "test_modeling_flaminko.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--transformers-tests",
        type=Path,
        default=SHARED_TESTS if SHARED_TESTS.is_dir() else None,
        help="a folder laid out as transformers' repository holding tests/generation/test_utils.py "
        f"(GenerationTesterMixin) and the helpers the common tests import (default: {SHARED_TESTS}, when it is there)",
    )
    parser.add_argument("--keep", type=Path, help="unpack into this folder and keep it (default: a temporary folder)")
    args, pytest_args = parser.parse_known_args()
    generation = args.transformers_tests and args.transformers_tests / "tests" / "generation" / "test_utils.py"
    if generation and not generation.is_file():
        parser.error(f"--transformers-tests: no file {generation}")
    if not generation:
        print(f"No {SHARED_TESTS} and no --transformers-tests: GenerationTesterMixin's tests are not run", file=sys.stderr)
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        source = workdir / f"transformers-{version}"
        if not source.exists():
            source = unpacked_source(version, workdir)
        test_file = prepare_tests(source, args.transformers_tests)
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", "-rs",
                   str(test_file.relative_to(source)), *pytest_args]
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}
        return subprocess.run(command, cwd=source, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main())
