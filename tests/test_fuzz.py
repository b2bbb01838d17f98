"""Fuzzing (hypothesis, fixed budget, derandomized) of the parsers that read untrusted bytes: the safetensors
header check, config.json parsing and ditkit.json manifests. Only typed ditkit errors may come out; a header
the check accepts must also load in safetensors itself; nothing may hang (an alarm guards every example)."""
from __future__ import annotations

import contextlib
import json
import signal
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditkit.formats.errors import DitkitError

BUDGET = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    def boom(*_):
        raise TimeoutError(f"parser ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def only_typed_errors(fn, *args):
    """fn(*args) either returns or raises a DitkitError; returns (result, error)."""
    with no_hang():
        try:
            return fn(*args), None
        except DitkitError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(e)
            return None, e


def _file(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="ditkit-fuzz-"))
    (d / name).write_bytes(data)
    return d / name


VALID = None


def valid_safetensors() -> bytes:
    global VALID
    if VALID is None:
        from safetensors.torch import save

        VALID = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8),
                      "c": torch.zeros(0)}, metadata={"format": "pt"})
    return VALID


def header_bytes(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "X9"]) | json_values,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 40), min_size=2, max_size=2) | json_values,
})
headers = st.dictionaries(st.text(min_size=1, max_size=4) | st.just("__metadata__"), entries | json_values, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        if not b:
            break
        i = pos % len(b)
        if kind == 0:
            b[i] = val
        elif kind == 1:
            del b[i:]
        else:
            b[i:i] = bytes([val])
    return bytes(b)


edit_lists = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)


def check_header(data: bytes):
    from safetensors.torch import load_file

    from ditkit.formats.safetensors_check import read_header

    path = _file(data, "w.safetensors")
    header, _ = only_typed_errors(read_header, path)
    if header is not None:  # what the check accepts, safetensors loads
        load_file(str(path))


@BUDGET
@given(st.binary(max_size=200))
def test_fuzz_header_random_bytes(data):
    check_header(data)


@BUDGET
@given(edit_lists)
def test_fuzz_header_mutated_file(edits):
    check_header(mutate(valid_safetensors(), edits))


@BUDGET
@given(headers, st.binary(max_size=48))
def test_fuzz_header_structure(header, payload):
    check_header(header_bytes(header) + payload)


def test_deep_nesting_and_huge_numbers_are_format_errors(tmp_path):
    from ditkit.formats.errors import FormatError
    from ditkit.formats.safetensors_check import read_header, read_json

    for text in ("[" * 100_000 + "]" * 100_000, "1" * 5000, '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        with pytest.raises(FormatError):
            read_header(_file(struct.pack("<Q", len(text)) + text.encode(), "x.safetensors"))
        with pytest.raises(FormatError):
            read_json(_file(text.encode(), "config.json"))


# -- config.json ---------------------------------------------------------------------------------------------

ARCH = ["_class_name", "sample_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim",
        "in_channels", "out_channels", "num_embeds_ada_norm"]
configs = st.dictionaries(st.sampled_from(ARCH) | st.text(max_size=6),
                          json_values | st.sampled_from(["DiTTransformer2DModel", "FluxTransformer2DModel"]),
                          max_size=8)


def check_config_bytes(data: bytes):
    from ditkit.formats.families import detect_family
    from ditkit.formats.safetensors_check import read_json

    path = _file(data, "config.json")
    conf, _ = only_typed_errors(read_json, path)
    if conf is not None:
        only_typed_errors(detect_family, conf, str(path))


@BUDGET
@given(configs)
def test_fuzz_config_fields(conf):
    check_config_bytes(json.dumps(conf).encode())


@BUDGET
@given(edit_lists)
def test_fuzz_config_mutated(edits):
    real = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 16,
            "in_channels": 4, "out_channels": 8, "num_layers": 2, "sample_size": 8, "patch_size": 2,
            "num_embeds_ada_norm": 1000}
    check_config_bytes(mutate(json.dumps(real).encode(), edits))


@BUDGET
@given(st.binary(max_size=120))
def test_fuzz_config_random_bytes(data):
    check_config_bytes(data)


# -- ditkit.json -----------------------------------------------------------------------------------------------

FIELDS = ["format_version", "family", "op", "sha256", "config", "report", "parent", "lineage", "defaults"]
manifests = st.dictionaries(st.sampled_from(FIELDS), json_values | st.fixed_dictionaries(
    {}, optional={"path": json_values, "sha256": json_values, "sampler": json_values, "steps": json_values,
                  "guidance": json_values}), max_size=8)


def check_manifest_bytes(data: bytes):
    """read_manifest, then what ditkit does with a manifest: defaults, lineage, a child's manifest."""
    from torch import nn

    from ditkit.formats.bundle import Bundle
    from ditkit.formats.families import get_family
    from ditkit.formats.manifest import new_manifest, read_manifest

    path = _file(data, "ditkit.json")
    m, _ = only_typed_errors(read_manifest, path.parent)
    if m is not None:
        b = Bundle(family=get_family("dit"), transformer=nn.Linear(1, 1), manifest=m, path=None)
        defaults = b.defaults()
        assert isinstance(defaults["steps"], int) and isinstance(defaults["sampler"], str)
        child = new_manifest(family="dit", op="prune", config={}, report={}, parent=b.parent_record())
        assert isinstance(json.dumps(child, default=str), str) and isinstance(child["lineage"], list)


@BUDGET
@given(manifests)
def test_fuzz_manifest_fields(m):
    check_manifest_bytes(json.dumps(m).encode())


@BUDGET
@given(edit_lists)
def test_fuzz_manifest_mutated(edits):
    m = {"format_version": 1, "family": "dit", "op": "prune", "sha256": "ab" * 32, "config": {}, "report": {},
         "parent": {"path": "../base", "sha256": "cd" * 32}, "lineage": [{"op": "import", "path": "x", "sha256": None}],
         "defaults": {"sampler": "ddim", "steps": 25, "guidance": 4.0}}
    check_manifest_bytes(mutate(json.dumps(m).encode(), edits))


def test_a_newer_manifest_is_refused(tmp_path):
    from ditkit.formats.errors import FormatError
    from ditkit.formats.manifest import read_manifest

    (tmp_path / "ditkit.json").write_text('{"format_version": 99}')
    with pytest.raises(FormatError, match="newer than this ditkit reads"):
        read_manifest(tmp_path)


# -- feedback/feedback.safetensors (distill --mode feedback): its config metadata --------------------------------

_FB = {}


def _feedback_parts():
    """A tiny DiT transformer and a matching feedback module's tensors (built once)."""
    if not _FB:
        import diffusers

        from ditkit.ops.feedback import FeedbackModule

        tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                                              num_embeds_ada_norm=10).eval()
        from ditkit.formats.feedback import fingerprint

        _FB.update(tr=tr, tensors={k: v.detach().clone().contiguous()
                                   for k, v in FeedbackModule(tr.transformer_blocks[1], "x").state_dict().items()},
                   backbone=fingerprint(tr))
    return _FB


def check_feedback_config(text: str):
    from safetensors.torch import save_file

    from ditkit.formats.families import get_family
    from ditkit.formats.feedback import DIR, WEIGHTS, load_feedback

    parts = _feedback_parts()
    root = Path(tempfile.mkdtemp(prefix="ditkit-fuzz-"))
    (root / DIR).mkdir()
    save_file(parts["tensors"], str(root / DIR / WEIGHTS), metadata={"config": text})
    fb, _ = only_typed_errors(load_feedback, root, get_family("dit"), parts["tr"])
    if fb is not None:  # accepted: a schedule that generate can follow
        assert fb.schedule.num_blocks == 2 and len(fb.schedule.partial) == fb.schedule.steps


feedback_configs = st.fixed_dictionaries({}, optional={
    "source": json_values | st.sampled_from(["transformer_blocks.1", "transformer_blocks.9", "pos_embed", ""]),
    "backbone": json_values,
    "schedule": json_values | st.fixed_dictionaries({}, optional={
        "sampler": json_values, "steps": json_values | st.integers(-3, 40), "num_blocks": json_values | st.just(2),
        "block": json_values | st.integers(-2, 3), "partial": json_values | st.lists(st.booleans(), max_size=6)})})


@BUDGET
@given(feedback_configs)
def test_fuzz_feedback_config_fields(conf):
    check_feedback_config(json.dumps(conf))


@BUDGET
@given(edit_lists)
def test_fuzz_feedback_config_mutated(edits):
    real = {"source": "transformer_blocks.1", "backbone": _feedback_parts()["backbone"],
            "schedule": {"sampler": "ddim", "steps": 4, "num_blocks": 2, "block": 1,
                         "partial": [False, True, True, False]}}
    check_feedback_config(mutate(json.dumps(real).encode(), edits).decode("utf-8", "replace"))


# -- LoRA metadata and training-data metadata.jsonl -----------------------------------------------------------------

SMALL = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SMALL
@given(json_values, st.sampled_from(["ditkit_lora", "lora_adapter_metadata", "ss_network_alpha"]))
def test_fuzz_lora_alpha(alpha, where):
    """Any alpha a file may carry (NaN, 1e309, strings, objects) gives an adapter with a finite alpha or a
    FormatError; never another exception."""
    import math

    from safetensors.torch import save_file

    from ditkit.formats.lora import load_adapter

    g = torch.Generator().manual_seed(0)
    tensors = {"transformer.a.lora_A.weight": torch.randn(2, 4, generator=g),
               "transformer.a.lora_B.weight": torch.randn(4, 2, generator=g)}
    text = json.dumps(alpha)
    meta = {"ditkit_lora": json.dumps({"alpha": alpha})} if where == "ditkit_lora" else \
        {where: json.dumps({"transformer.lora_alpha": alpha}) if where == "lora_adapter_metadata" else text}
    path = _file(b"", "a.safetensors")
    save_file(tensors, str(path), metadata=meta)
    a, _ = only_typed_errors(load_adapter, path)
    if a is not None:
        assert math.isfinite(a.alpha) and math.isfinite(a.scale)


@SMALL
@given(st.lists(json_values | st.fixed_dictionaries({"file_name": json_values | st.sampled_from(
    ["0.png", "../0.png", "/etc/hostname", "sub/../0.png", ".", ""])}, optional={"label": json_values,
                                                                                "text": json_values}), max_size=3))
def test_fuzz_image_folder_metadata(rows):
    """metadata.jsonl rows of any shape: an ImageFolder of files inside the folder, or a FormatError."""
    import numpy as np
    from PIL import Image

    from ditkit.formats.image_folder import read_image_folder

    root = Path(tempfile.mkdtemp(prefix="ditkit-fuzz-")) / "data"
    root.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "0.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    f, _ = only_typed_errors(read_image_folder, root)
    if f is not None:
        assert all((root / n).resolve().is_relative_to(root.resolve()) for n in f.files)
