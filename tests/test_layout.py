"""The package's layout is its architecture: every stage imports only the stages before it, the ground modules and
the figures import no stage, documented import paths keep working, and `python -m placement` runs the CLI."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "placement"
STAGES = ["model", "data", "families", "probe", "plan", "train", "study", "report"]
GROUND = {"errors", "outputs", "measure", "distributed"}
ANYONE_MAY_IMPORT = {"report.figures"}  # so every stage can draw


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours a file imports, at any depth of the file (lazy imports count too), relative to the
    package: `model.sites`, `errors`, ..."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("placement"):
                target = node.module.removeprefix("placement").lstrip(".")
            else:
                continue
            names = [alias.name for alias in node.names]
            found.update(f"{target}.{n}".strip(".") if not node.module and node.level else target for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("placement").lstrip(".") for a in node.names
                         if a.name.startswith("placement"))
    return {f for f in found if f}


def _stage(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in STAGES else None


def test_every_stage_imports_only_earlier_stages():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _stage(module)
        if own is None:
            continue
        for target in _imports(path):
            stage = _stage(target)
            exempt = any(target == a or target.startswith(a + ".") for a in ANYONE_MAY_IMPORT)
            if stage is None or exempt:
                continue
            if STAGES.index(stage) > STAGES.index(own):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


@pytest.mark.parametrize("path", ["errors.py", "outputs.py", "measure.py", "distributed.py", "report/figures.py"])
def test_ground_modules_and_figures_import_no_stage(path):
    stages = {t for t in _imports(PACKAGE / path) if _stage(t)}
    assert not stages, stages


def test_the_import_walker_sees_a_backward_import(tmp_path):
    # the test above could pass by seeing nothing: check it on a file that imports a later stage lazily
    probe = PACKAGE / "model" / "_layout_check.py"
    probe.write_text("def f():\n    from ..study.compare import run_compare\n    from . import sites\n")
    try:
        assert _imports(probe) == {"study.compare", "model.sites"}
    finally:
        probe.unlink()


DOCUMENTED = {
    "placement.model.load": ["load", "resolve", "cache_root", "ModelSource", "EMBEDDED_ALIAS"],
    "placement.model.sites": ["find_sites", "ROLES", "Site"],
    "placement.data": ["task_splits", "load_records", "to_examples", "collate", "make_batches"],
    "placement.probe.scores": ["lora_scale", "expected_factor"],
    "placement.probe": ["probe", "ProbeSettings", "token_loss", "Probe", "ProbeResult"],
    "placement.plan.ranking": ["rank", "concentration", "stability", "agreement_table", "margins", "share_grid"],
    "placement.plan": ["Plan", "Strategy", "STRATEGIES", "select", "lora_params", "SCHEMA"],
    "placement.study.profile": ["run_profile", "write_profile", "load_examples", "calibration_batches", "model_block"],
    "placement.plan.selectors": ["kappa_targets", "snr_targets", "snr_scores"],
    "placement.train": ["TrainSettings", "train", "write_run", "run_metrics", "save_adapter", "apply_plan",
                        "TrainError", "latest_checkpoint"],
    "placement.train.answers": ["extract", "exact_match", "answer_kind"],
    "placement.train.evaluate": ["evaluate", "mean_loss", "predictions_frame"],
    "placement.study.compare": ["run_compare", "CompareSettings", "parse_arms", "Comparison", "Arm", "TABLE_COLUMNS"],
    "placement.report": ["heatmap", "write_comparison", "convergence_plot", "agreement_matrix"],
    "placement.report.html": ["write_report", "build", "record_run"],
    "placement.measure": ["PeakMemory"],
    "placement.cli": ["main"],
}


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_import_paths_keep_working(module):
    imported = importlib.import_module(module)
    missing = [name for name in DOCUMENTED[module] if not hasattr(imported, name)]
    assert not missing, missing


def test_no_alias_modules_at_the_top_of_the_package():
    # each subpackage is reached by its real path; a stub of the same name would send go-to-definition astray
    stubs = [p.name for p in PACKAGE.glob("*.py") if p.stem in {"answers", "compare", "evaluate", "models", "profile",
                                                                 "ranking", "report_html", "scores", "selectors", "sites"}]
    assert not stubs, stubs


def test_the_public_api_is_named_at_the_top_and_imports_nothing_heavy():
    import subprocess
    import sys

    import placement
    from placement.plan.plan import Plan
    from placement.study.callback import PlacementCallback

    assert set(placement.__all__) >= {"apply", "load", "profile", "Plan", "PlacementCallback"}
    assert all(getattr(placement, name) is not None for name in placement.__all__)
    assert placement.Plan is Plan and placement.PlacementCallback is PlacementCallback
    with pytest.raises(AttributeError):
        placement.scores  # noqa: B018  (no alias modules: subpackages by their real path)
    out = subprocess.run([sys.executable, "-c", "import placement, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # importing the package loads neither torch nor transformers


def test_figures_only_draw():
    # any stage may import the figures, so they must hold no computation a stage needs: every public function
    # writes a figure to a path, and the tables it draws are computed by the stage that owns them
    tree = ast.parse((PACKAGE / "report" / "figures.py").read_text())
    public = [node for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]
    assert public
    not_drawing = [node.name for node in public if "path" not in [a.arg for a in node.args.args]]
    assert not not_drawing, not_drawing


def test_no_class_carries_too_many_jobs():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 120:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


@pytest.mark.slow
def test_python_dash_m_placement_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "placement", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: placement" in result.stdout and "profile" in result.stdout
