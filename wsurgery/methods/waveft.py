"""WaveFT (``peft_type: WAVEFT``): a sparse set of wavelet coefficients, brought to weight space by one
level of the inverse 2-D discrete wavelet transform.

For a layer whose change is ``(out, in)`` (Conv1D: the base stores ``(in, out)``, ``fan_in_fan_out``; an
adapter on both Conv1D and nn.Linear layers: each layer's type from the base, as in FourierFT, ``layer_type``):

* the ``n`` coefficient positions are drawn as in FourierFT, from
  ``torch.randperm(out·in, generator=torch.Generator().manual_seed(random_loc_seed))[:n]`` (never saved);
* ``use_idwt=False``: ``ΔW[rows, cols] = spectrum · scaling``;
* ``use_idwt=True`` (PEFT's default, family ``db1``): the ``(out, in)`` grid is padded by the family's
  reduction (filter length L − 2) and then to even sizes, the positions shifted by the centring offsets;
  the quadrants are the sub-bands cA (top-left), cH (top-right), cV (bottom-left), cD (bottom-right);
  PEFT reconstructs with its port of ptwt's ``waverec2d``: ``conv_transpose2d`` with stride 2 and the
  filters ``outer(rec_lo, rec_lo)``, ``outer(rec_hi, rec_lo)``, ``outer(rec_lo, rec_hi)``,
  ``outer(rec_hi, rec_hi)`` for cA, cH, cV, cD, crops ``(2L−3)//2`` on every side, multiplies by
  ``scaling`` and centre-crops to ``(out, in)``.

Only ``n`` coefficients are non-zero, so instead of a dense transposed convolution we add each
coefficient's L×L filter "stamp" at its place (the same sums, O(n·L²) work, no padded copies). The
filter taps are PyWavelets' reconstruction low-pass filters, as PEFT 0.21.2 ships them
(``tuners/waveft/wavelet.py``); the high-pass filter is ``rec_hi[i] = (−1)^i · rec_lo[L−1−i]`` and the
coiflets are scaled by √2, exactly as there.

Families: PEFT's config accepts db1–db38, sym2–sym20 and coif1–coif17, but its filter table only has
db1–db10, sym2–sym10 and coif1–coif5; for the others PEFT's own forward and merge fail, and so do we
(one line, at load). PEFT's coif5 table has 48 taps while its padding assumes 30, so its reconstruction
is smaller than the layer and its merge fails too: refused as well. Additive, so unmerge is exact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from .base import (AdapterContext, AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like,
                   register)
from .fourierft import config_seed, frequency_indices, layer_dims, layer_type, spectrum_of
from .hira import Layout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

# PyWavelets' reconstruction low-pass filters (MIT licence, (c) 2006-2012 Filip Wasilewski, (c) 2012- The
# PyWavelets Developers), the values PEFT 0.21.2 uses, written as the shortest round-trip doubles.
_REC_LO: dict[str, tuple[float, ...]] = {
    "db1": (
        0.7071067811865476, 0.7071067811865476
    ),
    "db2": (
        0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037
    ),
    "db3": (
        0.33267055295008263, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149,
        0.035226291882100656
    ),
    "db4": (
        0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854, -0.18703481171909309,
        0.030841381835560764, 0.0328830116668852, -0.010597401785069032
    ),
    "db5": (
        0.16010239797419293, 0.6038292697971896, 0.7243085284377729, 0.13842814590132074, -0.24229488706638203,
        -0.032244869584638375, 0.07757149384004572, -0.006241490212798274, -0.012580751999081999,
        0.0033357252854737712
    ),
    "db6": (
        0.11154074335010947, 0.49462389039845306, 0.7511339080210954, 0.31525035170919763, -0.22626469396543983,
        -0.12976686756726194, 0.09750160558732304, 0.027522865530305727, -0.03158203931748603,
        0.0005538422011614961, 0.004777257510945511, -0.0010773010853084796
    ),
    "db7": (
        0.07785205408500918, 0.3965393194819173, 0.7291320908462351, 0.4697822874051931, -0.14390600392856498,
        -0.22403618499387498, 0.07130921926683026, 0.08061260915108308, -0.03802993693501441, -0.01657454163066688,
        0.01255099855609984, 0.0004295779729213665, -0.0018016407040474908, 0.00035371379997452024
    ),
    "db8": (
        0.05441584224310401, 0.31287159091429995, 0.6756307362972898, 0.5853546836542067, -0.015829105256349306,
        -0.2840155429615469, 0.0004724845739132828, 0.12874742662047847, -0.017369301001807547,
        -0.044088253930794755, 0.013981027917398282, 0.008746094047405777, -0.004870352993451574,
        -0.00039174037337694705, 0.0006754494064505693, -0.00011747678412476953
    ),
    "db9": (
        0.038077947363878345, 0.24383467461259034, 0.6048231236901112, 0.6572880780513005, 0.13319738582500756,
        -0.2932737832791749, -0.09684078322297646, 0.14854074933810638, 0.03072568147933338, -0.06763282906132997,
        0.00025094711483145197, 0.022361662123679096, -0.004723204757751397, -0.00428150368246343,
        0.0018476468830562265, 0.00023038576352319597, -0.0002519631889427101, 3.93473203162716e-05
    ),
    "db10": (
        0.026670057900555554, 0.1881768000776915, 0.5272011889317256, 0.6884590394536035, 0.2811723436605775,
        -0.24984642432731538, -0.19594627437737705, 0.12736934033579325, 0.09305736460357235, -0.07139414716639708,
        -0.029457536821875813, 0.033212674059341, 0.0036065535669561697, -0.010733175483330575,
        0.001395351747052901, 0.001992405295185056, -0.0006858566949597116, -0.00011646685512928545,
        9.358867032006959e-05, -1.3264202894521244e-05
    ),
    "sym2": (
        0.48296291314469025, 0.836516303737469, 0.22414386804185735, -0.12940952255092145
    ),
    "sym3": (
        0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149,
        0.035226291882100656
    ),
    "sym4": (
        0.0322231006040427, -0.012603967262037833, -0.09921954357684722, 0.29785779560527736, 0.8037387518059161,
        0.49761866763201545, -0.02963552764599851, -0.07576571478927333
    ),
    "sym5": (
        0.019538882735286728, -0.021101834024758855, -0.17532808990845047, 0.01660210576452232, 0.6339789634582119,
        0.7234076904024206, 0.1993975339773936, -0.039134249302383094, 0.029519490925774643, 0.027333068345077982
    ),
    "sym6": (
        -0.007800708325034148, 0.0017677118642428036, 0.04472490177066578, -0.021060292512300564,
        -0.07263752278646252, 0.3379294217276218, 0.787641141030194, 0.4910559419267466, -0.048311742585633,
        -0.11799011114819057, 0.0034907120842174702, 0.015404109327027373
    ),
    "sym7": (
        0.010268176708511255, 0.004010244871533663, -0.10780823770381774, -0.14004724044296152, 0.2886296317515146,
        0.767764317003164, 0.5361019170917628, 0.017441255086855827, -0.049552834937127255, 0.0678926935013727,
        0.03051551316596357, -0.01263630340325193, -0.0010473848886829163, 0.002681814568257878
    ),
    "sym8": (
        0.0018899503327594609, -0.0003029205147213668, -0.01495225833704823, 0.003808752013890615,
        0.049137179673607506, -0.027219029917056003, -0.05194583810770904, 0.3644418948353314, 0.7771857517005235,
        0.4813596512583722, -0.061273359067658524, -0.1432942383508097, 0.007607487324917605, 0.03169508781149298,
        -0.0005421323317911481, -0.0033824159510061256
    ),
    "sym9": (
        0.0010694900329086053, -0.0004731544986800831, -0.010264064027633142, 0.008859267493400484,
        0.06207778930288603, -0.018233770779395985, -0.19155083129728512, 0.035272488035271894, 0.6173384491409358,
        0.717897082764412, 0.238760914607303, -0.05456895843083407, 0.0005834627461258068, 0.03022487885827568,
        -0.01152821020767923, -0.013271967781817119, 0.0006197808889855868, 0.0014009155259146807
    ),
    "sym10": (
        -0.0004593294210046588, 5.7036083618494284e-05, 0.004593173585311828, -0.0008043589320165449,
        -0.02035493981231129, 0.005764912033581909, 0.04999497207737669, -0.0319900568824278, -0.03553674047381755,
        0.38382676106708546, 0.7695100370211071, 0.47169066693843925, -0.07088053578324385, -0.15949427888491757,
        0.011609893903711381, 0.0459272392310922, -0.0014653825813050513, -0.008641299277022422,
        9.563267072289475e-05, 0.0007701598091144901
    ),
    "coif1": (
        -0.05142972847076845, 0.23892972847076846, 0.6028594569415369, 0.2721405430584631, -0.05142972847076845,
        -0.011070271529231544
    ),
    "coif2": (
        0.011587596738716868, -0.029320137983468563, -0.04763959031100813, 0.2730210465347666, 0.5746823938568638,
        0.2948671936956192, -0.05408560709171143, -0.042026480460771606, 0.016744410163279506, 0.003967883612962012,
        -0.0012892033561406595, -0.0005095053991076441
    ),
    "coif3": (
        -0.0026824186709220686, 0.005503126707831385, 0.016583560479170346, -0.046507764478726975,
        -0.043220763560211914, 0.28650333527364746, 0.56128525687033, 0.30298357177282415, -0.050770140754888865,
        -0.05819625076158553, 0.024434094321166958, 0.011229240962037866, -0.006369601011048823,
        -0.0018204589155662422, 0.0007902051009575939, 0.000329665173793183, -5.019277455327665e-05,
        -2.4465734255308132e-05
    ),
    "coif4": (
        0.0006309612114309468, -0.0011522251437699736, -0.005194525163470323, 0.01136093089978195,
        0.01894506104561664, -0.05171984370581528, -0.03448614047094481, 0.30227251053656845, 0.5545479062408811,
        0.30791766802517506, -0.0435250092812657, -0.064887950971431, 0.01988077364815952, 0.017638947871261697,
        -0.007366054847173364, -0.002312432307658842, 0.0014260063442333715, 0.00046669846355373536,
        -0.0001270007842387334, -0.0001130536369789105, 3.048364879677801e-05, 1.2667448089330081e-05,
        -1.5849265807568937e-06, -1.1239480882815428e-06
    ),
    "coif5": (
        -0.0001444992186438191, 0.00025416494920119467, 0.0015016192805175522, -0.0029411108712655517,
        -0.007177767151487719, 0.016680426640070654, 0.019433238433489604, -0.0649349465672125,
        -0.03624979308913257, 0.2980426621780944, 0.5574916297092007, 0.3073164452920678, -0.04708803471976115,
        -0.06889052250805007, 0.020697343297747767, 0.021640668655956857, -0.008108937307895367,
        -0.004988173767104185, 0.002448691432102127, 0.0014095103899593442, -0.0005637801876093826,
        -0.0002859004477225751, 0.00012739637513815207, 5.416263410701044e-05, -1.7368679443462806e-05,
        -1.3926561900600109e-05, 3.582065515946049e-06, 1.9140228958473188e-06, -3.12624883770169e-07,
        -3.4030635502511645e-07, 5.981606523851694e-08, 4.700142784945649e-08, -6.1586157096783646e-09,
        -9.225635096344936e-09, 1.0284860745188212e-09, 1.1687341751862637e-09, -9.468626176069127e-11,
        -1.6230233142152042e-10, 1.507665685934695e-11, 1.5770990416421914e-11, -1.084900468648598e-12,
        -1.9686597794118046e-12, 9.874563463972664e-14, 1.967347814605081e-13, -8.02108014529989e-15,
        -2.1030408801651653e-14, 7.238886978309157e-16, 1.9432085150727615e-15
    ),
}

# The extra rows/columns PEFT pads the coefficient grid with, by family (``WAVELET_REDUCTIONS``);
# for every family PEFT can run this is the filter length minus 2 (coif5 excepted, see above).
_REDUCTION = {**{f"db{i}": 2 * (i - 1) for i in range(1, 39)}, **{f"sym{i}": 2 * (i - 1) for i in range(2, 21)},
              **{f"coif{i}": 6 * i - 2 for i in range(1, 18)}}
_CHUNK = 1 << 22  # stamp entries per batch (n·L² can be large for long filters)


def reconstruction_filters(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rec_lo, rec_hi) as PEFT builds them: Python doubles, coiflets ×√2, then float32."""
    base = _REC_LO[family]
    scale = math.sqrt(2) if family.startswith("coif") else 1.0
    lo = [c * scale for c in base]
    hi = [(-1) ** i * lo[len(lo) - 1 - i] for i in range(len(lo))]
    return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


class WaveFTPatch(AdditivePatch):
    """ΔW = Tf(centre crop of idwt2(scattered coefficients) · scaling), or the scattered values without idwt."""

    peeked_roles = ("bias",)  # the layer type (fourierft.layer_type)

    def __init__(self, module: str, spectrum: torch.Tensor, scaling: float, seed: int, fan_in_fan_out: bool,
                 family: str | None, context: AdapterContext):
        super().__init__(module, ("weight",))
        self.spectrum, self.scaling, self.seed = spectrum, scaling, seed
        self.family, self.context = family, context  # family None: use_idwt=False
        self.layout = Layout.of(context, "WaveFT", fan_in_fan_out)
        self._by_shape: bool | None = None  # Conv1D? as the base's shapes say (None: square)
        self.dims: tuple[int, int] | None = None  # (out, in), from the base shape in ``check``

    @property
    def transposed(self) -> bool:
        return self.layout.transposed(self.module, self._by_shape)

    def check(self, shapes: Shapes) -> None:
        self._by_shape = layer_type(self.module, shapes)
        self.layout.observe(self.module, self._by_shape)
        out, in_ = layer_dims(self.module, shapes, self.transposed, self.spectrum.numel(), "WaveFT")
        if self.family is not None:
            size = self._geometry(self.family, out, in_)["reconstructed"]
            if size[0] < out or size[1] < in_:
                raise UnsupportedError(
                    f"{self.module}: WaveFT with wavelet_family={self.family!r} reconstructs a {list(size)} matrix "
                    f"for this {[out, in_]} layer, smaller than the layer, so PEFT cannot merge (or run) it either")
        self.dims = (out, in_)

    @staticmethod
    def _geometry(family: str, out: int, in_: int) -> dict[str, Any]:
        """PEFT's padding, sub-band split and crops for an ``(out, in)`` change."""
        length = len(_REC_LO[family])
        pad_rows, pad_cols = out + _REDUCTION[family], in_ + _REDUCTION[family]
        pad_rows += pad_rows % 2
        pad_cols += pad_cols % 2
        crop = (2 * length - 3) // 2  # waverec2d's crop on each side
        # conv_transpose2d with stride 2 gives 2·half + L − 2 per axis, then the crops.
        full = (pad_rows + length - 2, pad_cols + length - 2)
        recon = (full[0] - 2 * crop, full[1] - 2 * crop)
        return {"length": length, "padded": (pad_rows, pad_cols), "half": (pad_rows // 2, pad_cols // 2),
                "offset": ((pad_rows - out) // 2, (pad_cols - in_) // 2), "reconstructed": recon,
                # where (out, in) starts in the uncropped conv_transpose2d output
                "start": (crop + (recon[0] - out) // 2, crop + (recon[1] - in_) // 2)}

    def delta(self) -> Tensors:
        assert self.dims is not None  # derived from the shapes by bind()
        out, in_ = self.dims
        n = self.spectrum.numel()
        rows, cols = frequency_indices(self.context, self.seed, out, in_, n)
        values = self.spectrum.to(torch.float32)
        if self.family is None:
            d = torch.zeros(out, in_, dtype=torch.float32)
            d[rows, cols] = values
            d.mul_(self.scaling)
        else:
            d = self._idwt(self.family, out, in_, rows, cols, values).mul_(self.scaling)
        return {"weight": d.T if self.transposed else d}

    def _idwt(self, family: str, out: int, in_: int, rows: torch.Tensor, cols: torch.Tensor,
              values: torch.Tensor) -> torch.Tensor:
        """One level of PEFT's inverse DWT of the sparse coefficient grid, cropped to ``(out, in)``."""
        g = self._geometry(family, out, in_)
        lo, hi = reconstruction_filters(family)
        length = g["length"]
        half_r, half_c = g["half"]
        r = rows + g["offset"][0]
        c = cols + g["offset"][1]
        bottom, right = r >= half_r, c >= half_c  # sub-band: cA top-left, cH top-right, cV bottom-left, cD
        i, j = r - bottom * half_r, c - right * half_c
        # cH and cD (right half) use the high-pass filter along rows, cV and cD (bottom half) along columns.
        row_filter = torch.where(right[:, None], hi, lo)
        col_filter = torch.where(bottom[:, None], hi, lo)
        taps = torch.arange(length)
        d = torch.zeros(out * in_, dtype=torch.float32)
        step = max(1, _CHUNK // (length * length))
        for s in range(0, values.numel(), step):
            e = s + step
            y = (2 * i[s:e, None] + taps - g["start"][0])[:, :, None]  # (m, L, 1): output row of each tap
            x = (2 * j[s:e, None] + taps - g["start"][1])[:, None, :]  # (m, 1, L): output column
            stamp = (row_filter[s:e, :, None] * col_filter[s:e, None, :]) * values[s:e, None, None]
            keep = (y >= 0) & (y < out) & (x >= 0) & (x < in_)
            d.index_add_(0, (y * in_ + x)[keep], stamp[keep])
        return d.view(out, in_)

    # -- the unmerged forward path, for verify ---------------------------------------------------------
    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``WaveFTLinear.forward`` adds ``F.linear(x, ΔW)``. Here on activations, without ΔW: without
        idwt the coefficients map input ``cols`` to output ``rows``; with it, the one-level inverse DWT is
        separable, ``full = Σ_bands U(f_row)·C_band·U(f_col)ᵀ`` with ``U(f)[2i + t, i] = f[t]``, so
        ``x·ΔWᵀ`` is x (placed where the crops put the layer's columns) analysed by a stride-2 ``conv1d``
        with rec_lo/rec_hi, carried through the sparse sub-bands, and synthesised by a stride-2
        ``conv_transpose1d``, then cropped. The geometry is PEFT's ``get_delta_weight`` and ``waverec2d``,
        written out again here; the positions and filter taps are the shared parameterisation."""
        out, in_ = layer_dims(self.module, {"weight": tuple(base["weight"].shape)}, self.transposed,
                              self.spectrum.numel(), "WaveFT")
        rows, cols = (t.to(x.device) for t in frequency_indices(self.context, self.seed, out, in_,
                                                                 self.spectrum.numel()))
        v = like(self.spectrum, x) * self.scaling
        if self.family is None:  # ΔW[rows, cols] = v
            return layer(x, base).index_add(1, rows, x[:, cols] * v)
        lo, hi = (like(f, x) for f in reconstruction_filters(self.family))
        length = lo.numel()
        padded = [d + _REDUCTION[self.family] for d in (out, in_)]
        padded = [d + d % 2 for d in padded]
        half_rows, half_cols = padded[0] // 2, padded[1] // 2
        r, c = rows + (padded[0] - out) // 2, cols + (padded[1] - in_) // 2
        bottom, right = r >= half_rows, c >= half_cols  # cA | cH over cV | cD
        # conv_transpose2d's output is 2·half + L − 2 per axis; waverec2d crops (2L − 3)//2 from each side, then
        # get_delta_weight takes the centred (out, in) block: where that block starts in the full output.
        crop = (2 * length - 3) // 2
        full_rows, full_cols = 2 * half_rows + length - 2, 2 * half_cols + length - 2
        row0 = crop + (full_rows - 2 * crop - out) // 2
        col0 = crop + (full_cols - 2 * crop - in_) // 2
        bank = torch.stack([lo, hi])[:, None, :]  # (2, 1, L): channel 0 low-pass, 1 high-pass
        placed = torch.zeros(x.shape[0], 1, full_cols, device=x.device)
        placed[:, 0, col0:col0 + in_] = x
        analysed = F.conv1d(placed, bank, stride=2)  # (tokens, 2, half_cols): x·U(f)ᵀ for both filters
        # a coefficient in the bottom half uses the high-pass filter along the columns, the right half along rows
        carried = analysed[:, bottom.long(), c - right * half_cols] * v  # (tokens, n)
        bands = torch.zeros(x.shape[0], 2 * half_rows, device=x.device)
        bands.index_add_(1, right.long() * half_rows + (r - bottom * half_rows), carried)
        full = F.conv_transpose1d(bands.view(-1, 2, half_rows), bank, stride=2)  # (tokens, 1, full_rows)
        return layer(x, base) + full[:, 0, row0:row0 + out]

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.transposed else "linear", "n_frequency": self.spectrum.numel(),
                "scaling": self.scaling, "random_loc_seed": self.seed,
                "wavelet_family": self.family if self.family is not None else "none (use_idwt=false)"}


@register
class WaveFT(Method):
    peft_types = ("WAVEFT",)
    param_names = frozenset({"waveft_spectrum"})
    support = (Support("WaveFT (use_idwt with db1-db10, sym2-sym10, coif1-coif4, or without idwt; "
                       "n_frequency_pattern, proportional_parameters; positions regenerated from random_loc_seed)",
                       "Linear, Conv1D (fan_in_fan_out)", "exact", "exact", "0.21.2"),
               Support("WaveFT on Conv1D and Linear layers at once (each layer's type from the base's bias)",
                       "square weights among layers of both types", "refused: PEFT saves only the last wrapped "
                       "layer's fan_in_fan_out and a square weight's type is not in the files; merge with PEFT",
                       "-", "0.21.2"))

    def check_config(self, config: AdapterConfig) -> None:
        config_seed(config)
        scaling = config.get("scaling", 25.0)
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise UnsupportedError(f"{config.path}: scaling must be a number, got {scaling!r}")
        if config.get("use_idwt", True):
            family = config.get("wavelet_family", "db1")
            if family not in _REDUCTION:
                raise UnsupportedError(f"{config.path}: WaveFT wavelet_family {family!r} is not one PEFT accepts "
                                       "(db1-db38, sym2-sym20, coif1-coif17)")
            if family not in _REC_LO:
                raise UnsupportedError(f"{config.path}: WaveFT with wavelet_family {family!r} cannot be merged: PEFT "
                                       "0.21.2 has no filter taps for it, so its own forward and merge fail too "
                                       "(families with taps: db1-db10, sym2-sym10, coif1-coif5)")
            if len(_REC_LO[family]) - 2 != _REDUCTION[family]:
                raise UnsupportedError(
                    f"{config.path}: WaveFT with wavelet_family {family!r} cannot be merged: PEFT 0.21.2's filter for "
                    f"it has {len(_REC_LO[family])} taps but its padding assumes {_REDUCTION[family] + 2}, so the "
                    "reconstruction is smaller than the layer and PEFT's own forward and merge fail too")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"scaling": float(config.get("scaling", 25.0)),
                "random_loc_seed": config.raw.get("random_loc_seed", 777),
                "use_idwt": bool(config.get("use_idwt", True)), "wavelet_family": config.get("wavelet_family", "db1"),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
                "positions": f"regenerated with torch.randperm (CPU generator, torch {torch.__version__})"}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        # proportional_parameters spreads the budget over every targeted layer of the model, which the
        # files do not list; the spectrum length is what counts, so the config cannot be cross-checked.
        rule = "skip" if config.get("proportional_parameters", False) else "generic"
        spectrum = spectrum_of(params, "waveft_spectrum", rule)
        family = config.get("wavelet_family", "db1") if config.get("use_idwt", True) else None
        return WaveFTPatch(params.module, spectrum, float(config.get("scaling", 25.0)), config_seed(config),
                           bool(config.get("fan_in_fan_out", False)), family, params.context)
