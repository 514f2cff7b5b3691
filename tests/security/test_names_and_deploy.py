"""Names are names, destinations are destinations (issue 17, items 2, 3 and 9): a recipe or
target name cannot point outside dist/, a forged manifest name never reaches a remote shell,
and nothing on the command line reaches ssh as an option."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, phikit

from toolkit.deploy import Remote, deploy, parse_destination
from toolkit.errors import PhikitError

from .conftest import synthetic_bundle


@pytest.mark.parametrize("name", ["../x", "/abs/path", "a b", "x;touch${IFS}PWNED;", ".hidden",
                                  "-rf"])
def test_recipe_name_is_a_name(name, tmp_path):
    text = (REPO / "recipes" / "tiny-phi3-int4.yaml").read_text().replace("../", f"{REPO}/")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("name: tiny-phi3-int4", f"name: {json.dumps(name)}"))
    proc = phikit("build", recipe, "--target", "generic-cpu", "--dry-run")
    assert proc.returncode == 2
    assert "field 'name'" in proc.stderr and "Traceback" not in proc.stderr


def test_target_name_is_a_name(tmp_path):
    target = tmp_path / "t.yaml"
    target.write_text((REPO / "targets" / "generic-cpu.yaml").read_text()
                      .replace("name: generic-cpu", "name: ../../elsewhere"))
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", target, "--dry-run")
    assert proc.returncode == 2 and "field 'name'" in proc.stderr


def test_destination_is_never_an_ssh_option():
    assert Remote("pi@raspberrypi", "d").ssh_args()[-2:] == ["--", "pi@raspberrypi"]
    assert parse_destination("mypi", "b") == ("mypi", "phikit/b")  # a ~/.ssh/config alias
    assert parse_destination("u@10.0.0.2:/srv/x", "b") == ("u@10.0.0.2", "/srv/x")
    for bad in ("-oProxyCommand=touch /tmp/x", "u@-oProxyCommand=x", "u@h;id", ""):
        with pytest.raises(PhikitError, match="destination must be"):
            parse_destination(bad, "b")


@pytest.fixture
def forged(tmp_path):
    """A well-formed bundle whose manifest.json (covered by no hash) carries a shell word."""
    return synthetic_bundle(tmp_path / "b", name="x;touch${IFS}PWNED;")


def test_forged_manifest_name_never_reaches_the_host(forged):
    with pytest.raises(PhikitError, match="field 'name'"):
        deploy(forged, "user@127.0.0.1", service=True, log=lambda s: None)


def test_bind_address_is_checked(forged):
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["name"] = "ok-name"
    (forged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PhikitError, match="--host must be"):
        deploy(forged, "user@127.0.0.1", host_bind="0.0.0.0; id", log=lambda s: None)


LAUGHS = """name: laughs
source: ../models/tiny-phi3
quantization:
  precision: int4
  options:
    onnx:
      a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]
eval:
  file: ../evalsets/tiny-phi3.jsonl
"""


@pytest.mark.parametrize("content, message", [
    (LAUGHS, "YAML aliases"),
    ("name: deep\nx: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than"),
    ("name: big\n" + "# padding\n" * 120_000, "larger than"),
], ids=["billion-laughs", "nested-20000", "oversized"])
def test_unbounded_yaml_is_refused(content, message, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    proc = phikit("build", recipe, "--target", "generic-cpu", "--dry-run", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["recipe", "--target"])
def test_device_files_are_not_read(flag):
    args = (["/dev/zero", "--target", "generic-cpu"] if flag == "recipe"
            else ["recipes/tiny-phi3-int4.yaml", "--target", "/dev/zero"])
    proc = phikit("build", *args, "--dry-run", timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr
