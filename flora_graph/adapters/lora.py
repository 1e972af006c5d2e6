"""``LoRAAdapter``: a low-rank branch beside an ``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d`` or ``nn.Embedding``.

``y = base(x) + s * B(A(dropout(x)))`` with ``s = alpha / rank`` (``alpha <= 0`` means
``alpha = rank``). ``A`` is ``[r, in]`` (kaiming-uniform) and ``B`` is ``[out, r]`` (zeros),
PEFT's layout; for a convolution ``A`` is ``[r, in, kh, kw]`` with the base layer's
stride, padding and dilation, and ``B`` is a ``[out, r, 1, 1]`` pointwise convolution (``[r, in, k]`` and
``[out, r, 1]`` for an ``nn.Conv1d``; a grouped base's ``B`` is grouped as the base, ``[out, r / groups, 1, 1]``,
PEFT's layout, whose update mixes the groups and does not merge). For an
embedding (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``) ``A`` is ``[r, vocab]`` (zeros) and
``B`` is ``[dim, r]`` (normal), and the branch reads token ids: ``s * embedding(ids, A.T) @ B.T``,
the low-rank product of the ids' one-hot rows (no dropout, as PEFT's); an embedding that scales its own rows by a
scalar ``embed_scale`` (Gemma 3's) scales the branch by it too, as PEFT's layer does.
:meth:`LoRAAdapter.delta_weight` is the one source of truth that merging and the
compiler's merge pass agree with.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.errors import AdapterError

if TYPE_CHECKING:
    from flora_graph.ir import ComputationNode, Graph

__all__ = ["SUPPORTED_BASE_LAYERS", "LoRAAdapter", "is_conv1d", "is_supported_base"]

SUPPORTED_BASE_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)
"""Base layer classes LoRA wraps; transformers' ``Conv1D`` (GPT-2) too, recognised by :func:`is_conv1d`."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]`` (PEFT's fan_in_fan_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_supported_base(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``."""
    return isinstance(module, SUPPORTED_BASE_LAYERS) or is_conv1d(module)


def unsupported_base_message(module: nn.Module) -> str:
    """The error text for a layer LoRA cannot wrap."""
    names = ", ".join(c.__name__ for c in SUPPORTED_BASE_LAYERS)
    return f"unsupported base layer type {type(module).__name__} (LoRA supports {names} and transformers' Conv1D)"


def _conv_padding(layer: nn.Conv2d | nn.Conv1d, where: str) -> tuple[int, ...]:
    """Numeric symmetric padding of a conv layer (``'valid'``/``'same'`` resolved), one value per spatial axis."""
    pad = layer.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * len(layer.kernel_size)
        out = []
        for k, d in zip(layer.kernel_size, layer.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise AdapterError(f"{where}: padding='same' with an even effective kernel is asymmetric; unsupported")
            out.append(total // 2)
        return tuple(out)
    return tuple(int(v) for v in pad)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``t``; bfloat16 becomes ``ml_dtypes.bfloat16`` (numpy has none)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy().copy()


class LoRAAdapter(nn.Module):
    """Wraps ``base_layer`` (``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d`` or ``nn.Embedding``) with a rank-``rank`` LoRA
    branch. A convolution's ``A`` is a convolution of the base's kernel, stride, padding and dilation, its ``B`` a
    1x1 one, grouped as the base is (PEFT's layout: a grouped base's update is no matrix product, and is not merged).

    Args:
        base_layer: the layer to adapt; kept as ``self.base_layer``.
        rank: rank ``r`` of the update, ``r >= 1``; above ``min(fan_in, out)`` the update is still exact, only
            redundant (PEFT allows it too: an adapter on a one-output gate or score layer has ``r > 1``).
        alpha: scale numerator; ``alpha <= 0`` means ``alpha = rank``.
        freeze_base: stop gradients to the base layer's parameters.
        dropout: dropout probability on the LoRA branch's input, in ``[0, 1)``.
        module_name: the adapted module's path in its model, used in errors and graph tags.
        adapter_name: the adapter's name in graph tags (``meta["adapter"]``).

    Raises:
        AdapterError: unsupported base layer, rank out of range, bad dropout.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float = -1,
        freeze_base: bool = True,
        dropout: float = 0.0,
        *,
        module_name: str = "",
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        where = f"module {module_name or type(base_layer).__name__!r}"
        if not is_supported_base(base_layer):
            raise AdapterError(f"{where}: {unsupported_base_message(base_layer)}")
        if isinstance(base_layer, nn.Conv2d | nn.Conv1d):
            if isinstance(rank, int) and rank > 0 and rank % base_layer.groups:
                raise AdapterError(f"{where}: LoRA of rank {rank} on a convolution of groups={base_layer.groups}: the rank "
                                   "must be a multiple of the groups (PEFT's rule: B is a grouped 1x1 convolution)")
            if base_layer.padding_mode != "zeros":
                raise AdapterError(f"{where}: padding_mode={base_layer.padding_mode!r} is unsupported (zeros only)")
            self._padding = _conv_padding(base_layer, where)
            fan_in = base_layer.in_channels * math.prod(base_layer.kernel_size)
            out = base_layer.out_channels
        elif isinstance(base_layer, nn.Embedding):
            if base_layer.max_norm is not None or base_layer.sparse:
                what = f"max_norm={base_layer.max_norm}" if base_layer.max_norm is not None else "sparse=True"
                raise AdapterError(f"{where}: LoRA on an embedding with {what} is unsupported")
            fan_in, out = base_layer.num_embeddings, base_layer.embedding_dim
        elif is_conv1d(base_layer):
            fan_in, out = base_layer.weight.shape  # stored [in, out]
        else:
            fan_in, out = base_layer.in_features, base_layer.out_features
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise AdapterError(f"{where}: rank must be a positive int, got {rank!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
            raise AdapterError(f"{where}: dropout must be in [0, 1), got {dropout!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise AdapterError(f"{where}: alpha must be a finite number (<= 0 means alpha = rank), got {alpha!r}")
        self.base_layer = base_layer
        self.module_name = module_name
        self.adapter_name = adapter_name
        self._rank = rank
        self._alpha = float(alpha) if alpha > 0 else float(rank)
        self._freeze_base = bool(freeze_base)
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        # PEFT's embedding LoRA reads token ids: no dropout there
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 and not isinstance(base_layer, nn.Embedding) else nn.Identity()
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype}
        if isinstance(base_layer, nn.Conv2d | nn.Conv1d):
            ones = (1,) * len(base_layer.kernel_size)
            self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_channels, *base_layer.kernel_size, **kw))
            self.lora_B = nn.Parameter(torch.empty(out, rank // base_layer.groups, *ones, **kw))
        else:
            self.lora_A = nn.Parameter(torch.empty(rank, fan_in, **kw))
            self.lora_B = nn.Parameter(torch.empty(out, rank, **kw))
        self.reset_lora_parameters()
        if self._freeze_base:
            for p in base_layer.parameters():
                p.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        """An attribute the adapter lacks is its base layer's, as PEFT's tuners forward what a model reads of its layer
        (MobileNet's TF-style padding reads its convolution's ``stride``, ``kernel_size`` and ``dilation``)."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules: nn.Module's own lookup
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    # ------------------------------------------------------------------ properties
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as PEFT's LoRA layers expose it: a model that reads its layer's weight directly
        (a Mamba layer's ``dt_proj``, a dtype probe) reads the base weight, and the adapter takes no part there."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (``None`` without one, an embedding's), as :attr:`weight`."""
        return getattr(self.base_layer, "bias", None)

    @property
    def rank(self) -> int:
        """Rank ``r`` of the low-rank update."""
        return self._rank

    @property
    def alpha(self) -> float:
        """Scale numerator (``rank`` when constructed with ``alpha <= 0``)."""
        return self._alpha

    @property
    def scaling(self) -> float:
        """``alpha / rank``: the factor on the low-rank branch."""
        return self._alpha / self._rank

    @property
    def embed_scale(self) -> torch.Tensor | None:
        """The scalar an embedding base layer scales its rows by (its ``embed_scale``: Gemma 3's), which the branch
        takes too, as PEFT's layer does (PEFT's rule: a number, or a tensor of one element); ``None`` otherwise."""
        scale = getattr(self.base_layer, "embed_scale", None) if self.is_embedding else None
        if isinstance(scale, int | float) and not isinstance(scale, bool):
            w = self.base_layer.weight
            return torch.tensor(scale, dtype=w.dtype, device=w.device)
        return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None

    @property
    def branch_scale(self) -> float:
        """The factor on ``B``'s output in the branch: :attr:`scaling`, times :attr:`embed_scale` where there is one
        (what a slot's ``B`` folds in)."""
        scale = self.embed_scale
        return self.scaling if scale is None else self.scaling * float(scale)

    @property
    def is_base_frozen(self) -> bool:
        """Whether the base layer's parameters are excluded from training."""
        return self._freeze_base

    @property
    def is_conv(self) -> bool:
        """Whether the base layer is a convolution (``nn.Conv2d`` or ``nn.Conv1d``; transformers' ``Conv1D`` is a
        linear layer)."""
        return isinstance(self.base_layer, nn.Conv2d | nn.Conv1d)

    @property
    def is_embedding(self) -> bool:
        """Whether the base layer is an embedding (the branch reads token ids)."""
        return isinstance(self.base_layer, nn.Embedding)

    @property
    def parameter_count(self) -> int:
        """Trainable parameter count: LoRA only when the base is frozen, else base + LoRA."""
        n = self.lora_A.numel() + self.lora_B.numel()
        if not self._freeze_base:
            n += sum(p.numel() for p in self.base_layer.parameters())
        return n

    def _where(self) -> str:
        return f"module {self.module_name or type(self.base_layer).__name__!r}"

    # ------------------------------------------------------------------ state
    def reset_lora_parameters(self) -> None:
        """``A`` kaiming-uniform (as ``nn.Linear`` initialises weights), ``B`` zeros; an embedding's ``A`` zeros and
        ``B`` normal (PEFT's)."""
        if self.is_embedding:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reset_state(self) -> None:
        """Clear per-sequence state: LoRA keeps none, so this forwards to a base layer that does."""
        reset = getattr(self.base_layer, "reset_state", None)
        if callable(reset):
            reset()

    def _packed(self) -> list[torch.Tensor]:
        base = [] if self._freeze_base else list(self.base_layer.parameters())
        return [*base, self.lora_A, self.lora_B]

    def get_parameters(self) -> torch.Tensor:
        """Trainable parameters as one flat vector: base (if unfrozen), then ``A``, then ``B``."""
        return torch.cat([p.detach().reshape(-1) for p in self._packed()])

    def set_parameters(self, vec: torch.Tensor) -> None:
        """Load a vector packed as :meth:`get_parameters` does; a wrong length raises ``AdapterError``."""
        params = self._packed()
        want = sum(p.numel() for p in params)
        vec = torch.as_tensor(vec)
        if vec.dim() != 1 or vec.numel() != want:
            raise AdapterError(f"{self._where()}: set_parameters expects a vector of {want} values, got shape {tuple(vec.shape)}")
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(vec[off : off + p.numel()].view_as(p))
                off += p.numel()

    # ------------------------------------------------------------------ compute
    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled low-rank branch ``s * B(A(dropout(x)))`` alone."""
        h = self.lora_dropout(x)
        if self.is_conv:
            base = self.base_layer
            conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
            h = conv(h, self.lora_A, None, base.stride, self._padding, base.dilation)
            h = conv(h, self.lora_B, groups=base.groups)
        elif self.is_embedding:  # the ids' rows of A.T: one-hot(ids) @ A.T, traced as one Gather
            h = F.linear(F.embedding(x, self.lora_A.t()), self.lora_B) * self.scaling
            scale = self.embed_scale
            return h if scale is None else h * scale.to(h.dtype)  # PEFT's order: s first, then the rows' scale
        else:
            h = F.linear(F.linear(h, self.lora_A), self.lora_B)
        return h * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + s * B(A(dropout(x)))``."""
        return self.base_layer(x) + self.lora_forward(x)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` in the base weight's shape (transposed for a ``Conv1D`` base), in float32.

        Raises ``AdapterError`` for a grouped convolution's adapter: its update mixes the groups, which the base's
        grouped weight cannot hold (PEFT does not merge it either)."""
        if self.is_conv and self.base_layer.groups != 1:
            raise AdapterError(f"{self._where()}: the adapter of a grouped convolution (groups="
                               f"{self.base_layer.groups}) is no change of its weight and does not merge")
        a = self.lora_A.detach().float().reshape(self._rank, -1)
        b = self.lora_B.detach().float().reshape(-1, self._rank)
        delta = (b @ a).mul_(self.scaling)
        if is_conv1d(self.base_layer) or self.is_embedding:  # stored [in, out] / [vocab, dim]
            return delta.t().contiguous()
        return delta.reshape(self.base_layer.weight.shape)

    def merge_to_original_layer(self) -> nn.Module:
        """A new plain layer with weight ``W + delta`` (accumulated in fp32, cast back).

        The adapter is left untouched. Raises ``AdapterError`` when the result is not finite.
        """
        merged = copy.deepcopy(self.base_layer)
        w = self.base_layer.weight.detach()
        new = w.float() + self.delta_weight()
        if not torch.isfinite(new).all():
            raise AdapterError(f"{self._where()}: merged weight has non-finite values")
        cast = new.to(w.dtype)
        if not torch.isfinite(cast).all():
            raise AdapterError(f"{self._where()}: merged weight overflows {w.dtype}")
        with torch.no_grad():
            merged.weight.copy_(cast)
        for name, p in merged.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, True))
        return merged

    # ------------------------------------------------------------------ graph export
    def export_graph(self, graph: Graph, x: ComputationNode) -> ComputationNode:
        """Add ``base(x) + s * B(A(x))`` to ``graph`` and return the sum's node.

        Both branches read the same node ``x``. Nodes are tagged with ``meta["adapter"]``,
        ``meta["role"]`` (``base``, ``lora_down``, ``lora_up``, ``lora_scale``, ``lora_add``)
        and ``meta["module"]``; weights are named after the module's parameters. Dropout is
        an inference-time identity and is not exported.
        """
        from flora_graph.ir import Op

        p = f"{self.module_name}." if self.module_name else ""

        def tag(role: str) -> dict[str, str]:
            return {"adapter": self.adapter_name, "role": role, "module": self.module_name}

        def const(name: str, t: torch.Tensor):
            # a weight name another adapter already put in this graph gets a suffix, never overwritten
            key, i = p + name, 0
            while key in graph.params:
                i += 1
                key = f"{p}{name}_{i}"
            return graph.const(key, _to_numpy(t))

        base = self.base_layer
        if isinstance(base, nn.Conv1d):
            raise AdapterError(f"{self._where()}: export_graph writes 2-D convolutions, not nn.Conv1d; capture the "
                               "model instead (flora_graph.frontend.capture)")
        w = const("base_layer.weight", base.weight)
        bias = getattr(base, "bias", None)  # an embedding has none
        args = [x, w] + ([const("base_layer.bias", bias)] if bias is not None else [])
        # weights are added right before their first reader, the order capture produces
        if self.is_conv:
            conv = {"stride": tuple(base.stride), "padding": self._padding, "dilation": tuple(base.dilation)}
            y = graph.add(Op.CONV2D, args, {**conv, "groups": base.groups}, name=p + "base", meta=tag("base"))
            h = graph.add(Op.CONV2D, [x, const("lora_A", self.lora_A)], conv, name=p + "lora_down", meta=tag("lora_down"))
            h = graph.add(Op.CONV2D, [h, const("lora_B", self.lora_B)], {"groups": base.groups}, name=p + "lora_up",
                          meta=tag("lora_up"))
        elif self.is_embedding:  # rows of the weight and of A.T by the ids
            if type(base) is not nn.Embedding and self.embed_scale is None:
                raise AdapterError(f"{self._where()}: export_graph knows nn.Embedding's forward, not "
                                   f"{type(base).__name__}'s; capture the model instead (flora_graph.frontend.capture)")
            y = graph.add(Op.GATHER, [w, x], {"axis": 0}, name=p + "base", meta=tag("base"))
            if self.embed_scale is not None:  # the layer's own forward scales its rows (Gemma 3's)
                y = graph.add(Op.MUL, [y, const("base_layer.embed_scale", self.embed_scale.detach())],
                              name=p + "base_layer.scaled")
            a_t = graph.add(Op.TRANSPOSE, [const("lora_A", self.lora_A)], {"perm": (1, 0)}, name=p + "lora_A_t")
            h = graph.add(Op.GATHER, [a_t, x], {"axis": 0}, name=p + "lora_down", meta=tag("lora_down"))
            h = graph.add(Op.LINEAR, [h, const("lora_B", self.lora_B)], name=p + "lora_up", meta=tag("lora_up"))
        else:
            if is_conv1d(base):  # weight stored [in, out]: the Linear reads its transpose
                args[1] = graph.add(Op.TRANSPOSE, [w], {"perm": (1, 0)}, name=p + "base_layer.weight_t")
            y = graph.add(Op.LINEAR, args, name=p + "base", meta=tag("base"))
            h = graph.add(Op.LINEAR, [x, const("lora_A", self.lora_A)], name=p + "lora_down", meta=tag("lora_down"))
            h = graph.add(Op.LINEAR, [h, const("lora_B", self.lora_B)], name=p + "lora_up", meta=tag("lora_up"))
        s = const("scaling", torch.tensor(self.scaling, dtype=self.lora_B.dtype))
        h = graph.add(Op.MUL, [h, s], name=p + "lora_scale", meta=tag("lora_scale"))
        if self.embed_scale is not None:  # the branch scaled as the rows are (PEFT's)
            es = const("embed_scale", self.embed_scale.detach().to(self.lora_B.dtype))
            h = graph.add(Op.MUL, [h, es], name=p + "lora_scale_rows", meta=tag("lora_scale"))
        return graph.add(Op.ADD, [y, h], name=p + "lora_add", meta=tag("lora_add"))

    def extra_repr(self) -> str:
        return f"rank={self._rank}, alpha={self._alpha:g}, scaling={self.scaling:g}, frozen_base={self._freeze_base}"
