"""study/edm_pickles.py: a pickle built here in the EDM/EDM2 persistence format (network classes stored with their
module's source) gives back the network's state dict and constructor arguments, and no code in it ever runs."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from study.edm_pickles import convert, read_network
from study.errors import StageError

# The format, written for this test: a class decorator whose instances pickle as
# _reconstruct_persistent_obj(dict(type, version, module_src, class_name, state)), as EDM's and EDM2's do.
PERSISTENCE = '''
import copy, sys

def _reconstruct_persistent_obj(meta):
    raise RuntimeError("the original loader would exec meta['module_src'] here")

def persistent_class(cls, module_src=None):
    class Persistent(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__()) + [None] * 3
            src = module_src if module_src is not None else open(sys.modules[cls.__module__].__file__).read()
            meta = dict(type="class", version=6, module_src=src, class_name=cls.__name__, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None)

    Persistent.__name__, Persistent.__module__ = cls.__name__, cls.__module__
    return Persistent
'''

NETWORKS = '''
import torch
from torch_utils import persistence
from dnnlib.util import EasyDict

class Block(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.gain = torch.nn.Parameter(torch.ones([]))

class Net(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, model_channels=8, channel_mult=(1, 2), dropout=0.1):
        super().__init__()
        self.enc = torch.nn.Conv2d(img_channels, model_channels, 3, padding=1)
        self.blocks = torch.nn.ModuleList([Block(model_channels) for _ in channel_mult])
        self.register_buffer("resample_filter", torch.tensor([1.0, 3.0, 3.0, 1.0]))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

def build(payload_src=None):
    global Block, Net
    Block = persistence.persistent_class(Block, payload_src)
    Net = persistence.persistent_class(Net, payload_src)
    torch.manual_seed(0)
    net = Net(img_resolution=8, img_channels=3, channel_mult=[1, 2, 2])
    return dict(ema=net, loss_fn=None, dataset_kwargs=EasyDict(path="cifar10.zip", xflip=False)), net.state_dict()
'''


def _write_pickle(tmp_path: Path, payload_src: str | None = None) -> tuple[Path, dict]:
    """Build the pickle in a child process (its modules never enter this one) and return it with the state dict."""
    pkg = tmp_path / "src"
    (pkg / "torch_utils").mkdir(parents=True)
    (pkg / "dnnlib").mkdir()
    (pkg / "training").mkdir()
    (pkg / "torch_utils" / "__init__.py").write_text("")
    (pkg / "torch_utils" / "persistence.py").write_text(PERSISTENCE)
    (pkg / "dnnlib" / "__init__.py").write_text("")
    (pkg / "dnnlib" / "util.py").write_text("class EasyDict(dict):\n    pass\n")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "networks.py").write_text(NETWORKS)
    out = tmp_path / "network-snapshot.pkl"
    script = textwrap.dedent(f"""
        import pickle, sys, torch
        sys.path.insert(0, {str(pkg)!r})
        from training import networks
        data, state = networks.build({payload_src!r})
        with open({str(out)!r}, "wb") as f:
            pickle.dump(data, f)
        torch.save(state, {str(tmp_path / 'expected.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    return out, torch.load(tmp_path / "expected.pt", weights_only=True)


def test_the_state_dict_and_arguments_come_back(tmp_path):
    path, expected = _write_pickle(tmp_path)
    tensors, info = read_network(path)
    assert tensors.keys() == expected.keys()  # parameters, persistent buffers; not the non-persistent one
    assert "scratch" not in tensors and "resample_filter" in tensors and "blocks.2.gain" in tensors
    for k, v in expected.items():
        assert torch.equal(tensors[k], v), k
    assert info["class_name"] == "Net"
    assert info["init_kwargs"] == {"img_resolution": 8, "img_channels": 3, "channel_mult": [1, 2, 2]}
    assert info["classes"]["blocks.0"] == "Block" and info["classes"]["enc"] == "torch.nn.modules.conv.Conv2d"
    assert len(info["module_src_sha256"]) == 64

    out = tmp_path / "converted.safetensors"
    summary = convert(path, out)
    assert summary["tensors"] == len(expected)
    from pipeline.cli import main
    assert main(["convert-edm", str(path), "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == out.read_bytes()
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["edm"])["class_name"] == "Net"
        assert torch.equal(f.get_tensor("enc.weight"), expected["enc.weight"])


def test_the_stored_source_code_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    path, expected = _write_pickle(tmp_path, payload_src=payload)
    tensors, info = read_network(path)
    assert not marker.exists() and tensors.keys() == expected.keys()
    import hashlib
    assert info["module_src_sha256"] == hashlib.sha256(payload.encode()).hexdigest()


@pytest.mark.parametrize("call", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call"])
def test_a_payload_pickle_is_refused_before_it_runs(tmp_path, call):
    marker = tmp_path / "ran"
    module, name = call.split(".")
    arg = f"touch {marker}" if call in ("os.system", "subprocess.call") else f"open({str(marker)!r}, 'w')"
    if call == "subprocess.call":
        arg = ["touch", str(marker)]

    class Payload:
        def __reduce__(self):
            return (getattr(__import__(module), name), (arg,))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Payload()}))
    with pytest.raises(StageError, match=r"evil.pkl: not a network pickle this project can read safely \(refused global"):
        read_network(path)
    assert not marker.exists()


def test_not_a_network(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(StageError, match=r"plain.pkl: no network under 'ema' \(found \['weights'\]\)"):
        read_network(path)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(StageError, match="junk.pkl: not a network pickle"):
        read_network(tmp_path / "junk.pkl")
