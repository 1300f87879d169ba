"""Elementwise MIL ops: binary arithmetic and comparisons (numpy broadcasting), unary math, activations.

Semantics from ``coremltools/converters/mil/mil/ops/defs/iOS15/elementwise_binary.py``,
``elementwise_unary.py`` and ``activation.py`` (and their iOS17 revisions, same formulas).
"""

from __future__ import annotations

import math

import numpy as np

from mf_edge.coreml_reference.registry import as_float, kernel

_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "floor_div": np.floor_divide,
    "mod": np.mod,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}


def _binary(fn):
    def apply(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # inf/nan are reported by the fp16 checks, not warned about
            return fn(x, y)

    return apply


for _op_type, _fn in _BINARY.items():
    kernel(_op_type)(_binary(_fn))

_UNARY = {
    "abs": np.abs,
    "ceil": np.ceil,
    "floor": np.floor,
    "round": np.round,  # half to even
    "sign": np.sign,
    "sqrt": np.sqrt,
    "exp": np.exp,
    "exp2": np.exp2,
    "square": np.square,
    "tanh": np.tanh,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "asin": np.arcsin,
    "acos": np.arccos,
    "atan": np.arctan,
    "sinh": np.sinh,
    "cosh": np.cosh,
    "atanh": np.arctanh,
    "logical_not": np.logical_not,
    "relu": lambda x: np.maximum(x, 0).astype(x.dtype),
    "relu6": lambda x: np.clip(x, 0, 6).astype(x.dtype),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0, x),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
}


def _unary(fn):
    def apply(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)

    return apply


for _op_type, _fn in _UNARY.items():
    kernel(_op_type)(_unary(_fn))


@kernel("rsqrt")
def rsqrt(x: np.ndarray, epsilon: float = 1e-12) -> np.ndarray:
    """``1 / sqrt(x + epsilon)``."""
    with np.errstate(all="ignore"):
        return 1.0 / np.sqrt(x + np.float32(as_float(epsilon)))


@kernel("inverse")
def inverse(x: np.ndarray, epsilon: float = 1e-4) -> np.ndarray:
    """``1 / (x + epsilon)``."""
    with np.errstate(all="ignore"):
        return 1.0 / (x + np.float32(as_float(epsilon)))


@kernel("log")
def log(x: np.ndarray, epsilon: float = 1e-45) -> np.ndarray:
    """``log(x + epsilon)``."""
    with np.errstate(all="ignore"):
        return np.log(x + np.float32(as_float(epsilon)))


@kernel("clip")
def clip(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``min(max(x, alpha), beta)``."""
    return np.minimum(np.maximum(x, alpha), beta)


@kernel("leaky_relu")
def leaky_relu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, x * alpha)


@kernel("sigmoid_hard")
def sigmoid_hard(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``min(max(alpha * x + beta, 0), 1)``."""
    return np.clip(alpha * x + beta, 0.0, 1.0)


@kernel("gelu")
def gelu(x: np.ndarray, mode: str = "EXACT") -> np.ndarray:
    """GELU in the spec's three modes (``EXACT`` uses ``erf``)."""
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    return (0.5 * x * (1.0 + _erf(np.asarray(x, np.float64) / np.sqrt(2.0)))).astype(np.float32)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


@kernel("erf")
def erf(x: np.ndarray) -> np.ndarray:
    return _erf(np.asarray(x, np.float64)).astype(np.float32)


@kernel("threshold")
def threshold(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``max(x, alpha)``."""
    return np.maximum(x, alpha)


@kernel("thresholded_relu")
def thresholded_relu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``x`` where ``x >= alpha``, else 0."""
    return np.where(x >= alpha, x, 0).astype(x.dtype)


@kernel("elu")
def elu(x: np.ndarray, alpha: np.ndarray = 1.0) -> np.ndarray:
    """``x`` where positive, else ``alpha * (exp(x) - 1)``."""
    with np.errstate(all="ignore"):
        return np.where(x > 0, x, alpha * np.expm1(x))


def _per_channel(param: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A ``[C]`` parameter shaped to broadcast along axis 1 of ``x`` (a scalar stays as is)."""
    param = np.asarray(param, dtype=np.float32)
    return param if param.size == 1 else param.reshape([1, -1] + [1] * (x.ndim - 2))


@kernel("prelu")
def prelu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``x`` where non-negative, else ``alpha[c] * x`` (``alpha`` per channel, axis 1)."""
    return np.where(x >= 0, x, _per_channel(alpha, x) * x)


@kernel("clamped_relu")
def clamped_relu(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``min(max(x, 0), beta) + min(min(x, 0) * alpha, beta)``."""
    return np.minimum(np.maximum(x, 0), beta) + np.minimum(np.minimum(x, 0) * alpha, beta)


@kernel("scaled_tanh")
def scaled_tanh(x: np.ndarray, alpha: np.ndarray = 1.0, beta: np.ndarray = 1.0) -> np.ndarray:
    """``alpha * tanh(beta * x)``."""
    return alpha * np.tanh(beta * x)


@kernel("linear_activation")
def linear_activation(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray = 0.0) -> np.ndarray:
    """``alpha * x + beta``."""
    return alpha * x + beta


@kernel("softplus_parametric")
def softplus_parametric(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``alpha[c] * log(1 + exp(beta[c] * x))`` per channel (axis 1)."""
    return _per_channel(alpha, x) * np.logaddexp(0, _per_channel(beta, x) * x)
