"""PNG plots of predictions against targets: middle slices with residuals, power spectra.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so
no global figure state is created or left behind. Without matplotlib, each function warns
(``RuntimeWarning``) and returns ``None`` instead of a path. This module imports neither pytest
nor, until called, torch or matplotlib.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from typing import Any, Optional

from .errors import UsageError


def default_plot_path(check: str) -> str:
    """Where a check saves its figure when the user names no path: a per-user folder of the
    temporary directory, one file per check and test (named from ``PYTEST_CURRENT_TEST``;
    outside pytest, per process), so a rerun overwrites it instead of piling up files, and the
    HTML report finds it at the end of the run.

    >>> p = default_plot_path("discriminator_scales")
    >>> os.path.basename(p).startswith("discriminator_scales-"), p.endswith(".png")
    (True, True)
    """
    import getpass

    try:
        user = re.sub(r"[^A-Za-z0-9_.-]", "_", getpass.getuser())
    except Exception:  # noqa: BLE001 - no user name (containers): the uid or a constant
        user = str(getattr(os, "getuid", lambda: "user")())
    folder = os.path.join(tempfile.gettempdir(), f"pytest-modelcheck-of-{user}", "plots")
    test = os.environ.get("PYTEST_CURRENT_TEST", "")
    test = re.sub(r" \((setup|call|teardown)\)$", "", test)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", test).strip("_")[-150:] or f"pid{os.getpid()}"
    return os.path.join(folder, f"{check}-{stem}.png")


def ensure_folder(path: str) -> None:
    """Create the folder of ``path`` (private to the user) if it is missing."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)


def plot_path(plot: Any, check: str) -> Optional[str]:
    """Where a check's ``plot=`` argument says to save its PNG: None for None/False, the
    default per-test file (``default_plot_path``, its folder created) for True or 'auto', else
    the path given.

    >>> plot_path(None, "mode_sweep"), plot_path("out/s.png", "mode_sweep")
    (None, 'out/s.png')
    >>> plot_path(True, "mode_sweep").endswith(".png")
    True
    """
    if plot is None or plot is False:
        return None
    if plot is True or plot == "auto":
        path = default_plot_path(check)
        ensure_folder(path)
        return path
    return os.fspath(plot)


def _figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas, or None (after a warning) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (imported first: a missing package is one ImportError)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        warnings.warn(f"matplotlib is not available ({exc}); no plot was saved", RuntimeWarning,
                      stacklevel=3)
        return None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _as_numpy(t: Any) -> Any:
    import numpy as np

    if hasattr(t, "detach"):
        t = t.detach().to("cpu").double().numpy()
    return np.asarray(t, dtype=float)


def _slice(a: Any, ndim: int, axis: int, index: Optional[int]) -> tuple:
    """The 2D image to draw from ``a``: first sample/channel, a slice through a volume."""
    while a.ndim > ndim:
        a = a[0]
    if ndim == 2:
        return a, None
    ax = axis % 3
    idx = a.shape[ax] // 2 if index is None else index
    if not -a.shape[ax] <= idx < a.shape[ax]:
        raise UsageError(f"index={index!r}: outside 0..{a.shape[ax] - 1} along axis {axis}")
    return a.take(idx, axis=ax), idx


def save_slices(pred: Any, target: Any, path: Any, *, axis: int = -1, index: Optional[int] = None,
                log: bool = False, ndim: Optional[int] = None) -> Optional[str]:
    """Save prediction, target and residual (pred - target) images side by side as a PNG.

    ``pred`` and ``target`` are tensors or arrays of the same shape: ``(B, C, H, W)`` or
    ``(H, W)`` (2D), ``(B, C, D, H, W)`` or ``(D, H, W)`` (3D; the slice at ``index``, default
    the middle, along ``axis`` is drawn); ``ndim`` overrides the spatial dimension count. The
    first sample and channel are shown. ``log=True`` draws ``log10(|x| + 1e-12)`` for the
    prediction and the target. Returns the path written, or None without matplotlib.

    >>> import os, tempfile, torch
    >>> vol = torch.rand(1, 1, 4, 4, 4)
    >>> path = save_slices(vol, vol, os.path.join(tempfile.mkdtemp(), "s.png"))
    >>> with open(path, "rb") as f:
    ...     f.read(4) == b"\\x89PNG"
    True
    """
    import numpy as np

    p, t = _as_numpy(pred), _as_numpy(target)
    if p.shape != t.shape:
        raise UsageError(f"pred {p.shape} and target {t.shape}: expected the same shape")
    if ndim is None:
        ndim = p.ndim - 2 if p.ndim >= 4 else p.ndim
    if ndim not in (2, 3) or ndim > p.ndim:
        raise UsageError(f"ndim={ndim!r}: expected 2 or 3 spatial dims in an array of shape {p.shape}")
    p2, idx = _slice(p, ndim, axis, index)
    t2, _ = _slice(t, ndim, axis, index)
    fig = _figure(12, 4)
    if fig is None:
        return None
    shown = (np.log10(np.abs(p2) + 1e-12), np.log10(np.abs(t2) + 1e-12)) if log else (p2, t2)
    lo = float(min(shown[0].min(), shown[1].min()))
    hi = float(max(shown[0].max(), shown[1].max()))
    resid = p2 - t2
    bound = float(np.abs(resid).max()) or 1.0
    where = f" (axis {axis}, index {idx})" if idx is not None else ""
    panels = [(shown[0], "prediction" + (" log10|x|" if log else ""), "viridis", lo, hi),
              (shown[1], "target" + (" log10|x|" if log else ""), "viridis", lo, hi),
              (resid, "residual pred - target", "RdBu_r", -bound, bound)]
    for i, (img, title, cmap, vmin, vmax) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
        ax.set_title(title + (where if i < 2 else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return str(path)


def save_power_spectrum(k: Any, spectra: dict, path: Any, *, title: str = "",
                        bands: Any = None) -> Optional[str]:
    """Save a log-log plot of power spectra ``{label: P(k)}`` over wavenumbers ``k`` as a PNG.

    ``bands`` (``[(name, k_lo, k_hi, ...), ...]`` as from ``band_ratios``) are shaded and
    labelled. Returns the path written, or None without matplotlib.

    >>> import os, tempfile, torch
    >>> k = torch.arange(1.0, 9.0)
    >>> path = save_power_spectrum(k, {"target": k ** -2, "prediction": k ** -3},
    ...                            os.path.join(tempfile.mkdtemp(), "pk.png"))
    >>> with open(path, "rb") as f:
    ...     f.read(4) == b"\\x89PNG"
    True
    """
    if not isinstance(spectra, dict) or not spectra:
        raise UsageError(f"spectra={spectra!r}: expected a dict of label -> P(k)")
    ks = _as_numpy(k)
    fig = _figure(6, 4.5)
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    for label, p in spectra.items():
        vals = _as_numpy(p)
        ax.loglog(ks, vals.clip(min=1e-300), marker=".", label=str(label))
    for i, band in enumerate(bands or ()):
        name, lo, hi = band[0], band[1], band[2]
        ax.axvspan(lo, hi, alpha=0.08 if i % 2 else 0.15, color="grey")
        extra = f" {band[3]:.3g}" if len(band) > 3 else ""
        ax.text((lo * hi) ** 0.5, 0.02, f"{name}{extra}", transform=ax.get_xaxis_transform(),
                ha="center", fontsize=8)
    ax.set_xlabel("k (cycles per box)")
    ax.set_ylabel("P(k)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return str(path)
