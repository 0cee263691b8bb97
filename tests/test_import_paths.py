"""Every import path a user is shown works: the README's, the docs', the docstrings', and the old
module paths from before the package was organised by role."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bc_fast
from bc_fast._util.moved_modules import MOVED

ROOT = Path(__file__).resolve().parent.parent  # the checkout (README.md, docs/)
PACKAGE = Path(bc_fast.__file__).resolve().parent  # the package under test: the source folder or an installed copy

#: Names that appear in prose but are not importable paths, each with why.
NOT_PATHS = {
    "bc_fast.libs": "the folder of shared libraries auditwheel puts in the wheel",
    "bc_fast._cuda": "the optional CUDA extension, built only with -DBC_FAST_CUDA=ON (tested in test_cuda_module.py)",
}
_DOTTED = re.compile(r"(?<![\w./-])bc_fast(?:\.[A-Za-z_]\w*)+")
_FROM = re.compile(r"^\s*from (bc_fast(?:\.\w+)*) import ([\w, ()]+)", re.M)

#: What each old module offered (its __all__, or its public functions and classes), before the move.
OLD_NAMES = {
    "bc_fast.ops": ["FusedTransform", "Layer", "build_info", "get_num_threads", "set_num_threads", "validate_layer"],
    "bc_fast.fusion": ["apply_layers_reference", "chain_flops", "flatten_chain", "fuse_chain"],
    "bc_fast.cuda": ["CudaArray", "apply_fused", "cuda_info", "cuda_module", "describe_cuda_array", "empty_like_kind",
                     "is_cuda_array"],
    "bc_fast.registry": ["KINDS", "Registry", "RegistryError", "TransformInfo", "VersionInfo", "as_layers", "show"],
    "bc_fast._manifest": ["RegistryError", "TransformInfo", "VersionInfo", "canonical", "content_checksum",
                          "decode_transform", "encode_transform", "foreign_format", "json_clean", "json_depth",
                          "layer_specs", "parse_manifest", "pretty", "read_header", "validate_manifest", "weight_file"],
    "bc_fast.tables": ["Chunk", "NpyHeader", "NpyReader", "NpyWriter", "ParquetReader", "ParquetWriter", "TableReader",
                       "TableWriter", "detect_format", "import_pyarrow", "make_writer", "npy_header_bytes", "open_table",
                       "read_npy_header", "remove_path", "sha256_file"],
    "bc_fast.convert": ["ConvertResult", "DEFAULT_VERIFY_ROWS", "SIDECAR_SUFFIX", "VerificationError", "apply_to_table",
                        "convert_table", "default_verify_tol", "read_sidecar", "sidecar_path", "operator_fingerprint",
                        "registry_job"],
    "bc_fast.convert_gpu": ["CudaDevice", "DEFAULT_DEPTH", "DeviceTransform", "gpu_pipeline", "gpu_verify_tol",
                            "open_device", "parse_device"],
    "bc_fast.distributed": ["DatasetResult", "RAY_INSTALL_HINT", "convert_dataset_ray", "import_ray"],
    "bc_fast.index": ["DEFAULT_BLAS_MIN_QUERIES", "LegacyIndex", "blas_threshold", "blas_threshold_for",
                      "build_legacy_index", "export_faiss_pretransform", "faiss_linear_transform", "faiss_metric",
                      "set_blas_threshold"],
    "bc_fast.index_build": ["build_ivf_index_sharded", "train_ivf"],
    "bc_fast.experiment": ["ExperimentConfig", "raw_schema", "run_demo", "run_experiment", "run_lambda_sweep",
                           "summarize"],
    "bc_fast.experiment_checkpoint": ["SeedCheckpoints", "data_fingerprint", "seed_settings"],
    "bc_fast.demo": ["load_user_interactions", "run_demo_pipeline"],
    "bc_fast.text_demo": ["CHAIN", "PAIRS", "fit_logreg", "format_text_table", "run_text_demo"],
    "bc_fast.benchmark": ["SIZES", "Timing", "affine_err", "affine_impls", "best_of", "format_table", "machine_info",
                          "run_bench_suite", "run_bf16_bench", "suite_configs", "time_interleaved"],
    "bc_fast._benchtools": ["Bench", "Buffers", "Engines", "Stopwatch", "Timing", "TimingPlan", "calibrate_calls",
                            "chart_png", "check", "cpu_flags", "cpu_model", "engines", "fmt_time", "format_table",
                            "import_faiss", "import_torch", "kv_line", "log_result", "machine_info", "machine_lines",
                            "max_abs_err", "numpy_blas_threads", "result", "run_configs", "script_args",
                            "speedup_check", "threadpools", "time_interleaved", "timing_from_samples"],
    "bc_fast.progress": ["Progress"],
    "bc_fast._fileio": ["FileLock", "atomic_write_bytes", "atomic_write_json", "fsync_dir", "is_json_int",
                        "read_json_object"],
    "bc_fast._arrays": ["as_numpy", "is_torch"],
    "bc_fast._text": ["short_repr"],
}


def _resolve(path: str) -> object:
    """Import the longest importable prefix of a dotted path, then follow attributes; AssertionError if neither works."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise  # a dependency of the module is missing, not the module itself
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{path}: {'.'.join(parts[:i])} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{path}: no importable module")


def _doc_files() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


def _docstrings() -> list[tuple[str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append((f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 1)}", doc))
    return out


def _paths_in(text: str) -> set[str]:
    paths = {m.rstrip(".") for m in _DOTTED.findall(text)}
    for module, names in _FROM.findall(text):
        paths.update(f"{module}.{n.strip(' ()')}" for n in names.split(",") if n.strip(" ()"))
    return {p for p in paths if not any(p == n or p.startswith(n + ".") for n in NOT_PATHS)}


def _documented_paths() -> dict[str, str]:
    where: dict[str, str] = {}
    for f in _doc_files():
        for p in _paths_in(f.read_text()):
            where.setdefault(p, str(f.relative_to(ROOT)))
    for loc, doc in _docstrings():
        for p in _paths_in(doc):
            where.setdefault(p, loc)
    return where


def test_the_docs_name_paths_at_all():
    if not (ROOT / "README.md").is_file():
        pytest.skip(f"no README.md beside the tests in {ROOT}: the documented paths are checked from a checkout")
    paths = _documented_paths()
    assert "bc_fast.FusedTransform" in paths and any(p.startswith("bc_fast.store") for p in paths)


@pytest.mark.parametrize("path", sorted(_documented_paths()))
def test_documented_path_imports(path):
    try:
        _resolve(path)
    except ModuleNotFoundError as e:  # an optional extra the docs mention
        pytest.skip(f"{path} needs {e.name}, not installed here")


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_module_path_still_works(old):
    module = importlib.import_module(old)
    missing = [n for n in OLD_NAMES[old] if not hasattr(module, n)]
    assert not missing, f"{old} no longer offers {missing}"
    if old in MOVED:
        new = importlib.import_module(MOVED[old])
        assert module is new, f"{old} must be the same module object as {MOVED[old]}"
        assert module.__spec__.name == MOVED[old]  # the alias did not take over the module's identity


def test_every_alias_is_tested():
    assert set(MOVED) <= set(OLD_NAMES)


def test_old_and_new_names_are_the_same_objects():
    from bc_fast.registry import Registry as OldRegistry
    from bc_fast.store import Registry

    assert OldRegistry is Registry
    assert importlib.import_module("bc_fast.ops").FusedTransform is bc_fast.FusedTransform


def test_moved_modules_are_attributes_of_the_package_after_import():
    import bc_fast.registry  # noqa: F401

    assert bc_fast.registry.Registry is importlib.import_module("bc_fast.store").Registry


def test_the_alias_finder_answers_only_its_names():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bc_fast.no_such_module")


def test_source_folder_without_the_core_says_what_is_wrong(tmp_path):
    """``import bc_fast`` inside a checkout, where bc_fast/ has no compiled core: a clear message, not a circular import."""
    shutil.copytree(PACKAGE, tmp_path / "bc_fast", ignore=shutil.ignore_patterns("_core*.so", "_cuda*.so", "__pycache__"))
    # -S: no site-packages, so neither an installed bc_fast nor an editable-install hook can answer first
    r = subprocess.run([sys.executable, "-S", "-c", "import bc_fast"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert r.returncode != 0
    assert "compiled core (bc_fast._core) is not in" in r.stderr, r.stderr
    assert "pip install -e ." in r.stderr and "another directory" in r.stderr
    assert "circular import" not in r.stderr
