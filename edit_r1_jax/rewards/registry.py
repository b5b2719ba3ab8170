"""Named rewards combined by weights, failing loudly (never a silent 0 score).

A reward is ``fn(batch) -> array-like [B]`` where ``batch`` is a dict whose array/list values have a leading
batch dimension B (other values are passed unchanged when the batch is sliced).

``Registry.combine({name: weight}, on_error=...)`` returns ``fn(batch) -> (total [B] float64, info)``:

* ``info[name]`` -- each reward's raw scores ``[B]`` (NaN where the sample was masked);
* ``info["valid"]`` -- bool ``[B]``; ``info["num_masked"]`` -- int.
* ``total = sum_k weight_k * score_k``; **NaN for masked samples**, so they cannot enter advantages silently:
  pass ``info["valid"]`` to ``nft.advantages.compute_advantages(valid=...)`` / ``filter_groups(valid=...)``.

Errors: a reward returning NaN/inf for a sample, or raising, stops with :class:`RewardError` naming the reward
and the sample index. With ``on_error="mask"`` those samples are masked and counted instead.

:class:`RewardError` is the one error type of every reward in the package (``rewards.mllm`` raises it too). A
reward that raises it has already named the failing samples; it carries their batch positions in
``.indices`` when it knows them. So it is never retried sample by sample (each retry of a jitted reward would
compile and run it again at batch size 1) except where ``on_error="mask"`` needs the culprits and the error
does not name them. Any other exception from a batch call is retried one sample at a time to name the culprit
(logged), then raised as a RewardError (or, with "mask", those samples are masked).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

__all__ = ["RewardError", "Registry", "default_registry"]

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "mask")


class RewardError(RuntimeError):
    """A reward could not score some samples; the message names them. ``indices`` (positions in the batch) and
    ``scores`` (the whole batch's scores, those at ``indices`` meaningless), when the reward knows them, let
    ``on_error="mask"`` mask exactly those samples without re-running anything."""

    def __init__(self, message: str, indices: Sequence[int] | None = None, scores=None):
        super().__init__(message)
        self.indices = None if indices is None else [int(i) for i in indices]
        self.scores = None if scores is None else np.asarray(scores, np.float64)


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, (list, tuple)) or (hasattr(v, "shape") and len(getattr(v, "shape")) > 0):
            return len(v)
    raise ValueError("cannot infer the batch size: no array or list value in the reward batch")


def _slice(batch: dict, i: int, n: int) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = v[i:i + 1]
        elif hasattr(v, "shape") and len(v.shape) > 0 and v.shape[0] == n:
            out[k] = v[i:i + 1]
        else:
            out[k] = v
    return out


class Registry:
    def __init__(self):
        self._fns: dict[str, Callable] = {}

    def register(self, name: str, fn: Callable | None = None):
        """``register(name, fn)``, or ``@register(name)`` as a decorator. Re-registering a name is an error."""
        def add(f):
            if name in self._fns:
                raise ValueError(f"reward {name!r} is already registered")
            self._fns[name] = f
            return f
        return add(fn) if fn is not None else add

    def names(self) -> list[str]:
        return sorted(self._fns)

    def get(self, name: str) -> Callable:
        if name not in self._fns:
            raise KeyError(f"unknown reward {name!r}; registered: {self.names()}")
        return self._fns[name]

    def _scores(self, name, fn, batch, n, on_error):
        """``(scores [n] float64 with NaN where failed, failed bool [n], first error message or None)``."""
        try:
            out = np.asarray(fn(batch), np.float64)
        except RewardError as e:
            if on_error == "raise":
                raise
            if e.indices is not None and e.scores is not None and e.scores.shape == (n,):
                bad = [i for i in e.indices if not 0 <= i < n]
                if bad:
                    raise RewardError(f"reward {name!r} reported sample positions {bad} outside the batch of {n}: "
                                      f"{e}") from e
                failed = np.zeros(n, bool)
                failed[e.indices] = True  # the reward named its failing samples: mask them, no re-run
                log.warning("reward %r: masking samples %s (%s)", name, e.indices, e)
                return np.where(failed, np.nan, e.scores), failed, f"reward {name!r}: {e}"
            return self._one_by_one(name, fn, batch, n, on_error, e)
        except Exception as batch_err:  # noqa: BLE001 - localise the failing sample(s)
            return self._one_by_one(name, fn, batch, n, on_error, batch_err)
        if out.shape != (n,):
            raise RewardError(f"reward {name!r} returned shape {out.shape}, expected ({n},)")
        failed = ~np.isfinite(out)
        msg = None
        if failed.any():
            i = int(np.flatnonzero(failed)[0])
            msg = f"reward {name!r} returned {out[i]} for sample {i}"
        return out, failed, msg

    def _one_by_one(self, name, fn, batch, n, on_error, batch_err):
        """Retry each sample alone to find which fail (each call is a batch of 1; logged, as it is slow)."""
        log.warning("reward %r failed on a batch of %d (%s: %s); retrying the samples one by one to find the "
                    "failing ones", name, n, type(batch_err).__name__, batch_err)
        out = np.full(n, np.nan)
        failed = np.zeros(n, bool)
        msg = None
        for i in range(n):
            try:
                s = np.asarray(fn(_slice(batch, i, n)), np.float64).reshape(-1)
                if s.shape != (1,) or not np.isfinite(s[0]):
                    raise ValueError(f"returned {s.tolist()}")
                out[i] = s[0]
            except Exception as e:  # noqa: BLE001
                failed[i] = True
                if msg is None:
                    msg = f"reward {name!r} failed on sample {i}: {type(e).__name__}: {e}"
                if on_error == "raise":
                    raise RewardError(msg, indices=[i]) from e
        if not failed.any():
            raise RewardError(f"reward {name!r} failed on the batch of {n} but on no single sample: "
                              f"{type(batch_err).__name__}: {batch_err}") from batch_err
        return out, failed, msg

    def combine(self, config: dict, on_error: str = "raise") -> Callable:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not config:
            raise ValueError("reward config is empty: give at least one {name: weight}")
        fns = {name: (self.get(name), float(w)) for name, w in config.items()}

        def combined(batch: dict):
            n = _batch_size(batch)
            info, total = {}, np.zeros(n, np.float64)
            valid = np.ones(n, bool)
            for name, (fn, w) in fns.items():
                scores, failed, msg = self._scores(name, fn, batch, n, on_error)
                if failed.any() and on_error == "raise":
                    raise RewardError(msg)
                valid &= ~failed
                info[name] = scores
                total = total + w * np.where(failed, 0.0, np.nan_to_num(scores))
            total = np.where(valid, total, np.nan)
            info["valid"] = valid
            info["num_masked"] = int((~valid).sum())
            return total, info

        return combined


default_registry = Registry()


def _register_builtin():
    from edit_r1_jax.rewards import verifiers
    default_registry.register("toy_edit", verifiers.toy_verifier)


_register_builtin()
