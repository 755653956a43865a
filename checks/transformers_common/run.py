"""Run transformers' common model, configuration and processor tests against a tiny Flaminko.

    python checks/transformers_common/run.py [--generation-tests PATH] [pytest arguments]

Downloads the source distribution of the installed transformers (pip download, no install) to a
temporary folder, places flaminko_common_tests.py among its tests and runs pytest there. The
source distribution lacks a few repository-only helpers the mixins import; they are stubbed
here. GenerationTesterMixin lives only in transformers' repository: pass its
tests/generation/test_utils.py (and the test_framework_agnostic.py beside it) with
--generation-tests, at the tag of the installed version; without it the generation tests are not run.
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
STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # Only read by ConfigTester for configs without sub-configs.
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}
# Imported by test_processing_common from the repository's utils/ folder; its media are only used
# by tests that read videos or audio from the Hub, which do not apply here.
FETCH_STUB = "def url_to_local_path(url, **kwargs):\n    return url\n"


def unpacked_source(version: str, workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
         f"transformers=={version}", "-d", str(workdir)],
        check=True,
    )
    archive = next(workdir.glob("transformers-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / f"transformers-{version}"


def prepare_tests(source: Path, generation_tests: Path | None) -> Path:
    tests = source / "tests"
    for relative, text in STUBS.items():
        path = tests / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text)
    if generation_tests is not None:
        for name in ("test_utils.py", "test_framework_agnostic.py"):
            shutil.copy(generation_tests.parent / name, tests / "generation" / name)
    (source / "utils").mkdir(exist_ok=True)
    if not (source / "utils" / "fetch_hub_objects_for_ci.py").exists():
        (source / "utils" / "fetch_hub_objects_for_ci.py").write_text(FETCH_STUB)
    target = tests / "models" / "flaminko"
    target.mkdir(parents=True, exist_ok=True)
    for package in (tests, tests / "exporters", tests / "generation", tests / "utils", tests / "models", target):
        (package / "__init__.py").touch()
    shutil.copy(HERE / "flaminko_common_tests.py", target / "test_modeling_flaminko.py")
    return target / "test_modeling_flaminko.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generation-tests", type=Path, help="tests/generation/test_utils.py of transformers' repository")
    parser.add_argument("--keep", type=Path, help="unpack into this folder and keep it (default: a temporary folder)")
    args, pytest_args = parser.parse_known_args()
    if args.generation_tests is not None and not args.generation_tests.is_file():
        parser.error(f"--generation-tests: no file {args.generation_tests}")
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        source = workdir / f"transformers-{version}"
        if not source.exists():
            source = unpacked_source(version, workdir)
        test_file = prepare_tests(source, args.generation_tests)
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", "-rs",
                   str(test_file.relative_to(source)), *pytest_args]
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}
        return subprocess.run(command, cwd=source, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main())
