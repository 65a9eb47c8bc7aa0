"""Your own model on the command line: ``--model SPEC``, ``--weights``, preprocessing, ``dmc sites``.

The models are tiny networks defined in factory modules written to ``tmp_path`` (the current
directory of every test) or to a folder on ``PYTHONPATH``; the data are tiny ``.npz`` files.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import torch_dmc
from torch_dmc.bench.inputs import ModelSpec, Preprocess, resolve_model
from torch_dmc.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

#: A factory module: ``make_net`` (a 3-channel conv net for 32×32 images, with a BatchNorm, a
#: LayerNorm2d-style module, LayerNorm over tokens) and factories that fail in various ways.
NETS = '''
import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N×C×H×W tensor (as timm's)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)      # 32×32 -> 16×16
        self.bn = nn.BatchNorm2d(8)
        self.ln2d = LayerNorm2d(8)
        self.ambiguous = LayerNorm2d(8)                           # at 8×8: axis 1 or -1?
        self.tokens = nn.LayerNorm(8)
        self.head = nn.Linear(8 * 8 * 8, classes)                 # takes 32×32 inputs only

    def forward(self, x):
        x = self.ln2d(F.relu(self.bn(self.conv(x))))
        x = self.ambiguous(F.avg_pool2d(x, 2))                    # 2×8×8×8
        t = self.tokens(x.flatten(2).transpose(1, 2))             # N×64 tokens×8
        return self.head(t.flatten(1))


def make_net():
    torch.manual_seed(0)
    return Net()


def make_other():
    torch.manual_seed(1)
    return Net()


def make_wide():
    return Net(classes=12)


def needs_args(width):
    return Net()


def broken():
    raise RuntimeError("no GPU here")


def not_a_module():
    return {"weights": 1}


NUMBER = 3
'''


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the resolver puts the cwd on it
    monkeypatch.setenv("DMC_CACHE_DIR", str(tmp_path / "cache"))


_names = itertools.count()


def factory_module(folder: Path, source: str = NETS) -> str:
    """Write ``source`` as a new module in ``folder``; its name (unique in this process)."""
    name = f"user_nets_{os.getpid()}_{next(_names)}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def save_npz(path: Path, size: int = 32, channels: int = 3, n_train: int = 24, n_test: int = 16) -> str:
    rng = np.random.default_rng(0)
    shape = (size, size, channels) if channels > 1 else (size, size)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=np.arange(n_train) % 10, x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=np.arange(n_test) % 10)
    return str(path)


def error_line(capsys, command: str) -> str:
    """The only line on stderr, ``dmc <command>: error: ...`` (no traceback)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"dmc {command}: error: "), err
    assert "Traceback" not in err and "error" not in "".join(lines[:-1]), err
    return lines[-1]


class _Exploit:
    """Unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- --model MODULE:FACTORY ----------------------------------------------------------------------
def test_a_factory_from_the_current_directory_and_from_pythonpath(tmp_path, monkeypatch):
    name = factory_module(tmp_path)
    resolved = resolve_model(f"{name}:make_net")
    assert type(resolved.model).__name__ == "Net" and not resolved.model.training
    assert resolved.source == f"{name}:make_net" and f"{name}.py" in resolved.files
    other = tmp_path / "elsewhere"
    (other / "mypkg").mkdir(parents=True)
    (other / "mypkg" / "__init__.py").write_text("")
    (other / "mypkg" / "nets.py").write_text(NETS.replace("class Net(", "class PackagedNet("
                                                           ).replace("Net()", "PackagedNet()"))
    monkeypatch.syspath_prepend(str(other))  # as PYTHONPATH does
    assert type(resolve_model("mypkg.nets:make_net").model).__name__ == "PackagedNet"


def _factory_cases(name: str) -> dict[str, tuple[str, str]]:
    return {
        "no module": ("no_such_module_xyz:make", "no module named 'no_such_module_xyz' in the current "
                      "directory"),
        "no factory": (f"{name}:make_nett", f"{name} has no attribute 'make_nett'; its callables: "),
        "not callable": (f"{name}:NUMBER", "NUMBER is a int, not callable"),
        "needs arguments": (f"{name}:needs_args", "calling needs_args() failed: TypeError"),
        "raises": (f"{name}:broken", "calling broken() failed: RuntimeError: no GPU here"),
        "not a module": (f"{name}:not_a_module", "not_a_module() returned a dict; expected a "
                         "torch.nn.Module"),
        "no factory name": (f"{name}:", "expected MODULE:FACTORY"),
        "unknown name": ("resnet-huge", "no such file, folder or model name; expected default, "),
    }


@pytest.mark.parametrize("case", sorted(_factory_cases("m")))
def test_a_bad_model_spec_is_one_line(case, tmp_path, capsys):
    name = factory_module(tmp_path)
    spec, expected = _factory_cases(name)[case]
    assert main(["sites", "--model", spec]) == 2
    line = error_line(capsys, "sites")
    assert expected in line, line


def test_an_import_error_inside_the_module_is_one_line(tmp_path, capsys):
    name = factory_module(tmp_path, "import no_such_dependency_xyz\n")
    assert main(["fit", "--model", f"{name}:make", "--out", "s.safetensors"]) == 2
    assert f"importing {name} failed: No module named 'no_such_dependency_xyz'" in error_line(capsys, "fit")
    assert not Path("s.safetensors").exists()


# -- TorchScript and pickles ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, deprecated in torch 2.13
@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_file_is_loaded_and_refused_for_its_missing_hooks(how, tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    ts = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.rand(2, 1, 28, 28))
    ts.save(str(tmp_path / "net.pt"))
    assert main(["sites", "--model", "net.pt"]) == 2
    line = error_line(capsys, "sites")
    assert "a TorchScript model" in line and "no hooks to TorchScript modules" in line
    assert "--model MODULE:FACTORY with --weights" in line


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("flag", ["--model", "--weights"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickled_object_is_refused_without_being_executed(flag, writer, tmp_path, capsys):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(_Exploit(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Exploit(marker)))
    name = factory_module(tmp_path)
    argv = ["--model", str(path)]
    if flag == "--weights":
        argv = ["--model", f"{name}:make_net", "--weights", str(path)]
    assert main(["sites", *argv]) == 2
    line = error_line(capsys, "sites")
    assert f"{flag} {path}: refused: the file holds pickled Python objects besides tensors" in line
    assert not marker.exists()


def test_a_state_dict_given_as_model_says_to_use_weights(tmp_path, capsys):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    assert main(["sites", "--model", "sd.pt"]) == 2
    assert "a state dict (weights without the architecture)" in error_line(capsys, "sites")


# -- --weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["safetensors", "pt", "checkpoint"])
def test_weights_are_loaded_strictly(kind, tmp_path):
    name = factory_module(tmp_path)
    trained = resolve_model(f"{name}:make_other").model.state_dict()  # other initial weights
    assert not torch.equal(sys.modules[name].make_net().conv.weight, trained["conv.weight"])
    path = tmp_path / f"w.{'safetensors' if kind == 'safetensors' else 'pt'}"
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in trained.items()}, str(path))
    else:
        torch.save(trained if kind == "pt" else {"epoch": 3, "state_dict": trained}, path)
    resolved = resolve_model(ModelSpec(f"{name}:make_net", weights=str(path)))
    for key, value in resolved.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert resolved.files[path.name] == torch_dmc.bench.provenance.sha256_file(path)


def test_weights_that_do_not_fit_are_one_line(tmp_path, capsys):
    name = factory_module(tmp_path)
    wide = resolve_model(f"{name}:make_wide").model.state_dict()  # a 12-class head
    save_file({k: v.contiguous() for k, v in wide.items()}, str(tmp_path / "wide.safetensors"))
    partial = {k: v for k, v in wide.items() if not k.startswith("head.")}
    partial["extra.weight"] = torch.zeros(2)
    torch.save(partial, tmp_path / "partial.pt")
    base = ["sites", "--model", f"{name}:make_net", "--input-size", "32", "--channels", "3"]
    assert main([*base, "--weights", "wide.safetensors"]) == 2
    line = error_line(capsys, "sites")
    assert "--weights wide.safetensors does not fit the model (Net): 2 shape mismatch(es) (head.weight " \
        "(12, 512) vs the model's (10, 512), head.bias (12,) vs the model's (10,))" in line, line
    assert main([*base, "--weights", "partial.pt"]) == 2
    line = error_line(capsys, "sites")
    assert "2 missing key(s) (head.weight, head.bias); 1 unexpected key(s) (extra.weight)" in line, line
    (tmp_path / "w.bin").write_bytes(b"x")
    assert main([*base, "--weights", "w.bin"]) == 2
    assert "unknown file type .bin; expected a state dict" in error_line(capsys, "sites")
    assert main([*base, "--weights", "nope.safetensors"]) == 2
    assert "--weights nope.safetensors: no such file" in error_line(capsys, "sites")


# -- preprocessing -------------------------------------------------------------------------------
def test_preprocess_resizes_repeats_and_normalises():
    seen = []
    inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    inner.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    net = Preprocess(inner, size=(32, 24), mean=mean, std=std).eval()
    x = torch.rand(2, 1, 28, 28)
    net(x)
    expected = F.interpolate(x.expand(-1, 3, -1, -1), size=(32, 24), mode="bilinear",
                             align_corners=False, antialias=True)
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=1e-6)
    net(torch.rand(2, 3, 32, 24))  # the right size already: not resized
    assert seen[-1].shape == (2, 3, 32, 24)
    with pytest.raises(ValueError, match="mean/std have 3 values .* the images have 2 channels"):
        net(torch.rand(2, 2, 32, 24))
    assert net.settings() == {"input_size": [32, 24], "mean": list(mean), "std": list(std)}
    with pytest.raises(ValueError, match="expected positive"):
        Preprocess(inner, std=(1.0, 0.0, 1.0))


def test_preprocess_keeps_the_models_names_and_state():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    inner(torch.rand(2, 3, 32, 32))
    net = Preprocess(inner, size=32, mean=(0.5,) * 3, std=(0.25,))
    assert [n for n, _ in net.named_modules()] == [n for n, _ in inner.named_modules()]
    assert list(net.state_dict()) == list(inner.state_dict())
    assert all(a is b for a, b in zip(net.parameters(), inner.parameters(), strict=True))
    net.train()
    assert inner.training and inner[1].training
    net.eval()
    assert not inner.training and not inner[1].training
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert copied.wrapped is not inner and copied.get_submodule("1") is copied.wrapped[1]
        assert copied(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    # stats fitted through the wrapper hold the model's site names and apply to both
    x = [torch.rand(8, 1, 28, 28) for _ in range(2)]
    stats = torch_dmc.fit(net, x, levels=16, progress=False)
    assert stats.sites == ["1"]
    corrected = torch_dmc.DMC(net, stats)
    assert corrected(x[0]).shape == (8, 3)
    corrected.remove()
    torch_dmc.DMC(inner, stats).remove()  # the same names: accepted


# -- dmc sites -----------------------------------------------------------------------------------
def _table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines()[2:-1]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_sites_lists_batchnorm_layernorm2d_and_token_layernorm(tmp_path, capsys):
    name = factory_module(tmp_path)
    assert main(["sites", "--model", f"{name}:make_net", "--channels", "3", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"{name}:make_net (Net, preprocessed: input_size 32,32), a batch "
                                   "2×3×28×28: 4 site(s) matching --sites norm")
    assert out.splitlines()[1].split() == ["site", "type", "channel", "axis", "channels",
                                           "values/channel/image", "output"]
    assert _table(out) == {
        "bn": ["BatchNorm2d", "1", "8", "256", "2×8×16×16"],
        "ln2d": ["LayerNorm2d", "1", "8", "256", "2×8×16×16"],
        "ambiguous": ["LayerNorm2d", "ambiguous: set channel_axes", "2×8×8×8"],
        "tokens": ["LayerNorm", "-1", "8", "64", "2×64×8"],
    }
    # patterns, and the model's own input size through --data
    data = save_npz(tmp_path / "d.npz")
    assert main(["sites", "--model", f"{name}:make_net", "--data", data, "--sites", "conv,head"]) == 0
    out = capsys.readouterr().out
    assert "a batch 2×3×32×32: 2 site(s)" in out
    assert _table(out) == {"conv": ["Conv2d", "1", "8", "256", "2×8×16×16"],
                           "head": ["Linear", "1", "10", "1", "2×10"]}


def test_sites_errors_are_one_line(tmp_path, capsys):
    name = factory_module(tmp_path)
    assert main(["sites", "--model", f"{name}:make_net"]) == 2  # 1×28×28 images, no --input-size
    line = error_line(capsys, "sites")
    assert "the model cannot take a batch of shape (2, 1, 28, 28): RuntimeError" in line
    assert line.endswith("give its input with --input-size H,W and --channels C, or --data")
    assert main(["sites", "--model", f"{name}:make_net", "--sites", "nothing*", "--channels", "3",
                 "--input-size", "32"]) == 2
    assert "no module of the model matches sites=['nothing*']" in error_line(capsys, "sites")
    for flag, value, expected in [("--input-size", "0", "--input-size 0: expected H or H,W"),
                                  ("--mean", "a,b", "--mean a,b: expected numbers"),
                                  ("--std", "1,0,1", "--std 1,0,1: expected positive numbers")]:
        assert main(["sites", "--model", f"{name}:make_net", flag, value]) == 2
        assert expected in error_line(capsys, "sites")


# -- dmc fit, then dmc bench --stats -------------------------------------------------------------
def test_fit_then_bench_with_the_same_custom_model(tmp_path, capsys):
    name = factory_module(tmp_path)
    torch.save(resolve_model(f"{name}:make_other").model.state_dict(), tmp_path / "net.pt")
    data = save_npz(tmp_path / "grey.npz", size=28, channels=1)  # grey 28×28: resized, repeated
    model = ["--model", f"{name}:make_net", "--weights", "net.pt", "--input-size", "32",
             "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    # without the preprocessing flags the model cannot take the images: one line, before any work
    assert main(["fit", "--model", f"{name}:make_net", "--data", data, "--out", "s.safetensors"]) == 2
    line = error_line(capsys, "fit")
    assert "the model cannot take the data's images (tensor (2, 1, 28, 28))" in line
    assert "--input-size / --mean / --std" in line
    fit = ["fit", *model, "--data", data, "--out", "s.safetensors", "--levels", "16"]
    assert main(fit) == 2  # the site "ambiguous" has no channel axis fit can tell
    assert "the channel axis is ambiguous" in error_line(capsys, "fit")
    assert main([*fit, "--sites", "bn,ln2d,tokens"]) == 0
    stats = torch_dmc.ReferenceStats.load("s.safetensors")
    assert stats.sites == ["bn", "ln2d", "tokens"]  # the model's names, not the wrapper's
    assert stats.channel_axes == {"bn": 1, "ln2d": 1, "tokens": -1}
    capsys.readouterr()
    bench = ["bench", *model, "--data", data, "--stats", "s.safetensors", "--methods", "source,dmc",
             "--corruptions", "contrast", "--severities", "1", "--batch-size", "8", "--workers", "1",
             "--no-progress", "--out", "run"]
    assert main(bench) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    entry = config["model"]
    assert entry["spec"] == f"{name}:make_net" and entry["weights"] == "net.pt"
    assert entry["preprocess"] == {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    assert entry["class"] == "Net" and set(entry["files_sha256"]) == {f"{name}.py", "net.pt"}
    assert entry["files_sha256"]["net.pt"] == torch_dmc.bench.provenance.sha256_file(tmp_path / "net.pt")
    assert "--weights net.pt --input-size 32,32 --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25" in \
        config["explicit_command"]
    # the same stats in Python, on the model wrapped the same way
    net = Preprocess(resolve_model(ModelSpec(f"{name}:make_net", weights="net.pt")).model, size=32,
                     mean=(0.5,) * 3, std=(0.25,) * 3)
    corrected = torch_dmc.DMC(net, "s.safetensors")
    assert corrected(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    # resuming with another preprocessing is refused
    capsys.readouterr()
    assert main([*bench[:-1], "run", "--resume", "--mean", "0.4,0.4,0.4"]) == 2
    assert "the folder's results are of another model (preprocess: " in error_line(capsys, "bench")


# -- the README -----------------------------------------------------------------------------------
def test_the_readme_example_runs(tmp_path, capsys):
    text = README.read_text()
    section = text[text.index("## Your own model and data"):]
    section = section[: section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "n_train, n_test = 1024, 256" in code
    code = code.replace("n_train, n_test = 1024, 256", "n_train, n_test = 128, 64")  # small
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "| site | estimate | W1 before |" in out and (tmp_path / "net.dmc.safetensors").is_file()
    errors = dict(re.findall(r"^(\w+): ([\d.]+)% error$", out, re.M))
    assert set(errors) == {"source", "bn", "dmc"}
