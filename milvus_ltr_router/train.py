"""Train a linear router with softmax cross-entropy (learning to rank, arXiv 2404.11731).

``scores = W q + b`` with one row of ``W`` per partition; the label of a query
is the partition of its exact top-1 neighbour (or, with multi-label targets,
the distribution of its top-k neighbours over partitions).

Two initialisations of the trainer, each trained, the better kept on the
validation criterion (the metric and nprobe that decide publishing, in the
retrain job):

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
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from .errors import InputError
from .evaluate import routing_quality
from .labels import METRICS, Neighbours

log = logging.getLogger(__name__)

# how the log names each initialisation of the trainer (both are trained runs, neither is
# centroid routing itself: "centroids" only starts there)
_START_NAMES = {"centroids": "centroid-initialised run", "random": "random-initialised run",
                "moments": "moment-initialised run"}


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
    init: str            # which initialisation of the trainer this run started from
    loss: float          # mean training loss of the epoch (NaN before the first)
    val_score: float     # the validation criterion after the epoch (see LinearRouterTrainer)


@dataclass
class _Run:
    init: str
    weight: np.ndarray
    bias: np.ndarray
    score: float
    best_epoch: int
    history: list = field(default_factory=list)
    spread_weight: np.ndarray | None = None


INITS = ("auto", "moments", "centroids", "random")
VAL_METRICS = ("top1", "recall")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and \
        not isinstance(value, (bool, np.bool_)) and np.isfinite(value)


def _check_vectors(X, name: str, dim: int | None = None) -> np.ndarray:
    try:
        X = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a numeric [n, dim] array: {exc}") from exc
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{name} must be a non-empty [n, dim] array, got shape {X.shape}")
    if dim is not None and X.shape[1] != dim:
        raise InputError(f"{name} has dimension {X.shape[1]}, expected {dim}")
    if not np.isfinite(X).all():
        raise InputError(f"{name} holds NaN or inf in {int((~np.isfinite(X)).any(axis=1).sum())} "
                         "rows")
    return X


def _check_labels(y, name: str, n_rows: int, n_partitions: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
        raise InputError(f"{name} must be [n] partition indices or [n, k] partitions of the "
                         f"top-k neighbours, got shape {y.shape}")
    if len(y) != n_rows:
        raise InputError(f"{name} has {len(y)} rows for {n_rows} query vectors")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{name} must hold integer partition indices, got dtype {y.dtype}")
    first = y if y.ndim == 1 else y[:, 0]
    if first.min() < 0 or first.max() >= n_partitions:
        raise InputError(f"{name}: the top-1 partition must be in [0, {n_partitions - 1}], got "
                         f"values in [{first.min()}, {first.max()}]")
    if y.ndim == 2 and (y.min() < -1 or y.max() >= n_partitions):
        raise InputError(f"{name}: partitions must be in [0, {n_partitions - 1}] (or -1 for no "
                         f"neighbour), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


class LinearRouterTrainer(BaseEstimator):
    """Learn a linear router ``scores = W q + b`` for a layout's clusters (scikit-learn style).

    Configuration goes to the constructor, data to :meth:`fit`; :meth:`get_params`
    and :meth:`set_params` behave as in scikit-learn (so does ``sklearn.base.clone``).

    Parameters
    ----------
    n_partitions : clusters ``L`` to score (default: the number of ``centroids``).
    centroids : ``[L, dim]`` centroids of the layout: the start of ``init="centroids"``.
    metric : the layout's metric (IP, COSINE or L2), for the centroid start.
    init : ``"centroids"`` (start at centroid routing), ``"random"`` (the paper's start) or
        ``"moments"`` (start at the moment router: needs ``moments``) or ``"auto"``: train from
        each start that applies (moments, centroids; random without either) and keep the
        best on the validation criterion.
    moments : the layout's :class:`~.moments.ClusterMoments`. With them the router scores
        ``W q + b + a * spread(q)``: a learned per-cluster weight ``a`` on each cluster's
        spread along the query (:meth:`.moments.ClusterMoments.spread`), the moment
        router's optimistic term; without them ``W q + b``.
    optimism : the moment router's ``c`` that ``init="moments"`` starts from.
    lr, batch_size, max_epochs, patience, weight_decay : Adam and early stopping.
    top1_weight : with ``[n, k]`` labels, the weight of the top-1 term in the loss.
    val_metric, val_nprobe, val_k : the validation criterion that early stopping and the
        choice of initialisation use: ``"top1"`` accuracy or ``"recall"``@``val_k`` of the
        top ``val_nprobe`` clusters. Set them to the metric and nprobe that decide
        publishing (:func:`.retrain.decide`), as the retrain job does.
    seed, num_threads, show_progress : reproducibility, torch threads, a progress bar.

    Attributes after :meth:`fit`
    ----------------------------
    coef_ ``[L, dim]``, intercept_ ``[L]`` and, with moments, spread_coef_ ``[L]`` (the
    learned scale folded in, so ``softmax(scores)`` is the model's probability), init_ (the initialisation kept),
    best_epoch_, best_score_ (its validation criterion), candidates_ (initialisation ->
    best validation criterion), history_ (:class:`EpochRecord` per epoch and run),
    val_criterion_ (e.g. ``"top1@nprobe=8"``), n_partitions_, n_features_in_.
    """

    def __init__(self, *, n_partitions: int | None = None, centroids=None, metric: str = "IP",
                 moments=None, optimism: float = 1.0, init: str = "auto", lr: float = 1e-3, batch_size: int = 512,
                 max_epochs: int = 100, patience: int = 10, weight_decay: float = 0.0,
                 top1_weight: float = 0.0, val_metric: str = "top1", val_nprobe: int = 1,
                 val_k: int = 10, seed: int = 0, num_threads: int | None = None,
                 show_progress=None):
        self.n_partitions = n_partitions
        self.centroids = centroids
        self.metric = metric
        self.moments = moments
        self.optimism = optimism
        self.init = init
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.weight_decay = weight_decay
        self.top1_weight = top1_weight
        self.val_metric = val_metric
        self.val_nprobe = val_nprobe
        self.val_k = val_k
        self.seed = seed
        self.num_threads = num_threads
        self.show_progress = show_progress

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> tuple[int, np.ndarray | None]:
        """Every constructor argument checked; returns ``(L, centroids or None)``."""
        def need_int(name: str, minimum: int):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")

        def need_positive(name: str, allow_zero: bool = False):
            value = getattr(self, name)
            if not _is_real(value) or value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise InputError(f"{name} must be a finite number {bound}, got {value!r}")

        if self.init not in INITS:
            raise InputError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.val_metric not in VAL_METRICS:
            raise InputError(f"val_metric must be top1 or recall, got {self.val_metric!r}")
        if not isinstance(self.metric, str) or self.metric.upper() not in METRICS:
            raise InputError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        need_positive("lr")
        need_positive("weight_decay", allow_zero=True)
        need_int("batch_size", 1)
        need_int("max_epochs", 0)
        need_int("patience", 1)
        need_int("val_nprobe", 1)
        need_int("val_k", 1)
        need_int("seed", 0)
        if not _is_real(self.top1_weight) or not 0.0 <= self.top1_weight <= 1.0:
            raise InputError(f"top1_weight must be in [0, 1], got {self.top1_weight!r}")
        centroids = None
        if self.centroids is not None:
            centroids = _check_vectors(self.centroids, "centroids")
        n_parts = self.n_partitions
        if n_parts is None:
            if centroids is None:
                raise InputError("n_partitions is needed when no centroids are given")
            n_parts = len(centroids)
        if not _is_int(n_parts) or n_parts < 1:
            raise InputError(f"n_partitions must be an integer >= 1, got {n_parts!r}")
        if centroids is not None and len(centroids) != n_parts:
            raise InputError(f"centroids has {len(centroids)} rows for n_partitions={n_parts}")
        if self.init == "centroids" and centroids is None:
            raise InputError("init='centroids' needs the layout's centroids (centroids=...)")
        if self.moments is not None and self.moments.n_clusters != n_parts:
            raise InputError(f"moments describe {self.moments.n_clusters} clusters for "
                             f"n_partitions={n_parts}")
        if self.init == "moments" and self.moments is None:
            raise InputError("init='moments' needs the layout's cluster moments (moments=...)")
        if not _is_real(self.optimism) or self.optimism < 0:
            raise InputError(f"optimism must be a finite number >= 0, got {self.optimism!r}")
        if self.val_nprobe > n_parts:
            raise InputError(f"val_nprobe {self.val_nprobe} is more than the {n_parts} partitions")
        return int(n_parts), centroids

    # ------------------------------------------------------------------ API
    def fit(self, X, y, *, eval_set=None) -> "LinearRouterTrainer":
        """Learn W, b from queries ``X`` ``[n, dim]`` and labels ``y``; returns ``self``.

        ``y`` is ``[n]`` partition indices (the paper) or ``[n, k]`` partitions of
        the top-k neighbours (multi-label; column 0 is the top-1, -1 where a query
        has fewer neighbours). ``eval_set=(X_val, y_val)`` are held-out queries and
        their neighbours' partitions, in the same forms; the validation criterion
        (``val_metric`` at ``val_nprobe``, see the class) on them stops training and
        picks the initialisation. Bad arguments raise :class:`~.errors.InputError`.
        """
        n_parts, centroids = self._check_params()
        X = _check_vectors(X, "X")
        dim = X.shape[1]
        if centroids is not None and centroids.shape[1] != dim:
            raise InputError(f"centroids have dimension {centroids.shape[1]} but X has {dim}")
        if self.moments is not None and self.moments.dim != dim:
            raise InputError(f"moments have dimension {self.moments.dim} but X has {dim}")
        y = _check_labels(y, "y", len(X), n_parts)
        if not isinstance(eval_set, (tuple, list)) or len(eval_set) != 2:
            raise InputError("eval_set=(X_val, y_val) is required: held-out queries and their "
                             "neighbours' partitions decide early stopping and the "
                             f"initialisation, got {type(eval_set).__name__}")
        X_val = _check_vectors(eval_set[0], "eval_set X_val", dim)
        y_val = _check_labels(eval_set[1], "eval_set y_val", len(X_val), n_parts)

        import torch
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        moments = self.moments
        if self.init == "auto":
            inits = (["moments"] if moments is not None else []) + \
                (["centroids"] if centroids is not None else [])
            inits = inits or ["random"]
            if moments is None and centroids is not None:
                inits.append("random")
        else:
            inits = [self.init] if self.init != "centroids" or centroids is not None else ["random"]
        val_parts = y_val[:, None] if y_val.ndim == 1 else y_val
        val_nb = Neighbours(np.zeros_like(val_parts), np.zeros(val_parts.shape, np.float32),
                            val_parts)
        self.val_criterion_ = f"{self.val_metric}@nprobe={self.val_nprobe}"
        spreads = None if moments is None else (moments.spread(X), moments.spread(X_val))
        runs = [self._fit_one(start, X, y, X_val, val_nb, n_parts, centroids, spreads)
                for start in inits]
        best = max(runs, key=lambda r: (r.score, r.init in ("moments", "centroids")))
        self.coef_, self.intercept_ = best.weight, best.bias
        self.spread_coef_ = best.spread_weight
        self.init_, self.best_epoch_, self.best_score_ = best.init, best.best_epoch, best.score
        self.history_ = [rec for r in runs for rec in r.history]
        self.candidates_ = {r.init: r.score for r in runs}
        self.n_partitions_, self.n_features_in_ = n_parts, dim
        log.info("router trained from %d initialisation(s) of the trainer; validation %s of "
                 "each trained run: %s; kept the %s", len(runs), self.val_criterion_,
                 ", ".join(f"{_START_NAMES[r.init]} {r.score:.4f} (best epoch {r.best_epoch})"
                           for r in runs), _START_NAMES[best.init])
        return self

    def decision_function(self, X) -> np.ndarray:
        """Scores ``[n, L]`` of queries ``X``: ``X @ coef_.T + intercept_``."""
        if not hasattr(self, "coef_"):
            raise NotFittedError("this LinearRouterTrainer is not fitted yet; call fit() first")
        X = _check_vectors(X, "X", self.n_features_in_)
        scores = X @ self.coef_.T + self.intercept_
        if self.spread_coef_ is not None:
            scores += self.spread_coef_ * self.moments.spread(X)
        return scores

    # ------------------------------------------------------------------ internals
    def _score(self, scores, val_nb: Neighbours) -> float:
        """The validation criterion, computed as :func:`.evaluate.routing_quality` does
        for the publish decision."""
        import torch
        top = torch.topk(scores, self.val_nprobe, dim=1).indices.numpy()
        quality = routing_quality(top, val_nb, self.val_k)
        return quality.top1_accuracy if self.val_metric == "top1" else quality.recall

    def _fit_one(self, start, X, y, X_val, val_nb, n_parts, centroids, spreads=None) -> _Run:
        import torch
        from .clustering import linear_centroid_scorer
        from .progress import progress

        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        dim = X.shape[1]
        xt, xv = torch.from_numpy(X), torch.from_numpy(X_val)
        if y.ndim == 2:
            target = torch.from_numpy(multilabel_targets(y, n_parts, self.top1_weight))
        else:
            target = torch.from_numpy(y.astype(np.int64))

        if start in ("centroids", "moments"):
            if start == "moments":
                w0, b0 = self.moments.means, np.zeros(n_parts, np.float32)
            else:
                w0, b0 = linear_centroid_scorer(centroids, self.metric)
            weight = torch.nn.Parameter(torch.from_numpy(np.array(w0, np.float32)))
            bias = torch.nn.Parameter(torch.from_numpy(np.array(b0, np.float32)))
        else:
            bound = 1.0 / np.sqrt(dim)
            weight = torch.nn.Parameter(torch.empty(n_parts, dim).uniform_(-bound, bound, generator=gen))
            bias = torch.nn.Parameter(torch.zeros(n_parts))
        log_scale = torch.nn.Parameter(torch.tensor(0.0))
        params = [weight, bias, log_scale]
        if spreads is not None:     # learned weight on each cluster's spread (moments start: c)
            from .moments import size_factor
            a0 = self.optimism * size_factor(self.moments.sizes) if start == "moments" \
                else np.zeros(n_parts, np.float32)
            params.append(torch.nn.Parameter(torch.from_numpy(np.asarray(a0, np.float32))))
            ft, fv = torch.from_numpy(spreads[0]), torch.from_numpy(spreads[1])
        else:
            ft = fv = None

        def raw(x, f):
            out = x @ weight.T + bias
            return out if f is None else out + params[3] * f

        if start in ("centroids", "moments"):
            with torch.no_grad():
                log_scale.fill_(self._fit_scale(raw(xt[:20000], None if ft is None
                                                    else ft[:20000]), target[:20000]))
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

        def logits(x, f):
            return torch.exp(log_scale) * raw(x, f)

        def val_score() -> float:
            with torch.no_grad():
                return self._score(logits(xv, fv), val_nb)

        best_score, best_epoch = val_score(), 0
        best_state = [p.detach().clone() for p in params]
        history = [EpochRecord(0, start, float("nan"), best_score)]
        stale = 0
        epochs = progress(range(1, self.max_epochs + 1), total=self.max_epochs,
                          desc=f"train ({start})", unit="epoch", enabled=self.show_progress)
        for epoch in epochs:
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(xt), self.batch_size):
                idx = perm[i:i + self.batch_size]
                loss = torch.nn.functional.cross_entropy(
                    logits(xt[idx], None if ft is None else ft[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            score = val_score()
            history.append(EpochRecord(epoch, start, total / len(xt), score))
            log.debug("%s epoch %d loss %.4f validation %s %.4f", start, epoch, total / len(xt),
                      self.val_criterion_, score)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{total / len(xt):.3f}", val=f"{score:.3f}")
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= self.patience:
                    break
        w, b, ls = best_state[:3]
        scale = float(torch.exp(ls))
        spread = None if len(best_state) < 4 else (best_state[3] * scale).numpy().astype(np.float32)
        return _Run(start, (w * scale).numpy().astype(np.float32),
                    (b * scale).numpy().astype(np.float32), best_score, best_epoch, history,
                    spread)

    @staticmethod
    def _fit_scale(raw, target) -> float:
        """log-scale minimising the training cross-entropy of the starting scores ``raw``
        (1-D grid)."""
        import torch
        with torch.no_grad():
            std = float(raw.std().clamp_min(1e-12))
            unit = raw / std
            grid = np.linspace(-3, 6, 46)
            losses = [float(torch.nn.functional.cross_entropy(np.exp(g) * unit, target))
                      for g in grid]
        return float(grid[int(np.argmin(losses))]) - float(np.log(std))

