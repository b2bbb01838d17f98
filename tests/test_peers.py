"""Peer quantizers (ops/peers.py): each library's own quantizer on a tiny model, and bench --peer beside ditkit."""
from __future__ import annotations

import math

import pytest
import torch

from ditkit.formats.bundle import Bundle
from ditkit.formats.families import get_family
from ditkit.ops.peers import PEERS, peer_bundle, weights_bytes

import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
# output-SQNR floors (dB) on a tiny DiT with hidden 128, by precision (8-bit ~35, int8 dynamic and fp8 lower, 4-bit ~12)
FLOORS = {"torchao-int8-dynamic": 28.0, "torchao-int8-weight-only": 35.0, "torchao-int4-weight-only": 12.0,
          "quanto-qint8": 35.0, "quanto-qfloat8": 18.0, "gguf-Q8_0": 35.0, "gguf-Q4_K": 12.0}


def _dit():
    fam = get_family("dit")
    torch.manual_seed(0)
    tr = fam.transformer_cls()(**{**fam.tiny_config(), "attention_head_dim": 64}).eval()  # hidden 128
    return Bundle(family=fam, transformer=tr, kind="transformer")


def _sqnr(ref, out):
    return 10 * math.log10(float(ref.pow(2).sum()) / float((out - ref).pow(2).sum()))


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_quantizes_a_copy(name):
    base = _dit()
    fam, tr = base.family, base.transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    x, t, c = fam.dummy_inputs(tr, 4, (8, 8), 0)
    with torch.no_grad():
        ref = fam.predict(tr, x, t, c, 1.0)
        peer = peer_bundle(base, name)
        out = fam.predict(peer.transformer, x, t, c, 1.0)
    assert peer.name == name and peer.path is None
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())  # the base is untouched
    assert torch.isfinite(out).all()
    db = _sqnr(ref, out)
    assert db >= FLOORS[name], (name, db)
    assert db < 200  # really quantized, not a float copy
    if name != "gguf-Q4_K":  # hidden 128: Q4_K's 256-value blocks fit only the MLP's second linear
        assert weights_bytes(peer.transformer) < 0.75 * weights_bytes(tr), name


def test_bench_puts_peers_beside_ditkit(cli, tmp_path):
    base = _dit()
    src = tmp_path / "base"
    base.transformer.save_pretrained(src)
    q = tmp_path / "int8"
    assert cli("quantize", src, "-o", q).code == 0
    r = cli("bench", src, q, "--peer", "torchao-int8-dynamic", "--peer", "gguf-Q8_0", "--threads", "1",
            "--num-images", "0", "--repeats", "2", "--warmup", "1", "--image-repeats", "0", "--json")
    assert r.code == 0, r.err
    models = {m["name"]: m for m in r.json()["models"]}
    assert list(models)[2:] == ["torchao-int8-dynamic", "gguf-Q8_0"]
    for name in ("int8", "torchao-int8-dynamic", "gguf-Q8_0"):
        m = models[name]
        assert m["sqnr_db_step"] is not None and m["sqnr_db_step"] >= 25.0, m
        assert m["weights_bytes"] < models["base"]["weights_bytes"] and m["latency_ms_per_step"] > 0
    assert "Int8Tensor" in str(models["torchao-int8-dynamic"]["kernels"]) or \
        models["torchao-int8-dynamic"]["kernels"]["linear_classes"]
    r = cli("bench", src, "--peer", "torchao-int9")
    assert r.code == 2 and r.error_line.startswith("Error: unknown --peer 'torchao-int9', choose one of: "), r.err
