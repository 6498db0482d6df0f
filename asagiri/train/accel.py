"""How a site's training runs on its hardware: mixed precision, memory layout, pinned copies,
``torch.compile`` and Opacus' ghost clipping.  None of it changes what is trained or sent, only
how fast and in how much memory.

:meth:`Accel.resolve` turns a site's ``accel`` settings (config.AccelConfig) into decisions for
its device: ``auto`` turns on what helps a CUDA GPU and leaves a CPU as it was.  DP-SGD always
trains in float32 (see :meth:`Accel.resolve`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Accel", "PLAIN"]

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Accel:
    """Resolved speed settings; the default (everything off) is plain float32 eager PyTorch."""

    amp: torch.dtype | None = None  # autocast's dtype for forward passes; None: float32
    channels_last: bool = False  # NHWC images and convolution weights (tensor cores prefer it)
    compile: bool = False  # torch.compile the forward pass (plain training only)
    ghost_clipping: bool = False  # Opacus grad_sample_mode="ghost" (DP only)
    _compiled: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, compare=False,
                                                 repr=False)

    @classmethod
    def resolve(cls, *, precision: str = "auto", channels_last: str = "auto", compile: bool = False,
                dp_clipping: str = "auto", device: torch.device, private: bool,
                averaged_copies: bool = False) -> Accel:
        """Decisions for ``device``.  Under DP-SGD (``private``) precision is float32 whatever was
        asked: Opacus clips each example's gradient to norm C from norms computed in the
        activations' dtype, and in bfloat16 a norm rounds by up to 1 part in 256, so a clipped
        gradient could exceed C and the noise would no longer cover it.  Channels-last is off too:
        Opacus 1.6 computes wrong per-example gradients for a convolution whose input is
        channels-last (``tests/train/test_accel.py`` shows it), so both its clipping and its sum
        would be wrong.  ``compile`` is for plain training only (Opacus' hooks do not trace).
        ``averaged_copies`` (augmentation multiplicity under DP) needs per-example gradients, so
        no ghost clipping."""
        cuda = device.type == "cuda"
        if precision == "auto":
            amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
        else:
            amp = _PRECISIONS[precision]
        if private and amp is not None:
            if precision != "auto":
                log.warning("accel.precision=%s is not used under DP-SGD: its clipping bound holds in float32 only",
                            precision)
            amp = None
        if private and compile:
            log.warning("accel.compile is not used under DP-SGD: Opacus' per-example hooks do not compile")
        nhwc = cuda if channels_last == "auto" else channels_last == "on"
        if private and nhwc:
            if channels_last == "on":
                log.warning("accel.channels_last is not used under DP-SGD: Opacus' per-example gradients of "
                            "a channels-last convolution are wrong")
            nhwc = False
        # Ghost clipping needs a third to a half less memory (docs/benchmarks.md), what limits a
        # GPU's batch; on a CPU it makes small models 17-27% slower: auto uses it on a GPU.
        ghost = private and (dp_clipping == "ghost" or (dp_clipping == "auto" and cuda))
        if ghost and averaged_copies:
            log.info("DP-SGD: augmentation multiplicity averages per-example gradients, which ghost clipping "
                     "never holds: clipping with Opacus' hooks instead")
            ghost = False
        return cls(amp=amp, channels_last=nhwc, compile=compile and not private, ghost_clipping=ghost)

    def describe(self) -> str:
        parts = [{None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}[self.amp]]
        parts += [name for name, on in (("channels-last", self.channels_last), ("torch.compile", self.compile),
                                        ("ghost clipping", self.ghost_clipping)) if on]
        return ", ".join(parts)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """float16 needs its loss scaled against underflow; bfloat16 and float32 do not."""
        return torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model in this layout, in place (its parameters and state_dict keep their names)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch onto ``device``: from pinned memory without waiting, when that device is a GPU."""
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_of(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """What to call for a forward pass: the model, or its compiled form (built once per model,
        so later rounds reuse the compiled graphs)."""
        if not self.compile:
            return model
        compiled = self._compiled.get(model)
        if compiled is None:
            compiled = self._compiled[model] = torch.compile(model)
        return compiled


PLAIN = Accel()
