"""The documentation site builds with `mkdocs build --strict` (a broken
reference or a docstring naming a parameter that does not exist fails), and
its API reference covers every public name."""

import importlib
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the modules with an API page (docs/api/), by their public names
DOCUMENTED = [
    "deel_lipdp_ext",
    "deel_lipdp_ext.model",
    "deel_lipdp_ext.layers",
    "deel_lipdp_ext.losses",
    "deel_lipdp_ext.models",
    "deel_lipdp_ext.data",
    "deel_lipdp_ext.pipeline",
    "deel_lipdp_ext.callbacks",
    "deel_lipdp_ext.privacy_plan",
    "deel_lipdp_ext.accounting",
    "deel_lipdp_ext.bounds",
    "deel_lipdp_ext.sensitivity",
    "deel_lipdp_ext.augmentation",
    "deel_lipdp_ext.dynamic_clipping",
    "deel_lipdp_ext.dpsgd",
    "deel_lipdp_ext.ghost_clipping",
    "deel_lipdp_ext.distribution",
    "deel_lipdp_ext.train",
    "deel_lipdp_ext.cloak",
    "deel_lipdp_ext.suppress",
    "deel_lipdp_ext.aijack",
    "deel_lipdp_ext.attacks",
    "deel_lipdp_ext.synthesis",
    "deel_lipdp_ext.imaging",
    "deel_lipdp_ext.audit",
    "deel_lipdp_ext.audit.canaries",
    "deel_lipdp_ext.audit.run",
    "deel_lipdp_ext.audit.report",
]


def _inventory(site: Path) -> set[str]:
    header, compressed = (site / "objects.inv").read_bytes().split(b"\n", 4)[3:]
    assert b"zlib" in header
    lines = zlib.decompress(compressed).decode().splitlines()
    return {line.split()[0] for line in lines if line.strip()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs is not None, "mkdocs is not installed: `make test` installs it"
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_every_module_has_an_api_page():
    pages = (ROOT / "docs" / "api").glob("*.md")
    referenced = {
        line.split(":::")[1].strip()
        for page in pages
        for line in page.read_text().splitlines()
        if line.startswith(":::")
    }
    assert set(DOCUMENTED) <= referenced


def test_the_api_reference_covers_every_public_name(site):
    documented = _inventory(site)
    missing = []
    for module_name in DOCUMENTED:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            if name.startswith("__"):
                continue
            # re-exports are documented where they are defined
            if not any(
                entry == f"{module_name}.{name}" or entry.endswith(f".{name}")
                for entry in documented
            ):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without API documentation: {missing}"
    assert "deel_lipdp_ext.models.recipe" in documented


def test_the_guides_are_in_the_site(site):
    for page in (
        "index.html",
        "design/index.html",
        "migration/index.html",
        "auditing/index.html",
    ):
        assert (site / page).stat().st_size > 1000
