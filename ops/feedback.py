"""Inner Loop Feedback (ILF, arXiv 2501.13107) at sampling time: the predictor that generate and bench run. The
feedback module and its schedule of partial steps are ditkit.nn.feedback; training is ops/distill/feedback.py.

The backbone's blocks map hidden states to hidden states. Let g be the hidden states entering block 0 (the
embedded latents: cheap, always computed fresh) and H the output of the feedback target, block j.
  full step     every block runs; g and H are kept;
  partial step  blocks 0..j do not run. Their output is predicted from the last step's:
                    h_in = H_prev + (g_now - g_prev)              the cached deviation (Delta-DiT), s = 0
                    H    = h_in + s * (F(h_in | t_now, c) - h_in)  the feedback module's correction
                F is a copy of block j with its settings (it takes this step's timestep and condition like
                every block), s a learnable scalar initialized at zero; blocks j+1.. then run as usual, so
                only the feedback block and the blocks after j are computed. A partial step's g and H are kept
                as the next step's "previous" (two partial steps in a row chain their predictions).
With j the last block (the default) a partial step runs one block instead of all of them. Step 0 is always full.
Two-stream blocks (sd3, flux) carry their text stream the same way (FeedbackRunner).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ditkit.formats.errors import ConfigError
from ditkit.nn.feedback import Feedback, FeedbackModule, FeedbackSchedule, backbone_blocks  # noqa: F401  (ops name them here)


class FeedbackRunner:
    """Wraps the backbone's blocks for the duration of `hooked()`; `partial` decides the next call's kind.

    `feedback` is the callable that applies the module (the module itself, or its DDP wrapper in training).
    Two-stream blocks (sd3's joint blocks, flux's double-stream blocks: `encoder_hidden_states` in, (encoder,
    hidden) out) carry the text stream the same way: `ge` is block 0's encoder input, `je` block j's encoder
    output (or its input, where block j outputs none: sd3's last block); `je` is None for one-stream families,
    whose `encoder_hidden_states` (pixart's prompt) is a condition, not a stream. Flux's single-stream blocks
    come after the blocks wrapped here and always run."""

    def __init__(self, family, transformer, block: int, feedback):
        self.blocks = backbone_blocks(family, transformer)
        self.j, self.feedback = block, feedback
        self.partial = False
        self.g = self.h = None  # last step's block-0 input and block-j output (image stream)
        self.ge = self.je = None  # the same for the text stream of two-stream blocks
        self._skipping = False

    @contextmanager
    def hooked(self):
        blocks = self.blocks[: self.j + 1]
        saved = [b.__dict__.get("forward") for b in blocks]  # a compiled forward (ops.compile)
        for i, b in enumerate(blocks):
            b.forward = self._wrap(i, b.forward)
        try:
            yield self
        finally:
            for b, prev in zip(blocks, saved):
                if prev is None:
                    del b.forward  # back to the class's forward
                else:
                    b.forward = prev

    def _partial(self, h, e, args, kwargs):
        """Block 0 at a partial step: the predicted output of block j (and the text stream, two-stream)."""
        h_in = self.h + (h - self.g)
        if self.je is None:
            out = self.feedback(h_in, *args, **kwargs)
            self.g, self.h = h, out
            return out
        e_in = self.je + (e - self.ge)
        e_out, out = self.feedback(h_in, *args, **{**kwargs, "encoder_hidden_states": e_in})
        e_next = e_in if e_out is None else e_out
        self.g, self.ge, self.h, self.je = h, e, out, e_next
        return e_next, out

    def _wrap(self, i: int, orig):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            args = args[1:]
            e = kwargs.get("encoder_hidden_states")
            if i == 0:
                self._skipping = (self.partial and self.h is not None and self.g is not None
                                  and self.g.shape == h.shape)
                if self._skipping:
                    return self._partial(h, e, args, kwargs)
                self.g, self.ge = h, e
            elif self._skipping:  # blocks 1..j: the prediction passes through
                return h if self.je is None else (e, h)
            out = orig(h, *args, **kwargs)
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor) \
                    and out[1].shape == h.shape and e is not None:
                if i == self.j:
                    self.h, self.je = out[1], (e if out[0] is None else out[0])
                return out
            if not isinstance(out, torch.Tensor) or out.shape != h.shape:
                raise ConfigError("feedback supports blocks that map hidden states to hidden states, or (text, "
                                  f"image) stream pairs; this block returns {type(out).__name__}")
            if i == self.j:
                self.h, self.je = out, None
            return out
        return forward


def feedback_predict(bundle, fb: Feedback, guidance: float):
    """A fresh stateful `predict(x, t, cond)` for ops.sample.denoise that follows the schedule step by step
    (make one per denoise call: it counts calls as step indices)."""
    fam, tr = bundle.family, bundle.transformer
    runner = FeedbackRunner(fam, tr, fb.schedule.block, fb.module)
    partial = fb.schedule.partial
    state = {"step": 0}

    def predict(x, t, cond):
        i = state["step"]
        state["step"] = i + 1
        runner.partial = i < len(partial) and partial[i]
        with runner.hooked():
            return fam.predict(tr, x, t, cond, guidance)
    return predict


def predictor_for(bundle, sampler: str, steps: int, guidance: float):
    """(a predictor factory or None, a note for reports): the bundle's feedback where it fits the run."""
    fb = getattr(bundle, "feedback", None)
    if fb is None:
        return None, None
    s = fb.schedule
    if (s.sampler, s.steps) != (sampler, steps):
        return None, {"applied": False, "reason": f"feedback schedule trained for {s.sampler} at {s.steps} steps; "
                                                  f"this run is {sampler} at {steps}"}
    return (lambda: feedback_predict(bundle, fb, guidance)), {
        "applied": True, "partial_steps": s.partial_steps(), "steps": s.steps, "block": s.block}


def refuse(bundle, what: str, why: str | None = None) -> None:
    """A clear error where an op cannot compose with the bundle's feedback module."""
    if getattr(bundle, "feedback", None) is None:
        return
    raise ConfigError(why or (f"{what} would change the backbone that this bundle's feedback module was trained on; "
                              f"run {what} first and distill --mode feedback on its output"))
