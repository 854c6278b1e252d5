"""One class per paper component. Each no-argument constructor builds the paper configuration;
the other presets pass keyword arguments (their tables live in the stage scripts). Every class
loads itself from its checkpoint: Class.from_checkpoint(path).

  VQAE             paired 3D VQ-autoencoder           (B, 2, H, W, D) masks  <-> (B, h, w, d) token ids
  TokenTransformer absorbing-diffusion denoiser        (B, L) ids (mask = K)  ->  (B, L, K) logits (K = len(vocab))
  RegistrationNet  two-step inverse-consistent net     fixed, moving (B, 1, H, W, D) -> ddfs (B, 3, H, W, D)
  (2D: every D dropped and ddfs of 2 channels; see below)
  TokenDecoder     stand-in decoder of a token file    (B, h, w, d) ids       ->  (B, 2, H, W, D) logits
                   whose VQ-AE is not available (the reference's 97 grids; not part of the paper)

2D data (spatial_dims=2, MONAI's parameter, passed down from the frame) drop D everywhere: masks
(B, 2, H, W), token grids (B, h, w), ddfs (B, 2, H, W). The default 3 is the paper's model.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import AutoEncoder, UNet

import utils

# ======================================================================== checkpoints
def model_config(preset, factor, model_kwargs, **more):
    """The config every checkpoint stores next to its weights: {preset, factor (the data's frame
    pooling), model: constructor kwargs, frame (utils section 5), ...}. Tuples become lists (what
    torch.load gives back)."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()}
    return {"preset": preset, "factor": factor, "model": kwargs, **more}


class Checkpointed(nn.Module):
    """A network that rebuilds itself from a checkpoint written by utils.save_checkpoint with its
    `kind` and a model_config: Class.from_checkpoint(path) -> the model in eval mode, with
    .config (the config), .saved (the checkpoint's other entries, weights and optimiser left out)
    and .path."""

    kind = None
    TRAINING_STATE = ("state", "optimizer", "optimisers", "scheduler", "scaler", "rng")

    @classmethod
    def build(cls, config):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()})

    def load_weights(self, state, path):
        """load_state_dict, with a mismatch reported as one line naming the file."""
        try:
            self.load_state_dict(state)
        except RuntimeError:
            raise utils.DataError(f"{path}: weights do not match the stored model config")

    @classmethod
    def from_checkpoint(cls, path, device=None, preset=None):
        """preset: refuse a checkpoint of another preset."""
        ck = utils.load_checkpoint(path, cls.kind)
        cfg = ck["config"]
        if not isinstance(cfg, dict) or not {"preset", "factor", "model"} <= set(cfg):
            raise utils.DataError(f"{path}: checkpoint config lacks preset / factor / model")
        cfg["frame"] = utils.check_frame(cfg.get("frame"), path)  # every stage reads its frame from here
        if preset is not None and cfg["preset"] != preset:
            raise utils.DataError(f"{path}: is a '{cfg['preset']}' {cls.kind} checkpoint, expected '{preset}'")
        try:
            model = cls.build(cfg)
        except TypeError as e:
            raise utils.DataError(f"{path}: model config does not build a {cls.__name__} ({e})")
        model.load_weights(ck["state"], path)
        model.config = cfg
        model.saved = {k: v for k, v in ck.items() if k not in cls.TRAINING_STATE}
        model.path = path
        return model.to(device or utils.get_device()).eval()


# ======================================================================== VQ-AE (stage 1-2)

class VQAE(Checkpointed):
    """Paired 3D VQ-autoencoder (stage 1-2): fixed + moving vessel masks as two input channels ->
    one grid of discrete tokens -> 4 output logits (channels 0-1: fixed background/vessel,
    2-3: moving background/vessel; a softmax over each pair gives the probabilities).

    Shapes: x (B, 2, H, W, D), H/W/D multiples of `stride` (pad with utils.pad_to_multiple)
    -> z, z_q (B, C, H/s, W/s, D/s), ids (B, H/s, W/s, D/s) in [0, num_codes) -> logits (B, 4, H, W, D).
    Paper: C = 384, s = 16, 1024 codes; a 256x208x256 frame pair -> 16x13x16 = 3328 tokens.
    classes K > 1 (not in the paper: label maps of K structures): x (B, 2K, ...) [fixed classes, moving
    classes] -> logits (B, 2(K+1), ...), a softmax over background and the K classes per map.

    The quantiser is written here (not MONAI's VectorQuantizer/EMAQuantizer) because MONAI's
    updates the codebook by exponential moving averages, while the paper learns it by gradient
    with the loss ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2 (beta = 0.25 on the codebook term:
    the ordering of taming-transformers' 'legacy' quantiser) and a uniform(+-1/K) initialisation.
    """

    kind = "vqae"

    def __init__(self, channels=(48, 48, 64, 64, 128, 192, 256, 384), strides=(1, 2, 1, 2, 1, 2, 1, 2),
                 num_codes=1024, beta=0.25, spatial_dims=3, classes=1):
        super().__init__()
        self.ae = AutoEncoder(spatial_dims=spatial_dims, in_channels=2 * classes, out_channels=2 * (classes + 1),
                              channels=channels, strides=strides)
        self.spatial_dims, self.classes = spatial_dims, classes
        self.stride = math.prod(strides)
        self.num_codes, self.code_dim, self.beta = num_codes, channels[-1], beta
        self.codebook = nn.Embedding(num_codes, self.code_dim)
        self.codebook.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)
        self.last_z = None  # encoder outputs (N, C) of the latest training batch

    def token_grid(self, size):
        """Token grid of an input of spatial `size` (padded up to multiples of the stride)."""
        return tuple(-(-s // self.stride) for s in size)

    def quantise(self, z):
        """z (B, C, h, w, d) -> (z_q with straight-through gradient, codebook loss, ids (B, h, w, d))."""
        zf = utils.fp32(z).movedim(1, -1)
        flat = zf.reshape(-1, self.code_dim)
        e = utils.fp32(self.codebook.weight)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        ids = d.argmin(1)
        zq = utils.fp32(self.codebook(ids)).view_as(zf)
        loss = F.mse_loss(zf, zq.detach()) + self.beta * F.mse_loss(zq, zf.detach())
        self.last_z = flat.detach() if self.training else None  # for restart_codes
        zq = zf + (zq - zf).detach()  # straight-through: decoder gradient flows to the encoder
        return zq.movedim(-1, 1).to(z.dtype), loss, ids.view(zf.shape[:-1])

    @torch.no_grad()
    def restart_codes(self, dead):
        """Move the codes flagged in `dead` (bool (K,)) onto random encoder outputs of the latest
        training batch. Not in the paper: the cpu/demo presets use it against dead codes (with few
        iterations the codebook collapses to ~10 codes otherwise). Returns the number moved."""
        idx = dead.nonzero().squeeze(1).to(self.codebook.weight.device)
        z = self.last_z
        if len(idx) and z is not None:
            pick = torch.randint(len(z), (len(idx),), device=z.device)
            self.codebook.weight.data[idx] = z[pick].to(self.codebook.weight.dtype)
        return len(idx)

    def encode(self, x):
        """x (B, 2, H, W, D) -> (z_q (B, C, h, w, d), codebook loss (scalar), token ids (B, h, w, d))."""
        if any(s % self.stride for s in x.shape[2:]):
            raise ValueError(f"VQAE input {tuple(x.shape[2:])} is not a multiple of the stride {self.stride}")
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

    def decode_pair(self, ids, size, calibrate=False, foreground=False):
        """Token ids (B, h, w, d) -> (fixed, moving) vessel maps, each (B, *size) (VQAE.pair_probs; K
        classes: (B, K, *size), or with foreground=True their sum (B, *size), e.g. for a figure)."""
        maps = VQAE.pair_probs(self.decode_tokens(ids, ids.shape[1:]), size, calibrate)
        return tuple(m.sum(1) for m in maps) if foreground and self.classes > 1 else maps

    def fingerprint(self):
        """A number that identifies the codebook (tokens only mean something with their decoder)."""
        return float(self.codebook.weight.detach().cpu().double().abs().sum())

    @torch.no_grad()
    def reconstruct(self, pairs, keep_probs=False, pool=1):
        """Whole pairs (N, 2, H, W, D), one at a time -> token ids (N, h, w, d), Dice (N, 2) [fixed,
        moving] of the reconstruction (calibrated, threshold 0.5; K classes: over all of them) and, if
        asked, the probabilities (N, 2, H/pool, W/pool, D/pool) on the CPU (average-pooled pair by
        pair; K classes: each map's foreground)."""
        was_training = self.training
        self.eval()
        dev = self.codebook.weight.device
        ids, dices, probs = [], [], []
        for x in pairs:
            x = x[None].to(dev).float()
            xp, size = utils.pad_to_multiple(x, self.stride)
            with utils.autocast(dev):
                zq, _, t = self.encode(xp)
                fixed, moving = VQAE.pair_probs(self.decode(zq), size, calibrate=True)
            ids.append(t[0].cpu())
            K = self.classes
            dices.append([utils.dice(fixed[0], x[0, :K].squeeze(0)), utils.dice(moving[0], x[0, K:].squeeze(0))])
            if keep_probs:  # K > 1: each map's foreground
                maps = torch.stack([fixed[0], moving[0]]) if K == 1 else torch.stack([fixed[0].sum(0), moving[0].sum(0)])
                probs.append(utils.pool(maps, pool, self.spatial_dims).cpu())
        self.train(was_training)
        return torch.stack(ids), np.array(dices), (torch.stack(probs) if keep_probs else None)

    CLASS_WEIGHTS = (1.0, 2.5)  # the paper's cross-entropy weights (background, vessel; K classes: 2.5 each)

    @staticmethod
    def pair_probs(logits, size=None, calibrate=False):
        """Logits (B, 4, ...) -> vessel probabilities (fixed, moving), each (B, H, W, D) (K classes:
        logits (B, 2(K+1), ...) -> (B, K, H, W, D) each), cropped to
        `size` (e.g. utils.grid_shape(factor), undoing utils.pad_to_multiple) when given.

        The class-weighted CE is minimised by the softmax s = w1 q / (w1 q + w0 (1 - q)) where q is
        the true vessel probability (or soft occupancy target), so the raw softmax over-states
        vessels (s > 0.5 already at q = 0.29). The default is the raw softmax, what the reference
        implementation writes and thresholds; calibrate=True inverts that map,
        q = w0 s / (w1 - (w1 - w0) s): outputs are then occupancies on the scale of the real data,
        and q > 0.5 is the matching threshold."""
        if size is not None:
            logits = utils.crop_to(logits, size)
        logits = logits.float()
        if logits.shape[1] > 4:  # K classes: (B, K, ...) per map; calibrated q_c = (s_c / w_c) / sum_j s_j / w_j
            w0, w1 = VQAE.CLASS_WEIGHTS
            s = tuple(p.softmax(1) for p in logits.chunk(2, 1))
            if calibrate:
                s = tuple(torch.cat([p[:, :1] / w0, p[:, 1:] / w1], 1) for p in s)
                s = tuple(p / p.sum(1, keepdim=True) for p in s)
            return tuple(p[:, 1:] for p in s)
        s = logits[:, :2].softmax(1)[:, 1], logits[:, 2:].softmax(1)[:, 1]
        if calibrate:
            w0, w1 = VQAE.CLASS_WEIGHTS
            s = tuple(w0 * p / (w1 - (w1 - w0) * p) for p in s)
        return s


# ======================================================================== absorbing diffusion (stage 3-4)
class TokenTransformer(Checkpointed):
    """Absorbing-diffusion denoiser over VQ token grids (Austin et al. 2021; Bond-Taylor et al.,
    "Unleashing Transformers", 2022): a bidirectional transformer that predicts the original code
    at every position of a partly masked grid.

    Shapes: ids (B, L) long in [0, K], K = len(vocab) (num_codes without vocab) is the mask token,
    L = seq_len = h*w*d (row-major over the VQ-AE token grid) -> logits (B, L, K) over the codes.
    Paper: K = 1024, 16x13x16 grid (L = 3328), 12 post-norm layers of width 512, 16 heads, ff 1024,
    GELU, dropout 0.1; embeddings and head N(0, 0.02), the layers PyTorch's default init.
    Attention always runs through F.scaled_dot_product_attention: nn.MultiheadAttention calls it
    (need_weights=False, as TransformerEncoderLayer asks) unless the layer takes its inference
    "fast path", whose CPU kernel computes attention as bmm-softmax-bmm, slower than SDPA's fused
    kernel - so forward() switches that path off. SDPA then picks the fused flash kernel (CUDA; on
    CPU too, except in training with attention dropout, which PyTorch's CPU flash kernel lacks:
    SDPA falls back to its math backend - hence attn_dropout=0 in the cpu preset).
    tests/test_diffusion.py checks both with SDPA's backend switch.

    group g > 1 (not in the paper; for the reference's 16x13x16 grids on a CPU): one position per
    g x g x g block of the token grid `grid_shape` (padded with masks), so 3328 tokens take 8x7x8 = 448
    positions. A position embeds its g^3 tokens with one embedding table per slot (summed: the same as
    a linear map of their concatenated one-hots) and its head predicts all g^3; the loss, masks and
    sampler still work per token. g = 1 is the paper's model, parameter for parameter.

    vocab (not in the paper; cpu/demo): the codebook ids the model predicts (those of its training
    grids), so the head and softmax have len(vocab) classes instead of num_codes - the reference's
    97 grids use 72 of 1024 codes. loss() takes and sample() returns codebook ids; inside, ids are
    indices into vocab and the mask token is len(vocab). None: every code (the paper).
    """

    kind = "diffusion"
    T = 256  # diffusion time steps (the reference implementation's)

    def __init__(self, num_codes=1024, seq_len=3328, dim=512, layers=12, heads=16, ff=1024, dropout=0.1,
                 attn_dropout=None, grid_shape=None, group=1, vocab=None):
        super().__init__()
        self.num_codes = num_codes
        vocab = torch.arange(num_codes) if vocab is None else torch.as_tensor(vocab, dtype=torch.long)
        if vocab.unique().numel() != len(vocab) or vocab.min() < 0 or vocab.max() >= num_codes:
            raise ValueError(f"vocab must hold distinct codebook ids in [0, {num_codes})")
        self.classes = self.mask_id = len(vocab)
        index = torch.full((num_codes,), -1, dtype=torch.long)
        index[vocab] = torch.arange(len(vocab))
        self.register_buffer("vocab", vocab, persistent=False)  # class -> codebook id
        self.register_buffer("index", index, persistent=False)  # codebook id -> class (-1: not in vocab)
        self.seq_len = seq_len
        self.group, self.grid_shape = group, tuple(grid_shape or (seq_len,))
        if math.prod(self.grid_shape) != seq_len:
            raise ValueError(f"grid_shape {self.grid_shape} does not hold seq_len {seq_len} tokens")
        slots = group ** len(self.grid_shape) if group > 1 else 1
        positions = math.prod(-(-n // group) for n in self.grid_shape)
        self.tok = nn.Embedding((self.classes + 1) * slots, dim)
        self.pos = nn.Parameter(torch.empty(1, positions, dim))
        # independently initialised layers (PyTorch's default init), as the reference builds them;
        # nn.TransformerEncoder would deep-copy one layer, so all would start identical
        self.blocks = nn.Sequential(*[self._layer(dim, heads, ff, dropout, attn_dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.classes * slots, bias=False)
        for w in (self.tok.weight, self.pos, self.head.weight):
            nn.init.normal_(w, 0.0, 0.02)
        self.register_buffer("slot_offset", torch.arange(slots) * (self.classes + 1), persistent=False)

    @staticmethod
    def _layer(dim, heads, ff, dropout, attn_dropout):
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, activation="gelu", batch_first=True)
        if attn_dropout is not None:  # None: PyTorch's default, the residual/feed-forward dropout
            layer.self_attn.dropout = attn_dropout
        return layer

    def blocks_of(self, x, fill):
        """(B, L, *rest) row-major over grid_shape -> (B, P, g^3, *rest): the tokens of each g x g x g
        block (g^2 on a 2D grid; the grid padded with `fill`); g = 1: (B, L, 1, *rest)."""
        g = self.group
        if g == 1:
            return x.unsqueeze(2)
        rest = x.shape[2:]
        x = x.reshape(len(x), *self.grid_shape, *rest)
        pad = [0, 0] * len(rest)
        for n in reversed(self.grid_shape):
            pad += [0, -n % g]
        x = F.pad(x, pad, value=fill)
        n, B = len(self.grid_shape), len(x)
        x = x.reshape(B, *[v for s in x.shape[1:1 + n] for v in (s // g, g)], *rest)  # (B, H/g, g, W/g, g, ...)
        x = x.permute(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), *range(2 * n + 1, 2 * n + 1 + len(rest)))
        return x.reshape(B, -1, g ** n, *rest)

    def tokens_of(self, y):
        """blocks_of's inverse: (B, P, g^3, *rest) -> (B, L, *rest), the padding dropped."""
        g = self.group
        if g == 1:
            return y.squeeze(2)
        rest, n = y.shape[3:], len(self.grid_shape)
        blocks = [-(-k // g) for k in self.grid_shape]
        y = y.reshape(len(y), *blocks, *[g] * n, *rest)
        y = y.permute(0, *[v for i in range(n) for v in (1 + i, 1 + n + i)], *range(2 * n + 1, 2 * n + 1 + len(rest)))
        y = y.reshape(len(y), *[k * g for k in blocks], *rest)[(slice(None),) + tuple(slice(0, k) for k in self.grid_shape)]
        return y.reshape(len(y), self.seq_len, *rest)

    def classes_of(self, x0):
        """Codebook ids (B, L) -> class indices into vocab; an id outside maps to -1 (train_diffusion
        builds vocab from the training grids, so only held-out grids can hold such ids)."""
        return self.index[x0.long()]

    def forward(self, ids):
        """ids (B, L) class indices (mask: len(vocab)) -> logits (B, L, len(vocab))."""
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # keep attention on the SDPA kernels (see above)
        try:
            x = self.tok(self.blocks_of(ids, self.mask_id) + self.slot_offset).sum(2)  # (B, P, dim)
            y = self.head(self.norm(self.blocks(x + self.pos)))  # (B, P, g^3 K)
            return self.tokens_of(y.unflatten(-1, (-1, self.classes)))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    @staticmethod
    def mask_tokens(x0, t, mask_id, generator=None, share=(0, 1)):
        """Forward process q(x_t | x_0): each token is absorbed into the mask with probability t.
        x0 (B, L), t (B,) in (0, 1] -> (x_t (B, L), masked (B, L) bool). Draws on x0's device.
        share (rank, processes): x0 is that part of a global batch; the draws are the whole batch's."""
        rank, procs = share
        n = len(x0)
        draws = torch.rand((n * procs, x0.shape[1]), generator=generator, device=x0.device)
        masked = draws[rank * n:(rank + 1) * n] < t[:, None]
        return x0.masked_fill(masked, mask_id), masked

    @staticmethod
    def weighted_elbo(logits, x0, masked, t):
        """The reference implementation's weighted ELBO ('reweighted_elbo' of Unleashing Transformers), per sample:
        sum over masked tokens of CE(logits, x0), times (1 - t), / (ln 2 * L): bits per token.
        (The reference divides by ln 2 * K * L, the shape of its permuted logits: K times smaller.)
        logits (B, L, K), x0 (B, L), masked (B, L) bool, t (B,) -> (B,)."""
        ce = F.cross_entropy(utils.fp32(logits).transpose(1, 2), x0.long(), reduction="none")
        return (ce * masked).sum(1) * (1 - t) / (math.log(2) * x0.shape[1])

    def loss(self, x0, generator=None, net=None, share=(0, 1)):
        """Training loss of a batch x0 (B, L): t ~ U{1..T}/T per sample, mask, denoise, mean ELBO.
        net: what runs the denoiser (its DistributedDataParallel wrapper under torchrun); share
        (rank, processes): x0 is that part of a global batch, the draws are the whole batch's."""
        rank, procs = share
        n = len(x0)
        x0 = self.classes_of(x0)
        t = torch.randint(1, self.T + 1, (n * procs,), generator=generator, device=x0.device)[rank * n:(rank + 1) * n] / self.T
        xt, masked = self.mask_tokens(x0, t, self.mask_id, generator, share)
        unseen = x0 < 0  # a held-out grid's code outside vocab: shown masked, left out of the loss (0 bits)
        xt = xt.masked_fill(unseen, self.mask_id)  # unconditional: no host synchronisation on a GPU
        masked = masked & ~unseen
        return self.weighted_elbo((net or self)(xt), x0.clamp(min=0), masked, t).mean()

    @torch.no_grad()
    def sample(self, n, steps=256, temp=0.9, schedule="reference", generator=None, device=None, on_step=None):
        """Reverse process: start fully masked; in `steps` denoiser calls unmask every token exactly
        once, drawing it from Categorical(logits / temp) and keeping it. Returns codebook ids (n, L)
        long (on_step sees class indices, masks = mask_id).
        schedule "reference": at step k (0-based) each still-masked token is unmasked with probability
          1 / (steps - k) (the reference's sampler with steps = 256: a uniformly random order);
        "cosine": a random order too, but exactly L*cos(pi/2 s) tokens stay masked after a fraction s
          of the steps (few tokens first, many at the end, as MaskGIT). `generator` (on `device`) makes
          it reproducible; on_step(k, ids) observes."""
        if schedule not in ("reference", "cosine"):
            raise ValueError(f"schedule must be 'reference' or 'cosine', got {schedule!r}")
        device = device or self.pos.device
        was_training = self.training
        self.eval()
        L = self.seq_len
        x = torch.full((n, L), self.mask_id, dtype=torch.long, device=device)
        if schedule != "reference":  # random order; position order[:, j] is unmasked j-th from the end
            order = torch.rand((n, L), generator=generator, device=device).argsort(1)
            frac = torch.linspace(0, 1, steps + 1)[1:]
            left = (torch.cos(math.pi / 2 * frac) * L).floor().long().tolist()
            left[-1] = 0
        for k in range(steps):
            still = x == self.mask_id
            if schedule == "reference":
                change = still & (torch.rand((n, L), generator=generator, device=device) < 1 / (steps - k))
            else:
                prev = L if k == 0 else left[k - 1]
                change = torch.zeros_like(still)
                change.scatter_(1, order[:, left[k]:prev], True)
            # draw at every position and keep the draws where `change`, as the reference: no
            # data-dependent shapes, so no host synchronisation inside the loop on a GPU
            with utils.autocast(torch.device(device)):
                logits = self(x).float() / temp
            draw = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator).view(n, L)
            x = torch.where(change, draw, x)
            if on_step:
                on_step(k, x)
        self.train(was_training)
        return self.vocab[x]


# ======================================================================== registration (stage 5)
class RegistrationNet(Checkpointed):
    """Two-step inverse-consistent registration ("Inverse Consistency by Construction", Greer et
    al. 2023), as in the reference implementation. forward(fixed, moving), each (B, 1, H, W, D) in [0, 1] (K
    classes: (B, K, H, W, D), one channel per class; not in the paper), returns
    (ddf, ddf_inv), each (B, 3, H, W, D) in voxels of the input grid: warp(moving, ddf) ~ fixed and
    ddf_inv is its exact inverse, because swapping the inputs negates every velocity.

    exp_at="input" is the reference implementation: the smoothed velocity is upsampled to the input grid and squared
    there (12 squarings on ~1.7 M voxels at half resolution). exp_at="velocity" integrates and
    composes on the smooth velocity's own coarse grid (coarsened further by `exp_coarsen`) and
    upsamples only the final fields: the velocity is a heavily averaged field, so the result is
    nearly the same at a fraction of the cost (measured in tools/benchmark_registration.py).
    """

    kind = "regnet"

    def __init__(self, channels=(8, 16, 32, 64, 64, 64), strides=(2, 2, 1, 2, 1), max_velocity=0.35,
                 pool_strides=(2, 2, 1, 1), pool_kernel=7, squarings=12, exp_at="input", exp_coarsen=1, spatial_dims=3,
                 classes=1):
        super().__init__()
        if exp_at not in ("input", "velocity") or (exp_at == "input" and exp_coarsen != 1):
            raise ValueError(f"exp_at={exp_at!r} with exp_coarsen={exp_coarsen}: coarsening needs exp_at='velocity'")
        self.unets = nn.ModuleList(UNet(spatial_dims=spatial_dims, in_channels=2 * classes, out_channels=spatial_dims,
                                        channels=channels, strides=strides) for _ in range(2))
        self.classes = classes
        self.spatial_dims = spatial_dims
        self.multiple = math.prod(strides)
        self.max_velocity, self.pool_strides, self.pool_kernel = max_velocity, pool_strides, pool_kernel
        self.squarings, self.exp_at, self.exp_coarsen = squarings, exp_at, exp_coarsen
        self.runners = list(self.unets)  # what runs each UNet (a plain list: no state_dict keys); see parallel

    def parallel(self, device):
        """Run each UNet through utils.parallel (DistributedDataParallel under torchrun); the UNets
        themselves, their state_dict keys and checkpoints stay as they are."""
        self.runners = [utils.parallel(u, device) for u in self.unets]
        return self

    def velocity(self, step, a, b):
        """Antisymmetric smooth velocity of step 0/1: v(a, b) = -v(b, a), in normalised units
        (2 = the whole volume, as the reference's grid_sample grids) on the pooled grid."""
        x = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])  # both orders in one batch
        x, size = utils.pad_to_multiple(x, self.multiple)  # MONAI UNet needs sizes divisible by its stride
        o_ab, o_ba = utils.fp32(utils.crop_to(self.runners[step](x), size)).chunk(2)
        v = (torch.tanh(o_ab) - torch.tanh(o_ba)) * self.max_velocity
        v = v.flip(1)  # the reference reads the UNet's channels as grid_sample's (x, y, z) = axes (D, W, H)
        for s in self.pool_strides:  # the reference's smoothing: avg-pool 7 (stride 2, 2, then 1, 1)
            v = utils.box_filter(v, self.pool_kernel, s)
        return v

    def exp(self, v, size):
        """Normalised velocity -> ddf (voxel units) on the grid chosen by exp_at."""
        mode = utils.LINEAR[self.spatial_dims]
        if self.exp_at == "input":
            v = F.interpolate(v, size=size, mode=mode, align_corners=False)
        elif self.exp_coarsen > 1:  # factor 2 on even sizes = the mean of 2x2x2 neighbours
            v = F.interpolate(v, size=[math.ceil(n / self.exp_coarsen) for n in v.shape[2:]], mode=mode, align_corners=False)
        return utils.exp_velocity(utils.scale_channels(v, [n / 2 for n in v.shape[2:]]), self.squarings)

    def halfway(self, v, fixed, moving):
        """Warp both images half-way along the velocity v of a step (the reference's mid-step
        warp): fixed by exp(-v/2), moving by exp(v/2); image warps pad with zeros, as the reference."""
        size = fixed.shape[2:]
        fixed_h = utils.warp(fixed, utils.resize_ddf(self.exp(-v / 2, size), size), padding="zeros")
        moving_h = utils.warp(moving, utils.resize_ddf(self.exp(v / 2, size), size), padding="zeros")
        return fixed_h, moving_h

    def step_velocity(self, step, fixed, moving):
        """Velocity of step 0/1 whose field exp(v) warps the moving image onto the fixed one: the
        argument order of the reference's `field_bwd` (unet(moving, fixed) - unet(fixed, moving)),
        so the reference's trained UNet weights mean the same here."""
        return self.velocity(step, moving, fixed)

    def fields(self, v1, v2, size):
        """Both steps' velocities -> (ddf, ddf_inv) of half(step 1) o step 2 o half(step 1),
        upsampled to `size`."""
        half, half_inv = self.exp(v1 / 2, size), self.exp(-v1 / 2, size)
        psi, psi_inv = self.exp(v2, size), self.exp(-v2, size)
        ddf = utils.compose(half, utils.compose(psi, half))
        ddf_inv = utils.compose(half_inv, utils.compose(psi_inv, half_inv))
        return utils.resize_ddf(ddf, size), utils.resize_ddf(ddf_inv, size)

    def forward(self, fixed, moving):
        v1 = self.step_velocity(0, fixed, moving)
        v2 = self.step_velocity(1, *self.halfway(v1, fixed, moving))  # step 2 sees the half-way pair
        return self.fields(v1, v2, fixed.shape[2:])


# ======================================================================== token decoder (decode_tokens.py)

def load_decoder(grid, num_codes, vqae=None, decoder=None, device=None, classes=1):
    """The decoder of token grids `grid` (h, w, d) with `num_codes` codes and `classes` label classes: the
    VQAE checkpoint `vqae` or the TokenDecoder checkpoint `decoder` (one of them); refuses one made for
    other grids or classes."""
    if vqae and decoder:
        raise utils.DataError("--vqae and --decoder: give one decoder")
    if decoder:
        model = TokenDecoder.from_checkpoint(decoder, device)
        has, what = tuple(model.config["grid_shape"]), "token decoder"
    else:
        model = VQAE.from_checkpoint(vqae, device)
        has, what = model.token_grid(utils.grid_shape(model.config["factor"], model.config["frame"])), "VQ-AE"
    if tuple(has) != tuple(grid) or model.num_codes != num_codes:
        raise utils.DataError(f"{decoder or vqae}: {what} of {'x'.join(map(str, has))} token grids with {model.num_codes} "
                              f"codes, not {'x'.join(map(str, grid))} with {num_codes}")
    if getattr(model, "classes", 1) != classes:
        raise utils.DataError(f"{decoder or vqae}: decodes {getattr(model, 'classes', 1)} label classes per map, the "
                              f"tokens' VQ-AE {classes}")
    return model


class TokenDecoder(Checkpointed):
    """A decoder for token grids whose VQ-AE is not available (the reference's paper_tokens_97.pth:
    only its encoder's output survives), fitted on the pairs that have both a grid and volumes. Not
    part of the paper: it stands in for the reference's decoder, so the grids of training cases we
    have no volumes for become pairs (blurrier than real masks) to train on.

    ids (B, h, w, d) in [0, num_codes) -> learned embedding -> MONAI residual units on the token
    grid (kernel 3: a code alone does not place its vessels, its neighbours do; kernel 1 decoded
    held-out pairs with Dice ~0) -> `ups` x2 transposed convolutions (each followed by `up_blocks`
    residual units) -> logits (B, 2, h*2^ups, w*2^ups, d*2^ups), channel 0 fixed, 1 moving; sigmoid =
    occupancy (crop to the frame grid with utils.crop_to). Batch norm: with instance norm the
    held-out fixed and moving maps collapsed onto each other (RESULTS.md).

    motion=True: the head gives the fixed logits only, and a 3x3x3 convolution on the token grid a
    smooth ddf (B, 3, ...) in output voxels (trilinear up); the moving logits are the fixed ones
    warped by it, moving(y) = fixed(y + ddf(y)). Decoded pairs are then one map and an explicit
    motion, consistent by construction (independently decoded maps differed by grain that nets
    trained on them read as motion, RESULTS.md). decode_tokens.py supervises the ddf.
    """

    kind = "tokendecoder"

    def __init__(self, num_codes=1024, embed=64, width=64, blocks=4, up_channels=(32, 16), norm="BATCH",
                 kernel=3, up_blocks=0, motion=False, spatial_dims=3):
        super().__init__()
        n = self.spatial_dims = spatial_dims
        self.num_codes = num_codes
        self.embed = nn.Embedding(num_codes, embed)
        self.stem = Convolution(n, embed, width, kernel_size=kernel, norm=norm)
        self.blocks = nn.Sequential(*[ResidualUnit(n, width, width, kernel_size=kernel, subunits=2, norm=norm)
                                      for _ in range(blocks)])
        chans = (width, *up_channels)
        self.up = nn.Sequential(*[nn.Sequential(Convolution(n, a, b, strides=2, kernel_size=3, is_transposed=True, norm=norm),
                                                *[ResidualUnit(n, b, b, kernel_size=3, subunits=2, norm=norm)
                                                  for _ in range(up_blocks)])
                                  for a, b in zip(chans[:-1], chans[1:])])
        self.head = Convolution(n, chans[-1], 1 if motion else 2, kernel_size=1, conv_only=True)
        self.ups = len(up_channels)
        self.motion = motion
        if motion:
            self.flow = (nn.Conv2d, nn.Conv3d)[n - 2](width, n, kernel_size=3, padding=1)
            nn.init.zeros_(self.flow.weight)  # training starts from no motion
            nn.init.zeros_(self.flow.bias)

    def logits_and_motion(self, ids):
        """ids (B, h, w, d) -> (logits (B, 2, h*2^ups, w*2^ups, d*2^ups), the motion ddf (B, 3, same)
        in those voxels, or None without `motion`)."""
        x = self.blocks(self.stem(self.embed(ids.long()).movedim(-1, 1)))
        out = self.head(self.up(x))
        if not self.motion:
            return out, None
        ddf = F.interpolate(self.flow(x), size=out.shape[2:], mode=utils.LINEAR[self.spatial_dims], align_corners=False)
        return torch.cat([out, utils.warp(out, ddf)], 1), ddf

    def forward(self, ids):
        """ids (B, h, w, d) -> logits (B, 2, h*2^ups, w*2^ups, d*2^ups)."""
        return self.logits_and_motion(ids)[0]

    @torch.no_grad()
    def occupancy(self, ids, size):
        """ids (B, h, w, d) -> fixed and moving occupancy (B, 2, *size) in [0, 1], float32."""
        return utils.crop_to(utils.fp32(self(ids)), size).sigmoid()

    def decode_pair(self, ids, size, calibrate=True, foreground=False):
        """VQAE.decode_pair's counterpart: token ids (B, h, w, d) -> (fixed, moving) occupancies, each
        (B, *size). Its sigmoid is an occupancy already (calibrated); one class, so `foreground` changes nothing."""
        if not calibrate:
            raise ValueError("a TokenDecoder writes occupancies: calibrate=True")
        occ = self.occupancy(ids, size)
        return occ[:, 0], occ[:, 1]
