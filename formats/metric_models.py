"""The weights of bench's quality metrics, read from local files only: nothing here downloads.

| metric | what to give | the file(s) | default place |
|---|---|---|---|
| clip | a directory | a transformers CLIPModel + CLIPProcessor saved with save_pretrained (config.json, model.safetensors, tokenizer and preprocessor files) | none: `--metric clip=DIR` |
| fid, kid | a file, or a directory holding it | torch-fidelity's Inception-v3 state dict `weights-inception-2015-12-05-6726825d.pth` (or the same keys in `.safetensors`) | torch hub's checkpoints folder |
| lpips | a file, or a directory holding it | torchvision's AlexNet state dict `alexnet-owt-7be5be79.pth` (or `.safetensors`); LPIPS's linear heads are the `alex.pth` torchmetrics ships (or one in the directory) | torch hub's checkpoints folder |

The default place is where torch-fidelity and torchvision would have downloaded the file (`torch.hub.get_dir()`,
i.e. $TORCH_HOME/hub/checkpoints), so a machine that once ran them already has it. A missing or wrong file is a
FormatError naming the file, where to fetch it and where to put it. `.pth` files are read with
torch.load(weights_only=True): tensors only, no code runs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import FormatError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_HEADS_FILE = "alex.pth"  # LPIPS v0.1 linear heads (lpips / torchmetrics ship it)


def hub_checkpoints() -> Path:
    """Where torch.hub (torch-fidelity, torchvision) keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file(metric: str, given: str | None, filename: str, url: str) -> Path:
    """The weights file of `metric`: the path given (a file, or a directory holding `filename` or its .safetensors
    twin), else `filename` in torch hub's checkpoints folder."""
    where = Path(given).expanduser() if given else hub_checkpoints()
    if where.is_dir() or not given:
        names = (filename, Path(filename).with_suffix(".safetensors").name)
        found = [where / n for n in names if (where / n).is_file()]
        if not found:
            raise FormatError(f"--metric {metric} needs {filename}: fetch {url} and put it in {where}"
                              + ("" if given else f" (or pass --metric {metric}=FILE)"))
        return found[0]
    if not where.is_file():
        raise FormatError(f"--metric {metric}: {where} does not exist; it needs {filename}: fetch {url} and give "
                          f"its path (--metric {metric}=FILE) or put it in {hub_checkpoints()}")
    return where


def read_state_dict(path: Path, what: str) -> dict:
    """A plain {name: tensor} dict from .safetensors or a .pth/.pt read with weights_only=True."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise FormatError(f"{what} {path} is not a readable state dict ({type(e).__name__}: {str(e)[:100]}); "
                          "give the file named in docs/bench.md") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"{what} {path} is not a state dict of tensors; give the file named in docs/bench.md")
    return sd


def load_inception(given: str | None, metric: str = "fid"):
    """torch-fidelity's Inception-v3 on the local weights (a file, a directory, or torch hub's folder)."""
    import torch

    from ditkit.nn.metric_nets import inception

    path = weights_file(metric, given, INCEPTION_FILE, INCEPTION_URL)
    sd = read_state_dict(path, f"--metric {metric}")
    # torch-fidelity reads its file with a full unpickler; give it the checked tensors, re-saved, instead
    with tempfile.TemporaryDirectory(prefix="ditkit-inception-") as tmp:
        checked = Path(tmp) / INCEPTION_FILE
        torch.save({k: v.contiguous() for k, v in sd.items()}, checked)
        try:
            return inception(str(checked))
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
            raise FormatError(f"--metric {metric}: {path} is not torch-fidelity's Inception-v3 ({INCEPTION_FILE}): "
                              f"{str(e).splitlines()[0][:120]}; fetch {INCEPTION_URL}") from None


def load_lpips(given: str | None, metric: str = "lpips"):
    """LPIPS (AlexNet): torchvision's AlexNet weights from the path, the linear heads from the directory or from
    torchmetrics' copy."""
    import torch

    from ditkit.nn.metric_nets import LPIPS, torchmetrics

    path = weights_file(metric, given, ALEXNET_FILE, ALEXNET_URL)
    trunk = {k[len("features."):]: v for k, v in read_state_dict(path, f"--metric {metric}").items()
             if k.startswith("features.")}
    heads_file = path.parent / LPIPS_HEADS_FILE
    if not heads_file.is_file():
        heads_file = Path(torchmetrics().__file__).parent / "functional" / "image" / "lpips_models" / LPIPS_HEADS_FILE
    heads = read_state_dict(heads_file, "LPIPS linear heads")
    net = LPIPS()
    try:
        net.features.load_state_dict(trunk)
        net.lins.load_state_dict({k.replace("lin", "", 1): v for k, v in heads.items()})  # lin0.* -> 0.*
    except RuntimeError as e:
        raise FormatError(f"--metric {metric}: {path} is not torchvision's AlexNet ({ALEXNET_FILE}) "
                          f"({str(e).splitlines()[0][:120]}); fetch {ALEXNET_URL}") from None
    return net.to(torch.float32)


def load_clip(given: str | None, metric: str = "clip"):
    """(CLIPModel, CLIPProcessor) from a local directory saved with save_pretrained; never from a hub."""
    if not given:
        raise FormatError(f"--metric {metric} needs a local CLIP model directory: --metric {metric}=DIR, a "
                          "transformers CLIPModel + CLIPProcessor saved with save_pretrained (e.g. "
                          "openai/clip-vit-large-patch14: config.json, model.safetensors, tokenizer and "
                          "preprocessor files)")
    d = Path(given).expanduser()
    if not d.is_dir() or not (d / "config.json").is_file():
        raise FormatError(f"--metric {metric}={given}: not a CLIP model directory (no config.json); save a "
                          "transformers CLIPModel and CLIPProcessor there with save_pretrained "
                          "(e.g. openai/clip-vit-large-patch14)")
    import transformers
    from transformers import CLIPModel, CLIPProcessor

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "falls back to the PIL image processor" (no torchvision) etc.
    try:
        model = CLIPModel.from_pretrained(str(d), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"--metric {metric}={given}: cannot load a CLIPModel and CLIPProcessor from it "
                          f"({str(e).splitlines()[0][:120]}); it needs config.json, the weights, the tokenizer and "
                          "preprocessor files (save_pretrained of both)") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, processor
