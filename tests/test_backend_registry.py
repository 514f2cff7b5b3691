"""A backend is its modules + one registry entry: a stand-in registered at run time reaches the
support matrix and the demo's plan with no other module naming it."""

from __future__ import annotations


from conftest import REPO
from toolkit.backends import BACKENDS
from toolkit.backends.common import BackendDefaults
from toolkit.demo import demo_builds
from toolkit.family import matrix_rows, support_matrix


class Standin(BackendDefaults):
    name = "standin"
    runtime_module = "ortgenai"
    tool = "stand-in converter"
    exact_tokenizer = False
    home_target = "generic-cpu"
    off_device_precision = "int8"

    def unavailable(self):
        return None

    def support(self, info, target, recipe):
        if recipe.quantization.precision == "fp32":
            return "the stand-in converts quantized models only"
        return None

    def matrix_form(self, info, precision):
        return {"precision": precision, "block_size": 64}, {}


def test_a_registered_backend_reaches_the_matrix_and_the_demo(monkeypatch, tmp_path):
    monkeypatch.setitem(BACKENDS, "standin", Standin())
    cells = [c for c in support_matrix() if c.backend == "standin"]
    assert {c.precision for c in cells if c.supported} == {"int4", "int8"}
    assert {c.reason for c in cells if not c.supported} == {
        "the stand-in converts quantized models only"}
    header, rows, notes = matrix_rows(support_matrix())
    assert "standin (generic-cpu)" in header
    assert "the stand-in converts quantized models only" in notes.values()

    targets = tmp_path / "targets"  # a target of one's own, on phikit's search path
    targets.mkdir()
    (targets / "standin-gpu.yaml").write_text(
        (REPO / "targets" / "intel-gpu.yaml").read_text()
        .replace("name: intel-gpu", "name: standin-gpu")
        .replace("backend: openvino", "backend: standin")
        .replace("backends: [openvino]", "backends: [standin]")
        .replace("    openvino: [", "    standin: ["))
    monkeypatch.setenv("PHIKIT_PATH", str(tmp_path))
    mine = [b for b in demo_builds() if b.target == "standin-gpu"]
    # off its device (a GPU target on this CPU): the backend's own off-device precision, and
    # its failure would not fail the demo
    assert [(b.recipe.rsplit("/", 1)[-1], b.where.split(",")[0], b.on_device)
            for b in mine] == [("tiny-phi3-int8.yaml", "this CPU", False)]


def test_a_registered_backend_reaches_the_defect_suite(monkeypatch):
    """The planted-defect suite enumerates the registry: a new backend gets a cell for every
    defect, saying that no planter exists for its format yet (a visible gap, not a silent one)."""
    from defects.planters import DEFECTS, NotPlantable, cells

    monkeypatch.setitem(BACKENDS, "standin", Standin())
    mine = {d: p for (d, b), p in cells().items() if b == "standin"}
    assert set(mine) == set(DEFECTS)
    assert all(isinstance(p, NotPlantable) and "standin" in p.reason for p in mine.values())
