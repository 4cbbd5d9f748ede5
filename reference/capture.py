"""Capture intermediate tensors by module path, with forward hooks that exist only while capturing.

    with model.capture() as cap:            # every capture point
        model.process_batch(batch)
    cap.records                              # [(name, step, tensor), ...] in execution order

    with model.capture(["decoder.layers.*.cross_attention.attn_probs"], sink=writer.add) as cap:
        model.infer_batch(batch)             # inference sets cap.step before each decoding step

Without a ``Capture`` no hook is registered, so the model runs at full speed.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Optional, Sequence

import torch
from torch import nn

Sink = Callable[[str, torch.Tensor, Optional[int]], None]


class Capture:
    def __init__(self, model: nn.Module, names: Optional[Sequence[str]] = None, sink: Optional[Sink] = None,
                 clone: bool = True):
        """names: capture names or glob patterns (default: every capture point of the model).

        sink(name, tensor, step) receives each tensor as it is produced (e.g. ``DumpWriter.add``); without a
        sink tensors are kept in :attr:`records`.
        """
        self.model = model
        points = model.capture_points()
        if names is None:
            selected = points
        else:
            selected = [p for p in points if any(fnmatch.fnmatchcase(p, pat) for pat in names)]
            unknown = [pat for pat in names if not any(fnmatch.fnmatchcase(p, pat) for p in points)]
            if unknown:
                raise KeyError(f"unknown capture names {unknown}; known names look like {points[:4]} ...")
        self.names = selected
        self.sink = sink
        self.clone = clone
        self.step: Optional[int] = None
        self.paused = False  # set by code that runs the model in pieces and reports merged tensors itself
        self.records: list[tuple[str, Optional[int], torch.Tensor]] = []
        self._handles: list = []
        self._modules = dict(model.named_modules())

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if self.paused:
                return
            t = output.detach()
            if self.clone:
                t = t.clone()
            if self.sink is not None:
                self.sink(name, t, self.step)
            else:
                self.records.append((name, self.step, t))

        return hook

    def __enter__(self) -> "Capture":
        for name in self.names:
            module = self._modules.get(name)
            if module is None:
                raise KeyError(f"capture point '{name}' is not a module of this model")
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self.model._active_capture = self
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model._active_capture = None

    def get(self, name: str, step: Optional[int] = None) -> torch.Tensor:
        hits = [t for n, s, t in self.records if n == name and s == step]
        if not hits:
            raise KeyError(f"no captured tensor '{name}' at step {step}")
        if len(hits) > 1:
            raise KeyError(f"'{name}' was captured {len(hits)} times at step {step}")
        return hits[0]

    def as_dict(self) -> dict[tuple[str, Optional[int]], torch.Tensor]:
        return {(n, s): t for n, s, t in self.records}
