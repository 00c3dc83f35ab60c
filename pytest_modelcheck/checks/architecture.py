"""Architecture checks that need declarations: UNet skips, ViT patches, FNO modes, power spectra.

* ``unet_skips(sizes)``: every ``torch.cat`` of the forward joins tensors of matching spatial
  size at each declared input size; names the first mismatching cat (module, source line) and the
  divisibility rule the UNet's depth imposes.
* ``vit_patches(sizes)``: the patch embedding (a convolution with kernel == stride) tiles each
  declared size and the token count matches the positional embedding's length (the parameter
  added to the patch tokens, found at dispatch); skipped when the model has no patch embedding.
* ``fno_modes(grid_sizes=None)``: the Fourier modes kept by each spectral layer (found from the
  FFT ops at dispatch and the slices of their spectra) fit below the Nyquist limit of each grid,
  and its output holds no energy beyond the kept modes; skipped when no FFT truncates modes.
* ``spectrum_matches()``: the radially averaged power spectrum of the prediction follows the
  target's in every wavenumber band.

None runs by default (``default=False``): each needs the user to say what to expect. Each lives in
its own module (``unet``, ``vit``, ``fno``, ``spectra``; shared helpers in ``spatial``), re-exported
here.
"""
from .fno import fno_modes
from .spectra import spectrum_matches
from .unet import unet_skips
from .vit import vit_patches

__all__ = ["fno_modes", "spectrum_matches", "unet_skips", "vit_patches"]
