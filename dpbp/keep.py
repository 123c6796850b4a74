"""What a stage keeps for a batch between its forward and its backward: the weight policies.

A delayed backward goes through a graph built before some optimizer steps. PyTorch refuses when
those steps changed the saved weights in place, and silently mixing versions is not what the
papers analyse, so each delayed forward runs on an explicit set of weight tensors
(`torch.func.functional_call`). One small object per policy owns its forward, what its backward
goes through, and what a checkpoint saves of a batch in flight and how it is rebuilt:

- `Plain` (no delay: bp, the last module, ddp): the module's own weights; nothing stays in
  flight between two ticks.
- `Stash` (default for ddg/fdg/dp_fdg): a copy of the current weights, kept with the batch until
  its backward. The gradient is then exactly the gradient at the weights that batch's forward used
  (DDG's analysis, PipeDream's weight stashing). Costs one weight copy per in-flight batch.
- `Live`: an alias of the live weight storage that autograd does not version-track
  (`Tensor.data`), so the backward sees stored activations with the *current* weights: what the
  2018/2019 reference code computed under PyTorch 0.3/1.0. Opt-in, for comparison only.
- `Replay` (Features Replay): no graph; the input is stored and, at backward time, the forward is
  recomputed with the current weights on copies of the buffers, so BatchNorm's running
  statistics advance once per batch as in plain training.
- `Predicted` / `PredictedReplay` (`algo.weight_prediction=true`): as Stash / Replay, but the
  forward runs on the weights extrapolated to the update its gradient will be applied to
  (`extrapolate`, SpecTrain); Predicted stashes exactly those weights, so the gradient is exact
  for the weights the forward used.

Checkpoints: an autograd graph cannot be saved, but it is a pure function of the input and the
weights in train mode (BatchNorm normalises with the batch's own statistics), so it is rebuilt by
running that forward again on copies of the buffers: the same saved tensors bit for bit, and the
running statistics, already advanced by the first forward and restored from the checkpoint, are
not advanced twice. Under `Live` the graph refers to the live storage, which later updates
change: the rebuild runs the forward with the live storage temporarily holding the weights that
forward used (a copy kept only for batches in flight at a checkpoint, `Stage.keep_weights_from`),
then puts the current weights back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.func import functional_call

Weights = dict[str, torch.Tensor]


class Stage(Protocol):
    """What a policy uses of its stage (stage.Stage)."""

    index: int
    module: nn.Module
    params: Weights
    optimizer: torch.optim.Optimizer
    graph_bytes: int | None
    keep_weights_from: int | None

    def watch(self, weights: Weights) -> Weights: ...

    def lookahead(self, batch: int) -> int: ...

    def autocast_context(self) -> Any: ...


@dataclass
class Pending:
    """What a stage keeps for one batch between its forward and its backward."""

    x: torch.Tensor  # the module's input
    out: torch.Tensor | None = None  # output with its graph (None for replay)
    weights: Weights | None = None  # the weights the graph was built on
    nbytes: int = 0  # memory held for this batch beyond the module's own weights
    snapshot: Weights | None = None  # live: forward weights, for a checkpoint


class Plain:
    """The module's own weights (a stage without delay)."""

    fresh_weights = False  # whether each forward runs on weight tensors of its own

    def weights(self, stage: Stage) -> Weights:
        """The weight tensors a forward runs on."""
        return stage.params

    def forward(self, stage: Stage, batch: int, x: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        """Forward `batch`: what to keep for its backward, and the output."""
        x = x.detach().requires_grad_(stage.index > 0)  # stage 0 needs no input gradient
        weights = self.weights(stage)
        out = _measured_forward(stage, x, weights, copies=weights is not stage.params)
        return Pending(x=x, out=out, weights=weights, nbytes=stage.graph_bytes), out

    def graph(self, stage: Stage, p: Pending) -> tuple[torch.Tensor, Weights]:
        """The output (with its graph) and the weights the backward goes through."""
        return p.out, p.weights

    def save(self, stage: Stage, batch: int, p: Pending) -> dict[str, Any]:
        raise RuntimeError(f"module {stage.index + 1} has batch {batch} in flight between two "
                           "ticks, which its schedule never leaves")

    def rebuild(self, stage: Stage, x: torch.Tensor, entry: dict[str, Any]) -> Pending:
        raise RuntimeError(f"module {stage.index + 1} cannot hold batches in flight")


class Stash(Plain):
    """A copy of the weights per batch in flight: the gradient at the weights its forward used."""

    fresh_weights = True

    def weights(self, stage: Stage) -> Weights:
        return stage.watch({n: p.detach().clone().requires_grad_(True)
                            for n, p in stage.params.items()})

    def save(self, stage: Stage, batch: int, p: Pending) -> dict[str, Any]:
        return {"weights": {n: w.detach() for n, w in p.weights.items()}}

    def rebuild(self, stage: Stage, x: torch.Tensor, entry: dict[str, Any]) -> Pending:
        weights = stage.watch({n: w.to(x.device).requires_grad_(True)
                               for n, w in entry["weights"].items()})
        out = _forward_on_buffer_copies(stage, x, weights)
        return Pending(x=x, out=out, weights=weights, nbytes=stage.graph_bytes)


class Live(Plain):
    """Aliases of the live storage: stored activations with the current weights (2018 code)."""

    fresh_weights = True

    def weights(self, stage: Stage) -> Weights:
        return stage.watch({n: p.data.requires_grad_(True) for n, p in stage.params.items()})

    def forward(self, stage: Stage, batch: int, x: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        p, out = super().forward(stage, batch, x)
        if stage.keep_weights_from is not None and batch >= stage.keep_weights_from:
            p.snapshot = {n: w.detach().clone() for n, w in stage.params.items()}
        return p, out

    def save(self, stage: Stage, batch: int, p: Pending) -> dict[str, Any]:
        if p.snapshot is None:  # the run sets keep_weights_from before a checkpoint
            raise RuntimeError(f"module {stage.index + 1} cannot checkpoint batch {batch}: its "
                               "forward weights were not kept")
        return {"weights": p.snapshot}

    def rebuild(self, stage: Stage, x: torch.Tensor, entry: dict[str, Any]) -> Pending:
        used = {n: w.to(x.device) for n, w in entry["weights"].items()}
        # the graph must alias the live storage, so the forward runs with the storage holding
        # the old weights; the aliases' version counters are their own (Tensor.data)
        with torch.no_grad():
            current = {n: p.detach().clone() for n, p in stage.params.items()}
            for n, p in stage.params.items():
                p.copy_(used[n])
        weights = self.weights(stage)
        out = _forward_on_buffer_copies(stage, x, weights)
        with torch.no_grad():
            for n, p in stage.params.items():
                p.copy_(current[n])
        return Pending(x=x, out=out, weights=weights, nbytes=stage.graph_bytes, snapshot=used)


class Replay(Plain):
    """Features Replay: keep the input, recompute the forward at backward time."""

    def forward(self, stage: Stage, batch: int, x: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        with torch.no_grad(), stage.autocast_context():
            out = stage.module(x)
        return Pending(x=x, nbytes=x.untyped_storage().nbytes()), out

    def graph(self, stage: Stage, p: Pending) -> tuple[torch.Tensor, Weights]:
        """Recompute the forward of the stored input with the current weights."""
        p.x.requires_grad_(stage.index > 0)
        return _forward_on_buffer_copies(stage, p.x, stage.params), stage.params

    def save(self, stage: Stage, batch: int, p: Pending) -> dict[str, Any]:
        return {}  # the input is all a replay needs

    def rebuild(self, stage: Stage, x: torch.Tensor, entry: dict[str, Any]) -> Pending:
        return Pending(x=x, nbytes=x.untyped_storage().nbytes())


def extrapolate(stage: Stage, tau: int) -> Weights:
    """SpecTrain's weight prediction (Chen et al. 2018, arXiv 1809.02839, eq. "W_hat(t+s) =
    W(t) - s * lr * v(t-1)"): the weights `tau` updates ahead along the SGD momentum,
    w - lr * tau * v, new tensors. v is torch SGD's momentum buffer (weight decay is folded into
    it, so its pull is extrapolated too; with Nesterov the step also holds the next gradient,
    which is unknown, so the buffer alone is the direction). No buffer yet (before the first
    update) or tau = 0: a copy of the current weights."""
    lr = stage.optimizer.param_groups[0]["lr"]
    out = {}
    for n, p in stage.params.items():
        v = stage.optimizer.state.get(p, {}).get("momentum_buffer")
        w = p.detach()
        out[n] = w.clone() if v is None or tau == 0 else w - (lr * tau) * v
    return out


class Predicted(Stash):
    """Stash the extrapolated weights and run the forward on them."""

    def forward(self, stage: Stage, batch: int, x: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        x = x.detach().requires_grad_(stage.index > 0)
        weights = stage.watch({n: w.requires_grad_(True) for n, w in
                               extrapolate(stage, stage.lookahead(batch)).items()})
        out = _measured_forward(stage, x, weights, copies=True)
        return Pending(x=x, out=out, weights=weights, nbytes=stage.graph_bytes), out


class PredictedReplay(Replay):
    """Features Replay whose forward (the output sent up) runs on the extrapolated weights."""

    def forward(self, stage: Stage, batch: int, x: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        weights = extrapolate(stage, stage.lookahead(batch))
        with torch.no_grad(), stage.autocast_context():
            out = functional_call(stage.module, weights, (x,))  # buffers: the module's own
        return Pending(x=x, nbytes=x.untyped_storage().nbytes()), out


POLICIES = {"plain": Plain, "stash": Stash, "live": Live, "replay": Replay}
PREDICTED = {"stash": Predicted, "replay": PredictedReplay}


def policy(name: str, delay: int, predict: bool = False) -> Plain:
    """The policy a stage with this delay uses: `name` if it has batches in flight, else Plain;
    with `predict`, its weight-predicting variant."""
    if delay == 0:
        return Plain()
    return PREDICTED[name]() if predict else POLICIES[name]()


def _measured_forward(stage: Stage, x: torch.Tensor, weights: Weights,
                      copies: bool) -> torch.Tensor:
    """The forward with its graph; the first time, also what one batch holds (fixed shapes:
    it is the same every time), excluding the module's own weights."""
    measure = stage.graph_bytes is None
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure
             else contextlib.nullcontext())
    with hooks, stage.autocast_context():
        out = (stage.module(x) if weights is stage.params
               else functional_call(stage.module, weights, (x,)))
    if measure:
        for t in (x, out, *(weights.values() if copies else ())):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        own = {p.untyped_storage().data_ptr() for p in stage.params.values()}
        stage.graph_bytes = sum(n for ptr, n in saved.items() if ptr not in own)
    return out


def _forward_on_buffer_copies(stage: Stage, x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """A forward that leaves BatchNorm's running statistics alone (they count this batch
    already)."""
    buffers = {n: b.clone() for n, b in stage.module.named_buffers()}
    with stage.autocast_context():
        return functional_call(stage.module, {**weights, **buffers}, (x,))
