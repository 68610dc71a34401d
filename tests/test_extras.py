"""Optional dependencies: a missing one names the pip extra that installs it, and the `reslab`
command says so in one error line."""

import sys

import pytest

from reslab.cli import main
from reslab.extras import MissingExtraError, require


def test_require_imports_or_names_the_extra(monkeypatch):
    (json_module,) = require("json", extra="none", purpose="reading JSON")
    assert json_module is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(MissingExtraError,
                       match=r"^ONNX export needs onnxscript: pip install 'reslab\[onnx\]'$") as e:
        require("onnxruntime", "onnxscript", extra="onnx", purpose="ONNX export")
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == "onnxscript"


def test_the_cli_reports_a_missing_extra_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["bench", "infer", "--model", "resnet20", "--backend", "openvino",
                 "--peak-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err == ("reslab bench: error: the OpenVINO backend needs openvino: "
                   "pip install 'reslab[openvino]'\n")


def test_all_backends_leaves_out_a_runtime_that_is_not_installed(monkeypatch):
    from reslab.inference import available_backends

    monkeypatch.setitem(sys.modules, "openvino", None)
    assert available_backends("cpu") == ("torch", "onnxruntime")
