"""Residual MLP adapter (PyTorch, imported only when fitting): ``y = P x + W2 gelu(W1 x + b1) + b``.

The module is :class:`bc_fast.train.transforms.ResidualMLPTransform` (the same export as the
trained transforms: two layers, the activation on the leading ``hidden`` outputs of the first,
so the compiled core runs it as one fused program). ``P`` and ``b`` start at the ridge solution
of the training rows, ``W2`` at zero: training starts from the ridge map and can only improve
it on the validation rows (the best epoch is kept). ``W1`` starts at PyTorch's default
initialisation rescaled to the spread of the training inputs and ``b1`` centres them (plus a
uniform offset of the pre-activations' own spread, so the units bend at different places): the
pre-activations start at unit scale whatever the embedding norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._util.torch_device import resolve_device
from ._base import BaseAdapter, r2_uniform
from ._checks import check_alpha, check_finite, check_fraction, check_int
from ._estimators import RidgeAdapter
from ._gram import val_mask


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError("the mlp adapter needs PyTorch (pip install torch, or bc-fast[train]); the closed-form "
                          "kinds (ridge, procrustes, lowrank) do not") from e
    return torch


class MLPAdapter(BaseAdapter):
    """Residual MLP adapter trained with Adam and early stopping on the validation split.

    Parameters
    ----------
    hidden : int, default 256
        Width of the hidden layer.
    activation : {"gelu", "relu"}, default "gelu"
    alpha : float or None, default None
        Ridge penalty of the initial linear map (None: chosen on the validation split).
    epochs : int, default 200;  patience : int, default 10
        At most ``epochs`` passes; stop after ``patience`` epochs without a lower validation MSE.
    lr : float, default 1e-3;  batch_size : int, default 256;  weight_decay : float, default 0
        The loss is the MSE of targets standardised by one global scale (their RMS deviation per
        coordinate), so lr does not depend on the embeddings' norm.
    val_fraction : float, default 0.1;  random_state : int, default 0
        The same hashed validation split as the closed-form adapters; the seed also fixes the
        initialisation and the batch order (same seed, same weights).
    threads : int or None, default 1
        torch's intra-op threads while training (restored afterwards); None keeps torch's
        setting. The steps are small (384 -> 384 with hidden 256, batch 256: a few ms on one
        core), and on a shared 2-core machine torch's two threads collapsed to 250 ms per step
        against 6 ms on one thread (measured at load average 9).
    device : str, default "auto"
        Where to train: "cpu", "cuda" or "cuda:N"; "auto" is "cuda" when torch sees a GPU, else
        "cpu". The rows move to the device once; each epoch's batch order is drawn on the CPU
        generator (the same order on every device) and the only host sync per epoch is the
        validation loss. On the CPU the weights are the same as before this option existed;
        a GPU's float32 arithmetic differs in the last bits.

    Attributes
    ----------
    layers_, operator_, val_metrics_ (mse, r2 of the kept epoch on the validation rows),
    best_epoch_ (0 = the ridge start), n_epochs_, ridge_ (the initial RidgeAdapter), fit_time_s_.
    The validation rows choose the epoch, so val_metrics_ is slightly optimistic.
    """

    kind = "mlp"
    adapter = "mlp"

    def __init__(self, hidden: int = 256, *, activation: str = "gelu", alpha: float | None = None,
                 epochs: int = 200, patience: int = 10, lr: float = 1e-3, batch_size: int = 256,
                 weight_decay: float = 0.0, val_fraction: float = 0.1, random_state: int = 0,
                 threads: int | None = 1, device: str = "auto") -> None:
        self.hidden = hidden
        self.activation = activation
        self.alpha = alpha
        self.epochs = epochs
        self.patience = patience
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.threads = threads
        self.device = device

    def _device(self, torch: Any) -> Any:
        """The torch device to train on (``device``, with "auto" resolved), or a clear error."""
        return resolve_device(self.device)

    def _check_params(self) -> None:
        check_int(self.hidden, "hidden", 1)
        check_int(self.epochs, "epochs", 0)
        check_int(self.patience, "patience", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.random_state, "random_state")
        if self.threads is not None:
            check_int(self.threads, "threads", 1)
        check_alpha(self.alpha)
        if check_fraction(self.val_fraction, "val_fraction") == 0:
            raise ValueError("the mlp adapter stops early on validation rows: val_fraction must be > 0")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        self._check_params()
        check_finite(x, "X_src")
        check_finite(y, "X_dst")
        torch = _torch()
        device = self._device(torch)
        from ..train.transforms import ResidualMLPTransform

        mask = val_mask(0, x.shape[0], float(self.val_fraction), int(self.random_state))
        if not mask.any() or mask.all():
            raise ValueError(f"the mlp adapter needs training and validation rows; {x.shape[0]} pairs with "
                             f"val_fraction={self.val_fraction} give {int(mask.sum())} validation rows: pass more pairs")
        self.ridge_ = RidgeAdapter(self.alpha, val_fraction=self.val_fraction, random_state=self.random_state,
                                   refit=False).fit(x, y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state))
            net = ResidualMLPTransform(x.shape[1], y.shape[1], hidden=int(self.hidden), activation=self.activation)
            offsets = (torch.rand(int(self.hidden), dtype=torch.float64) * 2 - 1) / np.sqrt(3.0)
        xtr, ytr = x[~mask], y[~mask]
        mean, scale = xtr.mean(axis=0, dtype=np.float64), float(np.sqrt(xtr.var(axis=0, dtype=np.float64).sum()))
        # Train on targets standardised by one global scale (y - y_mean) / s, so that lr means the same
        # for any embedding norm (Adam's steps are absolute); s is folded back into P, W2, b after.
        y_mean = ytr.mean(axis=0, dtype=np.float64)
        y_s = max(float(np.sqrt(ytr.var(axis=0, dtype=np.float64).mean())), 1e-12)
        with torch.no_grad():
            net.p.weight.copy_(torch.from_numpy((self.ridge_.coef_ / y_s).astype(np.float32)))
            net.w2.bias.copy_(torch.from_numpy(((self.ridge_.intercept_ - y_mean) / y_s).astype(np.float32)))
            # Embeddings have small coordinates: scale W1 so the pre-activations start at O(1) spread
            # around zero (the default init assumes unit-variance features), where gelu bends.
            w1 = net.w1.weight.double() * (np.sqrt(x.shape[1]) / max(scale, 1e-12))
            net.w1.weight.copy_(w1.float())
            net.w1.bias.copy_((offsets - w1 @ torch.from_numpy(mean)).float())
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
        xt, yt = f32(xtr), f32((ytr - y_mean) / y_s)
        xv, yv = f32(x[mask]), f32((y[mask] - y_mean) / y_s)
        net.to(device)
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        try:
            self._train(torch, net, xt, yt, xv, yv)
        finally:
            torch.set_num_threads(before)
        with torch.no_grad():  # back to the targets' units
            net.p.weight.mul_(y_s)
            net.w2.weight.mul_(y_s)
            net.w2.bias.copy_((net.w2.bias.double() * y_s + torch.from_numpy(y_mean).to(device)).float())
        with torch.no_grad():
            pv = net(xv).cpu().numpy()
        self.val_metrics_ = {"mse": float(((pv.astype(np.float64) - y[mask]) ** 2).mean()),
                             "r2": r2_uniform(y[mask], pv)}
        self.n_train_, self.n_val_, self.n_pairs_ = int((~mask).sum()), int(mask.sum()), int((~mask).sum())
        self._set_program(net.export())

    def _train(self, torch: Any, net: Any, xt: Any, yt: Any, xv: Any, yv: Any) -> None:
        """Adam on the training rows; keep the weights of the epoch with the lowest validation MSE."""
        gen = torch.Generator().manual_seed(int(self.random_state))
        opt = torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))

        def val_loss() -> float:
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(net(xv), yv))

        best, best_state, wait = val_loss(), {k: v.clone() for k, v in net.state_dict().items()}, 0
        self.best_epoch_, self.n_epochs_ = 0, 0
        bs = int(self.batch_size)
        for epoch in range(1, int(self.epochs) + 1):
            perm = torch.randperm(xt.shape[0], generator=gen).to(xt.device)
            for s in range(0, xt.shape[0], bs):
                idx = perm[s:s + bs]
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(net(xt[idx]), yt[idx]).backward()
                opt.step()
            self.n_epochs_ = epoch
            v = val_loss()
            if v < best * (1 - 1e-4):
                best, wait, self.best_epoch_ = v, 0, epoch
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            else:
                wait += 1
                if wait >= int(self.patience):
                    break
        net.load_state_dict(best_state)
