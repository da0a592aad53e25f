"""Train a linear router with softmax cross-entropy (learning to rank, arXiv 2404.11731).

``scores = W q + b`` with one row of ``W`` per partition; the label of a query
is the partition of its exact top-1 neighbour (or, with multi-label targets,
the distribution of its top-k neighbours over partitions).

Two starts, picked by validation accuracy:

* ``"centroids"`` - W, b from the centroid scorer, so training starts *at*
  centroid routing. Raw centroid scores give a very flat softmax, so a scalar
  scale (temperature) is fitted first and learned throughout; without it Adam
  spends its first epochs rescaling W and early stopping fires at no gain.
* ``"random"`` - the paper's code: random W, many epochs.

Needs the ``[train]`` extra (torch). Serving never imports this module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


def split_indices(n: int, seed: int = 0, fractions=(0.64, 0.16, 0.20)):
    """Seeded train/validation/test index arrays (the paper's 64/16/20)."""
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def multilabel_targets(partitions: np.ndarray, n_partitions: int,
                       top1_weight: float = 0.0) -> np.ndarray:
    """Target distributions from ``[n, k]`` neighbour partitions (column 0 = the top-1's).

    ``(1 - top1_weight)`` times the share of the top-k neighbours in each
    partition, plus ``top1_weight`` on the top-1's partition: cross-entropy
    against it is a mix of the paper's loss and the listwise top-k loss.
    """
    from .calibration import target_distribution
    out = (1.0 - top1_weight) * target_distribution(partitions, n_partitions)
    if top1_weight:
        rows = np.flatnonzero(partitions[:, 0] >= 0)
        out[rows, partitions[rows, 0]] += top1_weight
    return out.astype(np.float32)


@dataclass
class EpochRecord:
    epoch: int
    init: str
    loss: float
    val_accuracy: float


@dataclass
class _Run:
    init: str
    weight: np.ndarray
    bias: np.ndarray
    val_accuracy: float
    best_epoch: int
    history: list = field(default_factory=list)


class LinearRouterTrainer:
    """scikit-learn-style estimator for the linear router.

    Parameters are hyper-parameters only; :meth:`fit` sets ``coef_`` ``[L, d]``,
    ``intercept_`` ``[L]`` (scale folded in, so ``softmax(scores)`` is the
    model's calibrated probability), ``init_``, ``best_epoch_``,
    ``val_accuracy_`` and ``history_``.
    """

    def __init__(self, lr: float = 1e-3, batch_size: int = 512, max_epochs: int = 100,
                 patience: int = 10, init: str = "auto", val_nprobe: int = 1, seed: int = 0,
                 weight_decay: float = 0.0, top1_weight: float = 0.0,
                 num_threads: int | None = None, show_progress=None):
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.init = init
        self.val_nprobe = val_nprobe
        self.seed = seed
        self.weight_decay = weight_decay
        self.top1_weight = top1_weight
        self.num_threads = num_threads
        self.show_progress = show_progress

    # ------------------------------------------------------------------ API
    def fit(self, X, y, X_val, y_val, n_partitions: int, centroids=None, metric: str = "IP"):
        """Learn W, b from queries ``X`` and labels ``y``.

        ``y`` is ``[n]`` partition indices (the paper) or ``[n, k]`` partitions of
        the top-k neighbours (multi-label; column 0 is the top-1). ``y_val`` is
        used for early stopping on top-``val_nprobe`` accuracy of its column 0.
        """
        import torch
        if self.init not in ("auto", "centroids", "random"):
            raise ValueError(f"init must be auto, centroids or random, got {self.init!r}")
        if not 0.0 <= self.top1_weight <= 1.0:
            raise ValueError(f"top1_weight must be in [0, 1], got {self.top1_weight}")
        if self.init in ("auto", "centroids") and centroids is None:
            if self.init == "centroids":
                raise ValueError("init='centroids' needs the layout's centroids")
        X = np.asarray(X, dtype=np.float32)
        X_val = np.asarray(X_val, dtype=np.float32)
        if len(X) == 0 or len(X_val) == 0:
            raise ValueError("training and validation sets must both be non-empty")
        y, y_val = np.asarray(y), np.asarray(y_val)
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        inits = {"auto": ["centroids", "random"], "centroids": ["centroids"],
                 "random": ["random"]}[self.init]
        if centroids is None:
            inits = ["random"]
        runs = [self._fit_one(start, X, y, X_val, y_val, n_partitions, centroids, metric)
                for start in inits]
        best = max(runs, key=lambda r: (r.val_accuracy, r.init == "centroids"))
        self.coef_, self.intercept_ = best.weight, best.bias
        self.init_, self.best_epoch_, self.val_accuracy_ = best.init, best.best_epoch, best.val_accuracy
        self.history_ = [rec for r in runs for rec in r.history]
        self.candidates_ = {r.init: r.val_accuracy for r in runs}
        log.info("router trained: init=%s best epoch %d, validation top-%d accuracy %.4f (%s)",
                 best.init, best.best_epoch, self.val_nprobe, best.val_accuracy,
                 ", ".join(f"{k}={v:.4f}" for k, v in self.candidates_.items()))
        return self

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    # ------------------------------------------------------------------ internals
    def _fit_one(self, start, X, y, X_val, y_val, n_parts, centroids, metric) -> _Run:
        import torch
        from .progress import progress
        from .clustering import linear_centroid_scorer

        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        dim = X.shape[1]
        xt, xv = torch.from_numpy(X), torch.from_numpy(X_val)
        soft = y.ndim == 2
        if soft:
            target = torch.from_numpy(multilabel_targets(y, n_parts, self.top1_weight))
        else:
            target = torch.from_numpy(y.astype(np.int64))
        val_label = torch.from_numpy((y_val[:, 0] if y_val.ndim == 2 else y_val).astype(np.int64))

        if start == "centroids":
            w0, b0 = linear_centroid_scorer(centroids, metric)
            weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
            bias = torch.nn.Parameter(torch.from_numpy(b0.copy()))
            log_scale = torch.nn.Parameter(torch.tensor(self._fit_scale(xt, target, weight, bias)))
        else:
            bound = 1.0 / np.sqrt(dim)
            weight = torch.nn.Parameter(torch.empty(n_parts, dim).uniform_(-bound, bound, generator=gen))
            bias = torch.nn.Parameter(torch.zeros(n_parts))
            log_scale = torch.nn.Parameter(torch.tensor(0.0))
        params = [weight, bias, log_scale]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

        def logits(x):
            return torch.exp(log_scale) * (x @ weight.T + bias)

        def val_accuracy() -> float:
            with torch.no_grad():
                top = torch.topk(logits(xv), min(self.val_nprobe, n_parts), dim=1).indices
                return float((top == val_label[:, None]).any(dim=1).float().mean())

        best_acc, best_epoch = val_accuracy(), 0
        best_state = [p.detach().clone() for p in params]
        history = [EpochRecord(0, start, float("nan"), best_acc)]
        stale = 0
        epochs = progress(range(1, self.max_epochs + 1), total=self.max_epochs,
                          desc=f"train ({start})", unit="epoch", enabled=self.show_progress)
        for epoch in epochs:
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(xt), self.batch_size):
                idx = perm[i:i + self.batch_size]
                loss = torch.nn.functional.cross_entropy(logits(xt[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            acc = val_accuracy()
            history.append(EpochRecord(epoch, start, total / len(xt), acc))
            log.debug("%s epoch %d loss %.4f val acc %.4f", start, epoch, total / len(xt), acc)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{total / len(xt):.3f}", val=f"{acc:.3f}")
            if acc > best_acc:
                best_acc, best_epoch, stale = acc, epoch, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= self.patience:
                    break
        w, b, ls = best_state
        scale = float(torch.exp(ls))
        return _Run(start, (w * scale).numpy().astype(np.float32),
                    (b * scale).numpy().astype(np.float32), best_acc, best_epoch, history)

    @staticmethod
    def _fit_scale(xt, target, weight, bias) -> float:
        """log-scale minimising training cross-entropy of the centroid scorer (1-D grid)."""
        import torch
        with torch.no_grad():
            raw = xt[:20000] @ weight.T + bias
            tgt = target[:20000]
            raw = raw / raw.std().clamp_min(1e-12)
            grid = np.linspace(-3, 6, 46)
            losses = [float(torch.nn.functional.cross_entropy(np.exp(g) * raw, tgt)) for g in grid]
            best = float(grid[int(np.argmin(losses))]) - float(np.log(float(
                (xt[:20000] @ weight.T + bias).std().clamp_min(1e-12))))
        return best

