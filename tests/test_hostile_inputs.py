"""Hostile inputs (docs/reliability.md): configs that do not match their weights, NaN and inf anywhere, FIFOs and
/dev/zero where a file belongs, deep or duplicated JSON, bad LoRA values, decompression bombs, training data that
points outside --data, out-of-range options and options that do not apply.

One table, one test. Every case must give exit 2, exactly one stderr line `Error: ...` (at most 300 characters,
no traceback) containing the expected text, nothing on stdout, no output written (no OUT, no `.OUT.tmp-*`), and
byte-identical inputs (every regular file under the case's folder hashed before and after). A SIGALRM guard turns
a hang (a FIFO opened, /dev/zero read) into a failure instead of a stuck suite.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ditkit.cli.errors import EXIT_INPUT, MAX_LINE

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
GEN = ["-o", "{out}", "--steps", "1", "--num-images", "1"]
TRAIN = ["-o", "{out}.safetensors", "--steps", "1", "--batch-size", "1", "--validation-images", "1", "--validation-steps", "1"]


# -- building blocks a case's setup uses -------------------------------------------------------------------------

def copy(base: Path, d: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(base, d / name, symlinks=True))


def edit_json(path: Path, **fields) -> None:
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))  # json.dumps writes NaN / Infinity literals, as Python's json reads them


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def to_dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def rewrite_header(path: Path, fn) -> None:
    """Rewrite a safetensors header's JSON text with fn(text) -> text, keeping the data bytes."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    raw = fn(b[8:8 + n].decode().rstrip()).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b[8 + n:])


def duplicate_first_tensor(text: str) -> str:
    header = json.loads(text)
    name = next(k for k in header if k != "__metadata__")
    return text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"


def int_weights(path: Path) -> None:
    """The first float tensor of a safetensors file re-typed as int32 (same shape and byte count)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    name = next(k for k, v in state.items() if v.dtype == torch.float32 and v.ndim == 2)
    state[name] = state[name].view(torch.int32)
    save_file(state, path, metadata={"format": "pt"})


def png_bomb(path: Path, side: int = 30000) -> None:
    """A PNG whose header says side x side pixels (a few hundred bytes: PIL refuses it from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def image(path: Path, seed: int = 0) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def class_data(d: Path) -> Path:
    for label in ("0", "1"):
        (d / label).mkdir(parents=True)
        for i in range(2):
            image(d / label / f"{i}.png", i)
    return d


def metadata_data(d: Path, rows: list[dict], images: int = 1) -> Path:
    d.mkdir(parents=True)
    for i in range(images):
        image(d / f"{i}.png", i)
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def adapter(path: Path, rank: int = 4, alpha: float = 4.0, fmt: str = "peft", meta: dict | None = None,
            tensor_fn=None) -> Path:
    """An adapter for the tiny DiT (hidden 32) written by ditkit, then altered: metadata entries replaced by
    `meta`, tensors by tensor_fn(tensors)."""
    from safetensors.torch import save_file

    from ditkit.formats.lora import Adapter, to_tensors

    g = torch.Generator().manual_seed(0)
    mods = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v"]
    a = Adapter(A={m: torch.randn(rank, 32, generator=g) for m in mods},
                B={m: torch.randn(32, rank, generator=g) for m in mods}, rank=max(rank, 1), alpha=alpha, family="dit")
    tensors, md = to_tensors(a, fmt)
    md.update(meta or {})
    save_file(tensor_fn(tensors) if tensor_fn else tensors, str(path), metadata=md)
    return path


def ditkit_lora_meta(path_fields: dict) -> dict:
    doc = {"format": "peft", "rank": 4, "alpha": 4.0, "family": "dit", "targets": ["attention"]}
    doc.update(path_fields)
    return {"ditkit_lora": json.dumps(doc)}


# -- the table -----------------------------------------------------------------------------------------------------
# case -> (setup(w, d) -> argv (with {out}), expected text). `w` holds the tiny models (w.dit, w.pixart, w.emb);
# `d` is the case's own folder (hashed before and after); {out} is a path under d that must not appear.

def config_case(command: str = "info", **fields):
    def setup(w, d):
        ckpt = copy(w.dit, d)
        edit_json(ckpt / "transformer" / "config.json", **fields)
        return [command, ckpt] + (GEN + ["--labels", "1"] if command == "generate" else [])
    return setup


def file_case(rel: str, how, command: str = "info"):
    def setup(w, d):
        ckpt = copy(w.dit, d)
        how(ckpt / rel)
        return [command, ckpt] + (GEN + ["--labels", "1"] if command == "generate" else [])
    return setup


def text_case(rel: str, text: str | bytes):
    def setup(w, d):
        ckpt = copy(w.dit, d)
        p = ckpt / rel
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["info", ckpt]
    return setup


def manifest_case(defaults: dict | str):
    def setup(w, d):
        ckpt = copy(w.dit, d)
        text = defaults if isinstance(defaults, str) else json.dumps(
            {"format_version": 1, "family": "dit", "op": "prune", "defaults": defaults})
        (ckpt / "ditkit.json").write_text(text)
        return ["generate", ckpt, "-o", "{out}", "--num-images", "1", "--labels", "1"]
    return setup


def single_file_case(config_fn=None, meta_config: str | None = None):
    """A bare transformer .safetensors and its --config (config_fn(path) alters it) or metadata config."""
    def setup(w, d):
        from safetensors.torch import load_file, save_file

        src = w.dit / WEIGHTS
        weights, conf = d / "model.safetensors", d / "config.json"
        if meta_config is not None:
            save_file(load_file(src), str(weights), metadata={"format": "pt", "config": meta_config, "family": "dit"})
            return ["info", weights]
        shutil.copy(src, weights)
        shutil.copy(w.dit / "transformer" / "config.json", conf)
        config_fn(conf)
        return ["info", weights, "--family", "dit", "--config", conf]
    return setup


def prompts_case(how, model: str = "pixart", extra: tuple = ()):
    def setup(w, d):
        p = d / "prompts.txt"
        how(p)
        args = ["generate", getattr(w, model), *GEN, "--prompts-file", p, *extra]
        return args + (["--embeddings", w.emb] if model == "pixart" else [])
    return setup


def option_case(*argv):
    def setup(w, d):
        return [a.replace("{dit}", str(w.dit)) for a in argv]
    return setup


def lora_case(**kw):
    def setup(w, d):
        return ["generate", w.dit, *GEN, "--labels", "1", "--lora", adapter(d / "a.safetensors", **kw)]
    return setup


def lora_file_case(how):
    def setup(w, d):
        p = d / "a.safetensors"
        how(p)
        return ["generate", w.dit, *GEN, "--labels", "1", "--lora", p]
    return setup


def data_case(build):
    """lora-train on the tiny DiT with --data built by build(data_dir, outside_dir)."""
    def setup(w, d):
        outside = d / "outside"
        outside.mkdir()
        image(outside / "secret.png", 9)
        (outside / "secret.txt").write_text("a secret\n")
        data = d / "data"
        build(data, outside)
        return ["lora-train", w.dit, "--data", data, *TRAIN]
    return setup


def nan_tensor(tensors):
    k = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[k] = tensors[k].clone()
    tensors[k][0, 0] = float("nan")
    return tensors


def int_tensor(tensors):
    k = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[k] = tensors[k].to(torch.int32)
    return tensors


def kohya_alpha_shape(tensors):
    k = next(k for k in tensors if k.endswith(".alpha"))
    tensors[k] = torch.tensor([4.0, 4.0])
    return tensors


def symlinked_file_name(data, outside):
    data.mkdir()
    (data / "inside.png").symlink_to(outside / "secret.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "inside.png", "label": 1}) + "\n")


def symlinked_image(data, outside):
    data.mkdir()
    image(data / "a.png")
    (data / "b.png").symlink_to(outside / "secret.png")


def fifo_image(data, outside):
    data.mkdir()
    image(data / "a.png")
    os.mkfifo(data / "b.png")


def dev_zero_caption(data, outside):
    data.mkdir()
    image(data / "a.png")
    (data / "a.txt").symlink_to("/dev/zero")


def caption_outside(data, outside):
    data.mkdir()
    image(data / "a.png")
    (data / "a.txt").symlink_to(outside / "secret.txt")


def fifo_metadata(data, outside):
    data.mkdir()
    image(data / "0.png")
    os.mkfifo(data / "metadata.jsonl")


def metadata_outside(data, outside):
    data.mkdir()
    image(data / "0.png")
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "label": 0}) + "\n")
    (data / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")


def class_folder_outside(data, outside):
    data.mkdir()
    (outside / "0").mkdir()
    image(outside / "0" / "x.png")
    (data / "0").symlink_to(outside / "0")


def bomb_in_data(data, outside):
    data.mkdir()
    (data / "0").mkdir()
    png_bomb(data / "0" / "big.png")


def non_utf8_metadata(data, outside):
    metadata_data(data, [])
    (data / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "text": "\xff\xfe"}\n')


def deep_metadata(data, outside):
    metadata_data(data, [])
    (data / "metadata.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")


def distill_bomb(w, d):
    imgs = d / "imgs"
    imgs.mkdir()
    png_bomb(imgs / "big.png")
    return ["distill", w.dit, "--teacher", w.dit, "-o", "{out}", "--mode", "recover", "--images", imgs,
            "--steps", "1"]


DEEP = "[" * 100_000 + "]" * 100_000
CASES = {
    # a config against its weights, before anything is built
    "config-num-layers-65536": (config_case(num_layers=65536), "num_layers=65536 but the weights hold 2"),
    "config-num-layers-3": (config_case(num_layers=3), "num_layers=3 but the weights hold 2"),
    "config-num-layers-1": (config_case(num_layers=1), "num_layers=1 but the weights hold 2"),
    "config-heads-wider": (config_case(num_attention_heads=4), "weights do not fit the config"),
    "config-head-dim-wider": (config_case(attention_head_dim=64), "weights do not fit the config"),
    "config-in-channels": (config_case(in_channels=8), "weights do not fit the config"),
    "config-sample-size-huge": (config_case(sample_size=60000), "position table"),
    "config-norm-eps-nan": (config_case(norm_eps=float("nan")), "norm_eps is nan"),
    "config-norm-eps-inf": (config_case(norm_eps=float("inf")), "norm_eps is inf"),
    "config-norm-eps-minus-inf": (config_case(norm_eps=float("-inf")), "norm_eps is -inf"),
    "config-nested-nan": (config_case(extra_field={"a": [1.0, float("nan")]}), "extra_field.a[1] is nan"),
    "config-nan-generate": (config_case("generate", norm_eps=float("nan")), "norm_eps is nan"),
    "config-1e309": (text_case("transformer/config.json", '{"_class_name": "DiTTransformer2DModel", '
                                                          '"norm_eps": 1e309}'), "norm_eps is inf"),
    "config-deep-list": (text_case("transformer/config.json", DEEP), "nested too deeply"),
    "config-deep-object": (text_case("transformer/config.json", '{"a":' * 100_000 + "1" + "}" * 100_000),
                           "nested too deeply"),
    "config-duplicate-key": (text_case("transformer/config.json", '{"num_layers": 2, "num_layers": 2}'),
                             "appears twice"),
    "config-not-utf8": (text_case("transformer/config.json", b'{"_class_name": "\xff"}'), "not UTF-8"),
    "config-fifo": (file_case("transformer/config.json", fifo), "is a FIFO, not a regular file"),
    "config-dev-zero": (file_case("transformer/config.json", to_dev_zero), "is a device, not a regular file"),
    "config-over-cap": (file_case("transformer/config.json", lambda p: os.truncate(p, (64 << 20) + 1)),
                        "more than the 64 MB"),
    "model-index-fifo": (file_case("model_index.json", fifo), "is a FIFO"),
    "model-index-dev-zero": (file_case("model_index.json", to_dev_zero), "is a device"),
    "scheduler-config-dev-zero": (file_case("scheduler/scheduler_config.json", to_dev_zero), "is a device"),
    "vae-config-deep": (text_case("vae/config.json", DEEP), "nested too deeply"),
    "manifest-fifo": (file_case("ditkit.json", fifo), "is a FIFO"),
    "manifest-dev-zero-generate": (file_case("ditkit.json", to_dev_zero, "generate"), "is a device"),
    # weights
    "weights-duplicate-tensor": (file_case(WEIGHTS, lambda p: rewrite_header(p, duplicate_first_tensor)),
                                 "lists a tensor twice"),
    "weights-int-dtype": (file_case(WEIGHTS, int_weights), "not floating point"),
    "weights-fifo": (file_case(WEIGHTS, fifo), "is a FIFO"),
    "weights-dev-zero": (file_case(WEIGHTS, to_dev_zero), "is a device"),
    "weights-header-deep": (file_case(WEIGHTS, lambda p: rewrite_header(p, lambda t: DEEP)), "corrupt"),
    "weights-int-dtype-generate": (file_case(WEIGHTS, int_weights, "generate"), "not floating point"),
    # a manifest's stored defaults, by the CLI's rules
    "defaults-guidance-negative": (manifest_case({"guidance": -999999}), "defaults.guidance is -999999"),
    "defaults-guidance-nan": (manifest_case('{"format_version": 1, "family": "dit", "defaults": {"guidance": NaN}}'),
                              "defaults.guidance is nan"),
    "defaults-guidance-inf": (manifest_case('{"format_version": 1, "family": "dit", '
                                            '"defaults": {"guidance": Infinity}}'), "defaults.guidance is inf"),
    "defaults-steps-zero": (manifest_case({"steps": 0}), "defaults.steps is 0"),
    "defaults-steps-huge": (manifest_case({"steps": 10**6}), "defaults.steps is 1000000"),
    "defaults-sampler-number": (manifest_case({"sampler": 7}), "defaults.sampler is 7"),
    "manifest-deep": (manifest_case('{"a":' * 100_000 + "1" + "}" * 100_000), "nested too deeply"),
    "manifest-duplicate-key": (manifest_case('{"format_version": 1, "format_version": 1}'), "appears twice"),
    # a bare .safetensors file and its --config
    "single-config-fifo": (single_file_case(fifo), "--config"),
    "single-config-dev-zero": (single_file_case(to_dev_zero), "is a device"),
    "single-config-num-layers": (single_file_case(lambda p: edit_json(p, num_layers=65536)), "num_layers=65536"),
    "single-config-nan": (single_file_case(lambda p: edit_json(p, norm_eps=float("nan"))), "norm_eps is nan"),
    "single-config-wider": (single_file_case(lambda p: edit_json(p, attention_head_dim=64)),
                            "weights do not fit the config"),
    "single-meta-config-deep": (single_file_case(meta_config=DEEP), "the config in its metadata is not JSON"),
    # prompts files
    "prompts-fifo": (prompts_case(fifo), "--prompts-file"),
    "prompts-dev-zero": (prompts_case(to_dev_zero), "is a device"),
    "prompts-not-utf8": (prompts_case(lambda p: p.write_bytes(b"a cat\n\xff\xfe\n")), "not UTF-8"),
    "prompts-directory": (prompts_case(lambda p: p.mkdir()), "is a directory"),
    "prompts-for-class-model": (prompts_case(lambda p: p.write_text("a cat\n"), "dit"), "class-conditional"),
    "prompts-empty-for-class-model": (prompts_case(lambda p: p.write_text("\n \n"), "dit"), "holds no prompts"),
    "embeddings-for-class-model": (lambda w, d: ["generate", w.dit, *GEN, "--embeddings", w.emb],
                                   "class-conditional: use --labels, not --embeddings"),
    "prompt-1mb-echo": (lambda w, d: ["generate", w.pixart, *GEN, "--embeddings", w.emb, "--prompt", "x" * (1 << 20)],
                        "is not in the embeddings file"),
    # options out of range, non-finite floats
    "seed-negative": (option_case("generate", "{dit}", *GEN, "--labels", "1", "--seed", "-1"), "--seed must be in"),
    "seed-2-70": (option_case("generate", "{dit}", *GEN, "--labels", "1", "--seed", str(2**70)), "--seed must be in"),
    "guidance-nan": (option_case("generate", "{dit}", *GEN, "--labels", "1", "--guidance", "nan"),
                     "--guidance must be a finite number"),
    "guidance-inf": (option_case("generate", "{dit}", *GEN, "--labels", "1", "--guidance", "inf"),
                     "--guidance must be a finite number"),
    "info-batch-1e21": (option_case("info", "{dit}", "--batch", str(10**21)), "--batch is out of range"),
    "info-batch-too-big": (option_case("info", "{dit}", "--batch", "100000"), "--batch must be at most 4096"),
    "prune-seed-negative": (option_case("prune", "{dit}", "-o", "{out}", "--method", "depth", "--keep", "1",
                                        "--seed", "-1"), "--seed must be in"),
    "distill-lr-nan": (option_case("distill", "{dit}", "-o", "{out}", "--mode", "steps", "--lr", "nan"),
                       "--lr"),
    "lora-lr-inf": (lambda w, d: ["lora-train", w.dit, "--data", class_data(d / "data"), *TRAIN, "--lr", "inf"],
                    "--lr"),
    "cache-speedup-nan": (option_case("cache", "{dit}", "-o", "{out}", "--target-speedup", "nan"),
                          "--target-speedup"),
    # LoRA files
    "lora-rank-0": (lora_case(rank=0), "rank 0"),
    "lora-alpha-nan": (lora_case(meta=ditkit_lora_meta({"alpha": float("nan")})), "alpha (ditkit metadata) is nan"),
    "lora-alpha-1e309": (lora_case(meta={"ditkit_lora": '{"alpha": 1e309, "family": "dit"}'}), "is inf"),
    "lora-alpha-string": (lora_case(meta=ditkit_lora_meta({"alpha": "abc"})), "must be a number"),
    "lora-ss-alpha-string": (lora_case(fmt="kohya", meta={"ditkit_lora": "{}", "ss_network_alpha": "x"},
                                       tensor_fn=lambda t: {k: v for k, v in t.items() if not k.endswith(".alpha")}),
                             "ss_network_alpha must be a number"),
    "lora-kohya-alpha-shape": (lora_case(fmt="kohya", meta={"ditkit_lora": "{}"}, tensor_fn=kohya_alpha_shape),
                               "must be one number"),
    "lora-nan-weights": (lora_case(tensor_fn=nan_tensor), "NaN or inf"),
    "lora-int-weights": (lora_case(tensor_fn=int_tensor), "not floating point"),
    "lora-meta-deep": (lora_case(meta={"ditkit_lora": DEEP}), "metadata is not JSON"),
    "lora-fifo": (lora_file_case(fifo), "is a FIFO"),
    "lora-dev-zero": (lora_file_case(to_dev_zero), "is a device"),
    # training data stays inside --data
    "data-file-name-dotdot": (data_case(lambda d, o: metadata_data(d, [{"file_name": "../outside/secret.png",
                                                                        "label": 1}])), "leads outside"),
    "data-file-name-absolute": (data_case(lambda d, o: metadata_data(d, [{"file_name": str(o / "secret.png"),
                                                                          "label": 1}])), "is absolute"),
    "data-file-name-deep-dotdot": (data_case(lambda d, o: metadata_data(d, [{"file_name": "0.png", "label": 0},
                                                                            {"file_name": "../../../../etc/hostname",
                                                                             "label": 1}])), "line 2"),
    "data-file-name-symlink-out": (data_case(symlinked_file_name), "leads outside the data folder"),
    "data-image-symlink-out": (data_case(symlinked_image), "b.png leads outside the data folder"),
    "data-image-fifo": (data_case(fifo_image), "b.png is a FIFO"),
    "data-caption-dev-zero": (data_case(dev_zero_caption), "a.txt leads outside"),
    "data-caption-outside": (data_case(caption_outside), "a.txt leads outside"),
    "data-metadata-fifo": (data_case(fifo_metadata), "metadata.jsonl is a FIFO"),
    "data-metadata-outside": (data_case(metadata_outside), "metadata.jsonl leads outside"),
    "data-class-folder-outside": (data_case(class_folder_outside), "class folder 0 leads outside"),
    "data-png-bomb": (data_case(bomb_in_data), "decompression bomb"),
    "data-metadata-not-utf8": (data_case(non_utf8_metadata), "not UTF-8"),
    "data-metadata-deep": (data_case(deep_metadata), "line 1 is not JSON"),
    "data-label-string": (data_case(lambda d, o: metadata_data(d, [{"file_name": "0.png", "label": "x" * 10**6}])),
                          "label must be a class id"),
    "data-file-name-number": (data_case(lambda d, o: metadata_data(d, [{"file_name": 7, "label": 0}])),
                              "needs a \"file_name\""),
    "distill-images-bomb": (distill_bomb, "decompression bomb"),
}


class World:
    def __init__(self, dit: Path, pixart: Path, emb: Path):
        self.dit, self.pixart, self.emb = dit, pixart, emb


@pytest.fixture(scope="module")
def world(tiny_dir, tiny_embeddings):
    return World(tiny_dir("dit"), tiny_dir("pixart"), tiny_embeddings("pixart"))


def digest(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root (symlinks and special files are not followed or opened)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = stat.S_IFMT(st.st_mode)
    return out


@contextlib.contextmanager
def no_hang(seconds: int = 120):
    def boom(*_):
        raise TimeoutError(f"ran over {seconds} s (a FIFO opened or an endless file read?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(case, cli, world, tmp_path):
    setup, text = CASES[case]
    d = tmp_path / "case"
    d.mkdir()
    out = d / "out"
    argv = [str(a).replace("{out}", str(out)) for a in setup(world, d)]
    before, models_before = digest(d), digest(world.dit)
    with no_hang():
        r = cli(*argv)
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert r.code == EXIT_INPUT, (r.code, r.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err[-2000:]
    assert "Traceback" not in r.err and len(lines[0]) <= len("Error: ") + MAX_LINE, lines[0][:400]
    assert text in lines[0], lines[0]
    assert r.out == ""
    assert digest(d) == before and digest(world.dit) == models_before  # nothing written (no OUT, .OUT.tmp-*, OUT.ckpt)


def test_there_are_enough_cases():
    assert len(CASES) >= 50


# -- provenance: a manifest's sha256 is checked, not copied ---------------------------------------------------------

def test_forged_sha256_is_recorded_as_unverified(cli, world, tmp_path):
    from ditkit.formats.manifest import weights_sha256

    ckpt = copy(world.dit, tmp_path)
    forged = "f" * 64
    (ckpt / "ditkit.json").write_text(json.dumps({"format_version": 1, "family": "dit", "op": "import",
                                                  "sha256": forged}))
    r = cli("export", ckpt, "-o", tmp_path / "out", "--format", "diffusers")
    assert r.code == 0, r.err
    assert "claims sha256 ffffffffffffffff" in r.err and "sha256_verified: false" in r.err
    m = json.loads((tmp_path / "out" / "ditkit.json").read_text())
    actual = weights_sha256(ckpt)
    assert m["parent"]["sha256"] == actual and m["parent"]["sha256_verified"] is False
    assert m["parent"]["claimed_sha256"] == forged
    assert m["lineage"][-1]["sha256"] == actual and m["lineage"][-1]["sha256_verified"] is False
    r = cli("generate", ckpt, "-o", tmp_path / "imgs", "--steps", "1", "--num-images", "1", "--labels", "1")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "imgs" / "generate.json").read_text())["source_sha256"] == actual


def test_true_sha256_is_recorded_verified_and_quiet(cli, world, tmp_path):
    from ditkit.formats.manifest import weights_sha256

    r = cli("export", world.dit, "-o", tmp_path / "a", "--format", "diffusers")
    assert r.code == 0, r.err
    r = cli("export", tmp_path / "a", "-o", tmp_path / "b", "--format", "diffusers")
    assert r.code == 0 and "claims" not in r.err, r.err
    m = json.loads((tmp_path / "b" / "ditkit.json").read_text())
    assert m["parent"]["sha256"] == weights_sha256(tmp_path / "a") and "sha256_verified" not in m["parent"]


# -- one image-folder reader ----------------------------------------------------------------------------------------

def test_one_image_folder_reader(tmp_path):
    from ditkit.formats import datasets, image_folder

    assert datasets.read_image_folder is image_folder.read_image_folder
    f = image_folder.read_image_folder(class_data(tmp_path / "data"), (8, 8), flag="--images")
    x, labels = f.tensors()
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and labels == [0, 0, 1, 1]
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # symlinks that stay inside the folder are read
    (tmp_path / "data" / "1" / "2.png").symlink_to(tmp_path / "data" / "0" / "0.png")
    assert len(image_folder.read_image_folder(tmp_path / "data").files) == 5
