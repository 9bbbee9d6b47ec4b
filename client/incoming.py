"""The weights a region computes with: the coordinator's, checked on arrival and kept within the region's bound.

The coordinator chooses the global weights. Before anything is recorded or trained, :func:`check_incoming`
refuses weights that are not the model's (a missing or extra name, a shape that is not exactly the
parameter's: numpy would broadcast a ``(1, n)`` array into an ``(n,)`` parameter), not real numbers, not
finite, or larger in magnitude than the region's policy allows (``max-weight-magnitude``). Values are checked
*after* the cast to the parameter's dtype, the one ``set_trainable_values`` makes: ``1e300`` is finite in
float64 and ``inf`` in float32. A refusal names the rule, the array and what is expected; it depends on the
weights alone, never on the region's data.

Why a bound, and why this default (100, 12x all-MiniLM-L6-v2's largest weight, 7.91): every encoder layer
input of fedpriv's models is a LayerNorm output, at most ``B(√d + 1)`` in magnitude when no weight exceeds
``B``; a layer's two matmuls multiply that by at most ``d_ff · d · B²``, and an attention score is at most
``√d_head · (d · B · H)²`` for inputs of size ``H``. For all-MiniLM (d = 384, d_ff = 1536, d_head = 32) at B = 100
the largest value a forward pass can form is an attention score of about 4e16, and the largest sum of squares
(LayerNorm's variance) about 6e28; with LoRA adapters (``α · B²`` added to a frozen weight) below 1e30. Nothing
in a forward pass can overflow float32 (3.4e38), for any post (``tests/adversary/test_weight_bound.py`` sets
every weight to ±100). Two things rest on that:
padding and attention masks keep posts apart only while the forward pass is finite (a padded position's
``inf`` times a zero attention weight is NaN), so a finite forward pass is what makes every per-example
quantity a function of its own post; and evaluation never sees a non-finite loss. A backward pass can still
overflow for one post (LayerNorm divides by a standard deviation as small as √eps): that post's contribution
is zeroed (``client/nonfinite.py``).

The bound binds during training too (:func:`keep_within`): the coordinator also picks the learning rate, and
one step with a huge one would leave weights the next forward pass overflows on. After every optimizer step
the trainable weights are clipped to ``±max-weight-magnitude`` (projected SGD; a NaN from an overflowing
optimizer becomes 0) -- post-processing of the DP step, the same for any data, and a no-op in honest training.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedpriv.privacy.policy import PolicyRefusal

BOUND_RULE = "max-weight-magnitude"
SHAPE_RULE = "model-parameters"  # names, shapes and dtypes: what the region's own model recipe expects


def check_incoming(values: Mapping[str, np.ndarray], model: nn.Module, max_magnitude: float) -> None:
    """Refuse (:class:`PolicyRefusal`) global weights that are not finite, in-bound values of exactly the
    model's trainable parameters. Nothing is modified."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(values)), sorted(set(values) - set(params))
    if missing:
        raise PolicyRefusal(SHAPE_RULE, f"the global weights have no array {missing[0]!r} ({len(missing)} missing): "
                            f"expected exactly the model's {len(params)} trainable parameters")
    if extra:
        raise PolicyRefusal(SHAPE_RULE, f"the global weights have an array {extra[0]!r} ({len(extra)} unexpected): "
                            f"expected exactly the model's {len(params)} trainable parameters")
    for name, param in params.items():
        _check_array(name, values[name], param, max_magnitude)


def _check_array(name: str, value, param: torch.Tensor, max_magnitude: float) -> None:
    array = np.asarray(value)
    if array.shape != tuple(param.shape):
        raise PolicyRefusal(SHAPE_RULE, f"array {name!r} has shape {array.shape}: expected exactly "
                            f"{tuple(param.shape)} (no broadcasting)")
    if array.dtype.kind not in "fiu":
        raise PolicyRefusal(SHAPE_RULE, f"array {name!r} has dtype {array.dtype}: expected real numbers "
                            f"(cast to {str(param.dtype).removeprefix('torch.')})")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = torch.as_tensor(array).to(param.dtype)  # the cast set_trainable_values makes: 1e300 -> inf
    if not bool(torch.isfinite(cast).all()):
        raise PolicyRefusal(BOUND_RULE, f"array {name!r} holds values that are not finite as "
                            f"{str(param.dtype).removeprefix('torch.')} (NaN, ±inf, or beyond its range): expected "
                            f"finite weights of magnitude <= {max_magnitude:g}")
    if cast.numel() and float(cast.abs().max()) > max_magnitude:
        raise PolicyRefusal(BOUND_RULE, f"array {name!r} holds weights of magnitude above {max_magnitude:g}: "
                            f"expected every weight within ±{max_magnitude:g} (the region's max-weight-magnitude)")


@torch.no_grad()
def keep_within(params: Iterable[torch.Tensor], max_magnitude: float) -> None:
    """Project ``params`` in place onto ``[-max_magnitude, max_magnitude]`` (NaN -> 0, ±inf -> the bound).

    ``max_magnitude = inf`` turns the projection off (tests use it to show what clipping contains alone)."""
    if math.isinf(max_magnitude):
        return
    for p in params:
        torch.nan_to_num_(p, nan=0.0, posinf=max_magnitude, neginf=-max_magnitude).clamp_(-max_magnitude,
                                                                                          max_magnitude)
