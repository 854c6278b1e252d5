"""One class per paper component. Each no-argument constructor builds the paper configuration;
the other presets pass keyword arguments (their tables live in the stage scripts).

  VQAE             paired 3D VQ-autoencoder           (B, 2, H, W, D) masks  <-> (B, h, w, d) token ids
  TokenTransformer absorbing-diffusion denoiser        (B, L) ids (mask = K)  ->  (B, L, K) logits
  RegistrationNet  two-step inverse-consistent net     fixed, moving (B, 1, H, W, D) -> ddfs (B, 3, H, W, D)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AutoEncoder, UNet

import utils

# ======================================================================== VQ-AE (stage 1-2)

class VQAE(nn.Module):
    """Paired 3D VQ-autoencoder (stage 1-2): fixed + moving vessel masks as two input channels ->
    one grid of discrete tokens -> 4 output logits (channels 0-1: fixed background/vessel,
    2-3: moving background/vessel; a softmax over each pair gives the probabilities).

    Shapes: x (B, 2, H, W, D), H/W/D multiples of `stride` (pad with utils.pad_to_multiple)
    -> z, z_q (B, C, H/s, W/s, D/s), ids (B, H/s, W/s, D/s) in [0, num_codes) -> logits (B, 4, H, W, D).
    Paper: C = 384, s = 16, 1024 codes; a 256x208x256 frame pair -> 16x13x16 = 3328 tokens.

    The quantiser is written here (not MONAI's VectorQuantizer/EMAQuantizer) because MONAI's
    updates the codebook by exponential moving averages, while the paper learns it by gradient
    with the loss ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2 (beta = 0.25 on the codebook term:
    the ordering of taming-transformers' 'legacy' quantiser) and a uniform(+-1/K) initialisation.
    """

    def __init__(self, channels=(48, 48, 64, 64, 128, 192, 256, 384), strides=(1, 2, 1, 2, 1, 2, 1, 2),
                 num_codes=1024, beta=0.25):
        super().__init__()
        self.kwargs = {"channels": list(channels), "strides": list(strides), "num_codes": num_codes, "beta": beta}
        self.ae = AutoEncoder(spatial_dims=3, in_channels=2, out_channels=4, channels=channels, strides=strides)
        self.stride = math.prod(strides)
        self.num_codes, self.code_dim, self.beta = num_codes, channels[-1], beta
        self.codebook = nn.Embedding(num_codes, self.code_dim)
        self.codebook.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)

    def token_grid(self, size):
        """Token grid of an input of spatial `size` (padded up to multiples of the stride)."""
        return tuple(-(-s // self.stride) for s in size)

    def quantise(self, z):
        """z (B, C, h, w, d) -> (z_q with straight-through gradient, codebook loss, ids (B, h, w, d))."""
        zf = z.float().movedim(1, -1)  # distances in fp32 even under autocast
        flat = zf.reshape(-1, self.code_dim)
        e = self.codebook.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        ids = d.argmin(1)
        zq = self.codebook(ids).float().view_as(zf)
        loss = F.mse_loss(zf, zq.detach()) + self.beta * F.mse_loss(zq, zf.detach())
        zq = zf + (zq - zf).detach()  # straight-through: decoder gradient flows to the encoder
        return zq.movedim(-1, 1).to(z.dtype), loss, ids.view(zf.shape[:-1])

    def encode(self, x):
        """x (B, 2, H, W, D) -> (z_q (B, C, h, w, d), codebook loss (scalar), token ids (B, h, w, d))."""
        if any(s % self.stride for s in x.shape[-3:]):
            raise ValueError(f"VQAE input {tuple(x.shape[-3:])} is not a multiple of the stride {self.stride}")
        return self.quantise(self.ae.intermediate(self.ae.encode(x)))

    def decode(self, zq):
        """z_q (B, C, h, w, d) -> logits (B, 4, h*s, w*s, d*s)."""
        return self.ae.decode(zq)

    def decode_tokens(self, ids, grid_shape):
        """Token ids (B, h*w*d) or (B, h, w, d), row-major over grid_shape = (h, w, d) -> logits
        (B, 4, h*s, w*s, d*s) (logits, not probabilities: use VQAE.pair_probs)."""
        ids = ids.long().reshape(-1, *grid_shape).to(self.codebook.weight.device)
        return self.decode(self.codebook(ids).movedim(-1, 1))

    def forward(self, x):
        """x (B, 2, H, W, D) -> (logits (B, 4, H, W, D), codebook loss, ids (B, h, w, d))."""
        zq, loss, ids = self.encode(x)
        return self.decode(zq), loss, ids

    @staticmethod
    def pair_probs(logits, size=None):
        """Logits (B, 4, ...) -> vessel probabilities (fixed, moving), each (B, H, W, D), cropped to
        `size` (e.g. utils.grid_shape(factor), undoing utils.pad_to_multiple) when given."""
        if size is not None:
            logits = utils.crop_to(logits, size)
        logits = logits.float()
        return logits[:, :2].softmax(1)[:, 1], logits[:, 2:].softmax(1)[:, 1]




# ======================================================================== absorbing diffusion (stage 3-4)


# ======================================================================== registration (stage 5)
class RegistrationNet(nn.Module):
    """Two-step inverse-consistent registration ("Inverse Consistency by Construction", Greer et
    al. 2023), as in the seed. forward(fixed, moving), each (B, 1, H, W, D) in [0, 1], returns
    (ddf, ddf_inv), each (B, 3, H, W, D) in voxels of the input grid: warp(moving, ddf) ~ fixed and
    ddf_inv is its exact inverse, because swapping the inputs negates every velocity.

    exp_at="input" is the seed: the smoothed velocity is upsampled to the input grid and squared
    there (12 squarings on ~1.7 M voxels at half resolution). exp_at="velocity" integrates and
    composes on the smooth velocity's own coarse grid and upsamples only the final fields: the
    velocity is a heavily averaged field, so the result is nearly the same at a fraction of the cost.
    """

    def __init__(self, channels=(8, 16, 32, 64, 64, 64), strides=(2, 2, 1, 2, 1), max_velocity=0.35,
                 pool_strides=(2, 2, 1, 1), pool_kernel=7, squarings=12, exp_at="input"):
        super().__init__()
        assert exp_at in ("input", "velocity")
        self.unets = nn.ModuleList(UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=channels,
                                        strides=strides) for _ in range(2))
        self.multiple = math.prod(strides)
        self.max_velocity, self.pool_strides, self.pool_kernel = max_velocity, pool_strides, pool_kernel
        self.squarings, self.exp_at = squarings, exp_at

    def velocity(self, step, a, b):
        """Antisymmetric smooth velocity of step 0/1: v(a, b) = -v(b, a), in normalised units
        (2 = the whole volume, as the seed's grid_sample grids) on the pooled grid."""
        x = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])  # both orders in one batch
        x, size = utils.pad_to_multiple(x, self.multiple)  # MONAI UNet needs sizes divisible by its stride
        o_ab, o_ba = utils.crop_to(self.unets[step](x), size).float().chunk(2)
        v = (torch.tanh(o_ab) - torch.tanh(o_ba)) * self.max_velocity
        k, p = self.pool_kernel, self.pool_kernel // 2
        for s in self.pool_strides:  # the seed's smoothing: avg-pool 7 (stride 2, 2, then 1, 1),
            for ax in range(3):      # computed as three exact 1D box filters (7 instead of 343 taps)
                one = lambda a, b: tuple(a if i == ax else b for i in range(3))  # noqa: E731
                v = F.avg_pool3d(v, one(k, 1), stride=one(s, 1), padding=one(p, 0))
        return v

    def exp(self, v, size):
        """Normalised velocity -> ddf (voxel units) on the grid chosen by exp_at."""
        if self.exp_at == "input":
            v = F.interpolate(v, size=size, mode="trilinear", align_corners=False)
        scale = torch.tensor(v.shape[2:], dtype=v.dtype, device=v.device).view(1, 3, 1, 1, 1) / 2
        return utils.exp_velocity(v * scale, self.squarings)

    def forward(self, fixed, moving):
        size = fixed.shape[2:]
        up = lambda d: utils.resize_ddf(d, size)  # noqa: E731  (identity when exp_at="input")
        v1 = self.velocity(0, fixed, moving)
        half, half_inv = self.exp(v1 / 2, size), self.exp(-v1 / 2, size)
        # step 2 registers the two images warped half-way towards each other
        v2 = self.velocity(1, utils.warp(fixed, up(half_inv)), utils.warp(moving, up(half)))
        psi, psi_inv = self.exp(v2, size), self.exp(-v2, size)
        ddf = utils.compose(half, utils.compose(psi, half))  # half(step 1) o step 2 o half(step 1)
        ddf_inv = utils.compose(half_inv, utils.compose(psi_inv, half_inv))
        return up(ddf), up(ddf_inv)
