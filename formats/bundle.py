"""The model bundle: a transformer plus whatever else its checkpoint holds.

Loading and saving it: ditkit.formats.layouts (load_bundle, save_bundle), one module per on-disk layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .families import Family
from .manifest import verified_sha256


@dataclass
class Bundle:
    family: Family
    transformer: nn.Module
    components: dict[str, Any] = field(default_factory=dict)  # vae, scheduler, text encoders, tokenizers
    pipeline_class: str | None = None  # diffusers pipeline that saves/loads it; None for a bare transformer
    pipeline_extra: dict = field(default_factory=dict)  # non-module pipeline args (DiT's id2label)
    manifest: dict = field(default_factory=dict)  # the ditkit.json it was loaded with
    path: Path | None = None
    kind: str = "pipeline"
    judge: Any = None
    feedback: Any = None  # ditkit.nn.feedback.Feedback (distill --mode feedback): module + schedule, in feedback/
    label: str | None = None  # a name for a bundle with no path (bench's in-process peers)
    _digest: dict | None = field(default=None, init=False, repr=False, compare=False)  # parent_record's verified sha256

    @property
    def vae(self):
        return self.components.get("vae")

    @property
    def scheduler(self):
        return self.components.get("scheduler")

    @property
    def name(self) -> str:
        return self.label or (self.path.name if self.path else "<memory>")

    def defaults(self) -> dict:
        """Sampling defaults: the bundle's own (manifest), else its family's."""
        f = self.family
        d = {"sampler": f.default_sampler, "steps": f.default_steps, "guidance": f.default_guidance}
        d.update(self.manifest.get("defaults", {}))
        return d

    def parent_record(self) -> dict:
        """What a child's manifest records about this bundle (location, weight digest, lineage)."""
        m = self.manifest
        if self._digest is None:  # hashed once, when a record is first copied (large checkpoints cost seconds)
            self._digest = verified_sha256(self.path, m.get("sha256"), onnx=self.kind == "onnx")
        return {"path": str(self.path) if self.path else None, **self._digest, "op": m.get("op", "import"),
                "lineage": m.get("lineage", [])}

    def transformer_bytes_on_disk(self) -> int:
        if self.path is None:
            return 0
        if self.path.is_file():
            return self.path.stat().st_size
        sub = self.path / "transformer" if (self.path / "transformer").is_dir() else self.path
        return sum(p.stat().st_size for p in sub.glob("*.safetensors"))

    def bytes_on_disk(self) -> int:
        if self.path is None:
            return 0
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
