"""The analysis' modules import one way (load <- runs <- across; context and prose aside), and
neither they nor the report, figures or compare import a framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = ROOT / "harness" / "analysis"
FRAMEWORKS = ("tensorflow", "keras", "torch", "torchvision", "jax")


def harness_imports(path: Path) -> set[str]:
    """The harness modules a file imports, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness")}
    return found


def test_analysis_modules_import_one_way() -> None:
    inside = {p.stem: {m.rsplit(".", 1)[1] for m in harness_imports(p)
                       if m.startswith("harness.analysis.")}
              for p in ANALYSIS.glob("*.py") if p.stem != "__init__"}
    assert inside == {
        "load": set(),
        "runs": {"load"},
        "across": {"load", "runs"},
        "context": {"load"},
        "prose": set(),
    }
    # Nothing in harness.analysis reaches back up to the composer or the renderers.
    upward = {"harness.analyze", "harness.report", "harness.compare", "harness.report_figures",
              "harness.figures"}
    for p in ANALYSIS.glob("*.py"):
        assert not harness_imports(p) & upward, p.name
    # The plotting module knows nothing of the analysis: plain inputs only.
    assert not {m for m in harness_imports(ROOT / "harness" / "figures.py")
                if m.startswith(("harness.analy", "harness.report"))}


def test_report_compare_and_figures_import_no_framework() -> None:
    code = (
        "import sys\n"
        "import harness.analyze, harness.report, harness.compare, harness.figures,"
        " harness.report_figures\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
        # No pyplot: figures draw on their own Agg canvas, never a display backend.
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "False"]
