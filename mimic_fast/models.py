"""Teachers and students of the mimic-learning papers (Ba & Caruana 2014; Urban et al. 2017), and
Teacher: any callable as a module that returns a logits tensor (the logit store and load_teacher
wrap functions, TorchScript and exported programs with it).

Design limits: the teachers are plain PyTorch (they run once, to label the transfer set); only the
students' wide layer is fused (mimic_fast.nn.WideShallowStudent). The teachers, ShallowNet and
ConvStudent accept (N, *input_shape) or flat (N, prod(input_shape)) inputs; the snn-mimic students
(WideShallowStudent, like nn.Linear) take (..., D) rows, so flatten images first. Parameter counts of `build_model` are computed, not quoted.
"""
import math
from collections.abc import Mapping

import torch
from torch import nn

from ._checks import check_int_at_least
from .activations import ACTIVATION_MODULES, check_activation
from .nn import WideShallowStudent

__all__ = ["DNN", "CNN", "TeacherEnsemble", "ShallowNet", "ConvStudent", "PAPER_CONFIGS",
           "build_model", "count_parameters", "Teacher", "as_teacher", "pick_output"]

def _activation_module(name):
    return ACTIVATION_MODULES[check_activation(name)]()


def _check_shape(input_shape):
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not 1 <= len(shape) <= 3 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (D,), (channels, length) or (channels, height, width) "
                         f"with positive sizes, got {shape}")
    return (1,) + shape if len(shape) == 1 else shape  # a flat vector is a 1-channel 1-D signal


def _check_dropout(dropout):
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _as_tuple(name, value, n=None):
    values = (value,) * (n or 1) if isinstance(value, int) else tuple(value)
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        check_int_at_least(name, v, 1)
    return values


def _reshape_input(x, input_shape):
    """(N, *input_shape) stays; flat (N, prod(input_shape)) is unflattened; anything else is refused."""
    if tuple(x.shape[1:]) == input_shape:
        return x
    if x.dim() == 2 and x.shape[1] == math.prod(input_shape):
        return x.reshape(x.shape[0], *input_shape)
    raise ValueError(f"x has shape {tuple(x.shape)}: expected (N, {', '.join(map(str, input_shape))}) "
                     f"or (N, {math.prod(input_shape)})")


def _mlp(in_features, hidden, num_classes, dropout, activation="relu"):
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _activation_module(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class DNN(nn.Module):
    """Fully connected ReLU net, the paper's DNN (2k-2k-2k, dropout after every hidden layer)."""

    def __init__(self, in_features, num_classes, hidden=(2000, 2000, 2000), dropout=0.2):
        super().__init__()
        check_int_at_least("in_features", in_features, 1)
        check_int_at_least("num_classes", num_classes, 1)
        self.in_features, self.num_classes = in_features, num_classes
        self.hidden, self.dropout = _as_tuple("hidden", hidden), _check_dropout(dropout)
        self.net = _mlp(in_features, self.hidden, num_classes, self.dropout)

    def forward(self, x):
        return self.net(x.flatten(1))

    def extra_repr(self):
        return f"in_features={self.in_features}, hidden={self.hidden}, num_classes={self.num_classes}"


class ShallowNet(nn.Module):
    """One wide hidden layer, no bottleneck (the paper's SNN-8k trained on labels): D → H → C."""

    def __init__(self, in_features, num_classes, hidden, activation="relu", dropout=0.0):
        super().__init__()
        check_int_at_least("in_features", in_features, 1)
        check_int_at_least("num_classes", num_classes, 1)
        check_int_at_least("hidden", hidden, 1)
        self.in_features, self.num_classes, self.hidden = in_features, num_classes, hidden
        self.activation, self.dropout = check_activation(activation), _check_dropout(dropout)
        self.net = _mlp(in_features, (hidden,), num_classes, self.dropout, self.activation)

    def forward(self, x):
        return self.net(x.flatten(1))

    def extra_repr(self):
        return (f"in_features={self.in_features}, hidden={self.hidden}, num_classes={self.num_classes}, "
                f"activation={self.activation!r}")


def _conv_stack(input_shape, channels, kernel_size, pool, convs_per_stage, batch_norm):
    """Stages of (conv → [BN] → ReLU) × convs_per_stage → max-pool, with 'same' padding (k // 2), so
    mostly pooling shrinks the signal. Returns the stack and its output shape (computed, not probed,
    so that building on device="meta" runs nothing)."""
    two_d = len(input_shape) == 3
    Conv, Pool = (nn.Conv2d, nn.MaxPool2d) if two_d else (nn.Conv1d, nn.MaxPool1d)
    Norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
    layers, c_in, spatial = [], input_shape[0], list(input_shape[1:])
    for c_out in channels:
        for _ in range(convs_per_stage):
            layers.append(Conv(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(Norm(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
            spatial = [s + 2 * (kernel_size // 2) - kernel_size + 1 for s in spatial]
        if pool > 1:
            layers.append(Pool(pool))
            spatial = [s // pool for s in spatial]
    out = (c_in, *spatial)
    if any(s < 1 for s in out):
        raise ValueError(f"input_shape {input_shape} is too small for {len(channels)} pooling stages "
                         f"of size {pool}: the output would be {out}")
    return nn.Sequential(*layers), out


class CNN(nn.Module):
    """Conv + pool front end, then fully connected layers (the paper's CNN teacher).

    Defaults depend on the input. Images (C, H, W): a CIFAR-style VGG net, stages of 2 × conv3x3-BN-
    ReLU with 64/128/256 channels and 2×2 pooling, then 512 → C. 1-D frames (channels, length) or
    (D,): one conv-pool stage (16 channels, kernel 9, pool 12) then 2k-2k-2k, sized so that the
    TIMIT input (1, 1845) gives ~13.3M parameters, the paper's "~13M".
    """

    def __init__(self, input_shape, num_classes, channels=None, kernel_size=None, pool=None,
                 hidden=None, dropout=0.2, convs_per_stage=None, batch_norm=None):
        super().__init__()
        self.input_shape = _check_shape(input_shape)
        check_int_at_least("num_classes", num_classes, 1)
        self.num_classes = num_classes
        image = len(self.input_shape) == 3
        channels = _as_tuple("channels", channels if channels is not None
                             else ((64, 128, 256) if image else (16,)))
        kernel_size = kernel_size if kernel_size is not None else (3 if image else 9)
        pool = pool if pool is not None else (2 if image else 12)
        hidden = _as_tuple("hidden", hidden if hidden is not None
                           else ((512,) if image else (2000, 2000, 2000)))
        convs_per_stage = convs_per_stage if convs_per_stage is not None else (2 if image else 1)
        batch_norm = image if batch_norm is None else bool(batch_norm)
        for name, v in (("kernel_size", kernel_size), ("pool", pool), ("convs_per_stage", convs_per_stage)):
            check_int_at_least(name, v, 1)
        self.features, out = _conv_stack(self.input_shape, channels, kernel_size, pool,
                                         convs_per_stage, batch_norm)
        self.classifier = _mlp(math.prod(out), hidden, num_classes, _check_dropout(dropout))

    def forward(self, x):
        return self.classifier(self.features(_reshape_input(x, self.input_shape)).flatten(1))

    def extra_repr(self):
        return f"input_shape={self.input_shape}, num_classes={self.num_classes}"


class TeacherEnsemble(nn.Module):
    """Averages its members' logits (the paper's ECNN: 9 CNNs, logits averaged)."""

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise TypeError("members must be a non-empty sequence of nn.Module")
        self.members = nn.ModuleList(members)

    def forward(self, x):
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)

    def extra_repr(self):
        return f"n_members={len(self.members)}"


class Teacher(nn.Module):
    """Wraps any callable (a module, TorchScript, an exported program's module, a function) as an
    nn.Module whose forward returns the logits tensor chosen by `output`."""

    def __init__(self, fn, output=None, name=None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"teacher must be callable (an nn.Module or a function), got "
                            f"{type(fn).__name__}")
        if isinstance(fn, nn.Module):
            self.net = fn  # registered: parameters, .to(device) and the store's fingerprint see it
        else:
            self.fn = fn
        self.output = None if output is None else str(output)
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)

    def _call(self, x):
        return self.net(x) if "net" in self._modules else self.fn(x)

    def forward(self, x):
        return pick_output(self._call(x), self.output, self.name)

    def train(self, mode=True):
        self.training = mode
        net = self._modules.get("net")
        if net is not None:
            try:
                net.train(mode)
            except NotImplementedError:
                # A torch.export module refuses train()/eval(): its graph was exported in one mode
                # and has no dropout/batch-norm switch left.
                pass
        return self

    def extra_repr(self):
        return f"name={self.name!r}, output={self.output!r}"


def pick_output(out, output, name="teacher"):
    """The logits tensor of a teacher's output `out`, following the selector `output`."""
    if output is not None:
        for part in output.split("."):
            if isinstance(out, Mapping) and part in out:
                out = out[part]
            elif isinstance(out, (tuple, list)) and part.lstrip("-").isdigit():
                index = int(part)
                if not -len(out) <= index < len(out):
                    raise ValueError(f"{name} returned a {type(out).__name__} of {len(out)} items: "
                                     f"index {index} does not exist (--teacher-output {output})")
                out = out[index]
            elif hasattr(out, part):
                out = getattr(out, part)
            else:
                raise ValueError(f"{name}'s output ({_describe(out)}) has no key, index or attribute "
                                 f"{part!r} (--teacher-output {output})")
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{name} returned {_describe(out)}, not a logits tensor: pick one with "
                         f"output= / --teacher-output (a dict key, tuple index or attribute name, "
                         f"e.g. logits or 0)")
    return out


def _describe(out):
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(type(o).__name__ for o in out)
        return f"a {type(out).__name__} of {len(out)} items ({kinds})"
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    attrs = [a for a in ("logits", "last_hidden_state") if hasattr(out, a)]
    return f"a {type(out).__name__}" + (f" with attributes {attrs}" if attrs else "")


def as_teacher(fn, output=None):
    """`fn` (any callable) as a Teacher module; an nn.Module without `output` is returned as is."""
    if isinstance(fn, nn.Module) and output is None:
        return fn
    if isinstance(fn, Teacher) and output is not None:
        inner = fn._modules["net"] if "net" in fn._modules else fn.fn
        return Teacher(inner, output, fn.name)
    return Teacher(fn, output)


class ConvStudent(nn.Module):
    """Urban et al.'s student: `conv_layers` × (conv → [BN] → ReLU → pool), flatten, then the fused
    WideShallowStudent head (linear bottleneck k, one hidden layer of width H, logits).

    Defaults follow Ba & Caruana's CIFAR student 128c-p-1200L-30k (channels 128, kernel 3 (images) or
    9 (1-D), pool 2, bottleneck 1200, hidden 30000); `activation` is the wide layer's.
    """

    def __init__(self, input_shape, num_classes, conv_layers=1, channels=128, bottleneck=1200,
                 hidden=30000, activation="relu", kernel_size=None, pool=2, batch_norm=False,
                 backend="auto"):
        super().__init__()
        self.input_shape = _check_shape(input_shape)
        check_int_at_least("num_classes", num_classes, 1)
        if not isinstance(conv_layers, int) or not 1 <= conv_layers <= 4:
            raise ValueError(f"conv_layers must be an int in 1..4, got {conv_layers!r}")
        channels = _as_tuple("channels", channels, conv_layers)
        if len(channels) != conv_layers:
            raise ValueError(f"channels has {len(channels)} entries but conv_layers={conv_layers}")
        kernel_size = kernel_size if kernel_size is not None else (3 if len(self.input_shape) == 3 else 9)
        check_int_at_least("kernel_size", kernel_size, 1)
        check_int_at_least("pool", pool, 1)
        self.conv_layers, self.num_classes = conv_layers, num_classes
        self.features, out = _conv_stack(self.input_shape, channels, kernel_size, pool, 1, batch_norm)
        self.head = WideShallowStudent(math.prod(out), num_classes, hidden, bottleneck, activation,
                                       backend=backend)

    def forward(self, x):
        return self.head(self.features(_reshape_input(x, self.input_shape)).flatten(1))

    def mimic_loss(self, x, teacher_logits, reduction="mean"):
        """Conv features, then the head's fused forward + logit-regression loss."""
        z = self.features(_reshape_input(x, self.input_shape)).flatten(1)
        return self.head.mimic_loss(z, teacher_logits, reduction)

    def extra_repr(self):
        return f"input_shape={self.input_shape}, conv_layers={self.conv_layers}"


TIMIT = {"in_features": 1845, "num_classes": 183}   # 15 frames x 123 filter-bank features; 61 x 3 states
CIFAR10 = {"input_shape": (3, 32, 32), "num_classes": 10}

PAPER_CONFIGS = {
    "snn-mimic-8k": "Ba & Caruana SNN-MIMIC-8k: WideShallowStudent 250L-8k (bottleneck 250, 8000 "
                    "hidden); TIMIT default D=1845, C=183 -> 3.93M params (paper quotes ~12M)",
    "snn-mimic-400k": "Ba & Caruana SNN-MIMIC-400k: WideShallowStudent 250L-400k; TIMIT -> 174.1M "
                      "params (173.7M without biases; paper ~180M)",
    "snn-8k": "Ba & Caruana SNN-8k: ShallowNet 8000 hidden, dropout 0.2, no bottleneck; TIMIT -> "
              "16.2M params (paper quotes ~12M)",
    "dnn-2k": "Ba & Caruana DNN 2k-2k-2k, dropout 0.2; TIMIT -> 12.1M params (paper ~12M)",
    "cnn": "CNN teacher: conv-pool + 2k-2k-2k for 1-D frames (TIMIT (1, 1845) -> 13.3M params, paper "
           "~13M); a VGG-style net for images",
    **{f"conv-student-{n}": f"Urban et al. student with {n} conv layer(s) (128 ch, pool 2) + "
                            f"1200L-30k fused head; CIFAR-10 default input (3, 32, 32), C=10"
       for n in range(1, 5)},
}


def build_model(name, in_features=None, num_classes=None, input_shape=None, **overrides):
    """Build a paper model by name (see PAPER_CONFIGS); keyword overrides go to its constructor.

    Unspecified sizes default to the paper's data set for that model (TIMIT for snn/dnn/cnn, CIFAR-10
    for conv students). `device=` / `dtype=` place the parameters; device="meta" allocates nothing,
    so even snn-mimic-400k can be inspected for free.
    """
    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(PAPER_CONFIGS)}")
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    defaults = CIFAR10 if name.startswith("conv-student") else TIMIT
    if input_shape is not None:
        input_shape = tuple(input_shape) if not isinstance(input_shape, int) else (input_shape,)
        if in_features is not None and in_features != math.prod(input_shape):
            raise ValueError(f"in_features={in_features} disagrees with input_shape={input_shape} "
                             f"(prod {math.prod(input_shape)})")
        in_features = math.prod(input_shape)
    elif in_features is not None:
        input_shape = (1, in_features)
    else:
        input_shape = defaults.get("input_shape", (1, defaults.get("in_features", 0)))
        in_features = math.prod(input_shape)
    num_classes = num_classes if num_classes is not None else defaults["num_classes"]

    def make():
        if name.startswith("snn-mimic-"):
            kw = {"hidden": 8000 if name == "snn-mimic-8k" else 400000, "bottleneck": 250, **overrides}
            return WideShallowStudent(in_features, num_classes, **kw)
        if name == "snn-8k":
            return ShallowNet(in_features, num_classes, **{"hidden": 8000, "dropout": 0.2, **overrides})
        if name == "dnn-2k":
            return DNN(in_features, num_classes, **overrides)
        if name == "cnn":
            return CNN(input_shape, num_classes, **overrides)
        return ConvStudent(input_shape, num_classes, conv_layers=int(name.rsplit("-", 1)[1]),
                           **overrides)

    if device is not None:
        with torch.device(device):
            model = make()
    else:
        model = make()
    return model.to(dtype) if dtype is not None else model


def count_parameters(model, trainable_only=False):
    """Number of parameter elements (works on meta-device models: nothing is read)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
