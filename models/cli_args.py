"""The arguments of ``reconserve train`` and ``reconserve data``, defined without importing torch or numpy.

``reconserve --help`` (and ``train --help``, ``data --help``) reads these before anything heavy is
imported; :mod:`models.train` and :mod:`models.data` run what they parse.
"""
from __future__ import annotations

import argparse

#: The generated data sets (:func:`models.data.generate`); ``--data`` may also name a folder.
KINDS = ("darcy", "poisson", "helmholtz", "phantom")
#: ``--objective``: what the network learns; the card's ``parameterization.kind`` says which.
OBJECTIVES = ("edm", "flow")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``reconserve train`` (defaults in brackets; ``None`` ones fall back to a saved state)."""
    a = parser.add_argument
    a("--data", default=None, help=f"{' | '.join(KINDS)} | PATH to a folder of .npy/.png/.tif [darcy]")
    a("--resolution", type=int, default=None,
      help="grid size N of generated data [64]; for a folder, images are brought to N x N: the centred square "
           "crop (side min(H, W)) of each image, resized with antialiased bilinear interpolation "
           "(without it a folder is used at its native size, all files alike)")
    a("--out", default=None, help="checkpoint folder checkpoints/ID [checkpoints/<data>-<N>]")
    a("--runs-dir", default="runs", help="where runs/<id>/ (state, generated data, log) lives [runs]")
    a("--steps", type=int, default=None, help="total optimizer steps (counting resumed ones) [20000]")
    a("--batch", type=int, default=None, help="batch size [16]")
    a("--lr", type=float, default=None, help="Adam learning rate [2e-4]")
    a("--warmup", type=int, default=None, help="linear learning-rate warm-up steps [500]")
    a("--grad-clip", type=float, default=None, help="gradient-norm clip [1.0]")
    a("--ema-halflife-kimg", type=float, default=None, help="EMA half-life in thousands of images [10]")
    a("--ema-rampup", type=float, default=None, help="EMA half-life ramp-up ratio (EDM) [0.05]")
    a("--num-examples", type=int, default=None, help="examples generated into runs/<id>/data.npy [10000]")
    a("--data-seed", type=int, default=None, help="seed of the generated data [0]")
    a("--base-channels", type=int, default=None, help="UNet base width [32]")
    a("--channel-mult", default=None, help="UNet width per level, e.g. 1,2,2,2 [1,2,2,2]")
    a("--blocks-per-level", type=int, default=None, help="UNet residual blocks per level [1]")
    a("--no-attention", dest="attention", action="store_false", default=None,
      help="no self-attention at the coarsest level")
    a("--objective", choices=OBJECTIVES, default=None,
      help="edm: denoising score matching with EDM preconditioning; flow: flow matching (velocity of the "
           "linear interpolant x_t = (1 - t) x0 + t z), served through the same D(x, sigma) [edm]")
    a("--augment", choices=("auto", "none", "flips", "d4"), default=None,
      help="random symmetries: auto = d4 for PDE data, flips for phantoms, none for folders [auto]")
    a("--save-every", type=int, default=200, help="save state and checkpoint every this many steps [200]")
    a("--log-every", type=int, default=50, help="print a log line every this many steps [50]")
    a("--seed", type=int, default=None, help="training seed (init, batches, noise) [0]")
    a("--device", default="auto", help="cpu | cuda | cuda:N | auto [auto]")
    a("--threads", type=int, default=None, help="torch.set_num_threads (CPU) [torch default]")
    a("--time-limit-min", type=float, default=None, help="stop cleanly (saving) after this many minutes")
    a("--resume", action="store_true", help="continue from runs/<id>/ or checkpoints/<id>/")
    a("--overwrite", action="store_true", help="start afresh even if a state or checkpoint exists")
    a("--description", default=None, help="card description")
    return parser


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``reconserve data``: write a seeded data set as ``.npy`` shards plus ``meta.json``."""
    a = parser.add_argument
    a("kind", choices=KINDS, help="which data set to generate")
    a("--num", type=int, default=1000, help="number of examples [1000]")
    a("--resolution", "-n", type=int, default=64, help="grid size N (N x N nodes) [64]")
    a("--seed", type=int, default=0, help="seed of numpy.random.default_rng: the same seed gives the same data [0]")
    a("--out", default=None, help="output folder [data/<kind>-<N>]")
    a("--shard-size", type=int, default=1000, help="examples per .npy shard [1000]")
    return parser
