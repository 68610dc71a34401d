"""Feature extraction: a model's per-stage feature maps, for detection and segmentation backbones.

``create_model(name, features_only=True, out_indices=(1, 2, 3, 4))`` wraps any model that offers
``forward_stages(x) -> list[Tensor]`` and ``num_stages`` (ResNet, DenseNet, Highway) in a
`FeatureExtractor`. Stages are numbered from 1 like torchvision's ``layer1 … layer4`` (``-1`` is
the last). ``feature_info`` says, per returned stage, its channels and its reduction (the total
stride: input size / feature-map size), measured by one small forward pass, never typed in.
The classifier head is removed, so a backbone has no parameters that never receive gradients
(which DistributedDataParallel would reject).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureInfo:
    """One returned stage: its number, channels, reduction (stride) and the module producing it."""

    stage: int
    channels: int
    reduction: int
    module: str | None


class FeatureExtractor(nn.Module):
    """Returns ``[stage_i(x) for i in out_indices]`` of the wrapped model, shallowest first."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        if not hasattr(model, "forward_stages") or not hasattr(model, "num_stages"):
            raise TypeError(
                f"{type(model).__name__} has no forward_stages()/num_stages, so its stages are "
                "unknown; features_only works for the ResNet, DenseNet and Highway families"
            )
        n = model.num_stages
        indices = tuple(range(1, n + 1)) if out_indices is None else tuple(out_indices)
        if not indices:
            raise ValueError("out_indices is empty; name at least one stage")
        resolved = []
        for i in indices:
            if not isinstance(i, int) or not (1 <= i <= n or -n <= i <= -1):
                raise ValueError(
                    f"out_indices {indices}: stage {i!r} does not exist; this model has stages "
                    f"1..{n} (or -1..-{n} from the end)"
                )
            resolved.append(i if i > 0 else n + 1 + i)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"out_indices {indices} names a stage twice")
        self.out_indices = tuple(sorted(resolved))
        self.model = model
        self.in_chans = getattr(model, "in_chans", 3)
        self.min_input_size = getattr(model, "min_input_size", 32)
        self.feature_info = self._measure_and_drop_head()

    @property
    def channels(self) -> list[int]:
        return [f.channels for f in self.feature_info]

    @property
    def reductions(self) -> list[int]:
        return [f.reduction for f in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = self.model.forward_stages(x)
        return [stages[i - 1] for i in self.out_indices]

    def _measure_and_drop_head(self) -> list[FeatureInfo]:
        """One forward pass at twice the total stride: shapes, and which children it used."""
        model = self.model
        names = {m: n for n, m in model.named_modules() if n}
        # id(output) -> (outermost module that returned it, the output: held so ids stay unique)
        outputs: dict[int, tuple[str, torch.Tensor]] = {}
        used: set[str] = set()

        def hook(m, args, out):
            used.add(names[m])
            if isinstance(out, torch.Tensor):
                # Hooks fire innermost first; a later (outer) module returning the same tensor wins.
                outputs[id(out)] = (names[m], out)

        handles = [m.register_forward_hook(hook) for m in names]
        param = next(model.parameters(), None)
        size = 2 * self.min_input_size
        x = torch.zeros(1, self.in_chans, size, size,
                        device=param.device if param is not None else "cpu")
        was_training = model.training
        try:
            model.eval()  # batch statistics of one tiny image would fail in train mode
            with torch.no_grad():
                stages = model.forward_stages(x)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        # Direct children the stages never ran are the head (pooling, classifier, final norm).
        for child, _ in list(model.named_children()):
            if child not in used:
                setattr(model, child, nn.Identity())
        return [
            FeatureInfo(i, stages[i - 1].shape[1], size // stages[i - 1].shape[-1],
                        outputs.get(id(stages[i - 1]), (None,))[0])
            for i in self.out_indices
        ]
