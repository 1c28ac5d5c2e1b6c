"""How the full-resolution smoothing trades noise against detail, per transform kind.

``register()`` smooths both images at full resolution by a sigma it chooses per pair from the
images' noise and from how much of the noise's pull towards half pixels the pair's transform keeps
(``register.NOISE_BIAS_LIMIT``, ``register._phase_coherence``; docs/design.md, "Noise-adapted
smoothing at full resolution").  This script measures that choice against fixed sigmas on the same
pairs, so that the rule can be recalibrated and checked.

The pairs: 256^2 crops of scikit-image scenes (scaled to a maximum of 1) with Gaussian noise of
2-20 % of that maximum (and
Poisson noise of 200, 50 and 13 photons at the brightest pixel on camera and cell), each image
rendered the same way (the scene upsampled 4x by cubic interpolation, warped bilinearly on that
fine grid, then averaged over 4 x 4 blocks), so that neither image carries an interpolation's
phase-dependent blur that the other lacks (a moving image resampled by cubic interpolation at one
sub-pixel phase over a fixed crop at whole pixels biased translations by 0.04 px without noise).
Transforms: shifts of up to 3 px, and for the other kinds rotations of up to 0.05 rad (about 3
degrees), scales 0.95-1.05 and shears up to 0.03 about the centre; ``--drift`` divides the
rotation and shear by 50 (a drift: one sub-pixel phase over the whole image, as a translation).
The error is the largest distance over the fixed image's corners between the found and the true
fixed -> moving map.

Run:  python benchmarks/noise_smoothing.py [--kinds translation rigid affine] [--drift]
          [--scenes camera coins ...] [--pairs 10] [--sigmas 1 1.5 2 2.5 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import zlib

import numpy as np
import torch

import tireg

SCENES = ("camera", "astronaut", "coins", "brick", "grass", "moon", "cell")
GAUSSIAN_NOISE = (0.02, 0.05, 0.1, 0.2)
PHOTONS = (200, 50, 13)  # Poisson noise, on camera and cell only
SIZE = 256
UPSAMPLING = 4


def upsampled_scene(name: str) -> torch.Tensor:
    """``(1, 1, 4H, 4W)`` float32: the grey scene scaled to a maximum of 1, upsampled 4x (cubic)."""
    from skimage import data, transform

    image = getattr(data, name)()
    if image.ndim == 3:
        image = image.mean(-1)
    image = image.astype(np.float32) / float(image.max())
    return torch.from_numpy(transform.rescale(image, UPSAMPLING, order=3).astype(np.float32))[None, None]


def render(fine: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The ``SIZE^2`` image whose pixel ``y`` shows the scene at ``matrix @ y`` (scene pixels): warped
    on the 4x grid, then averaged over 4 x 4 blocks."""
    offset = (UPSAMPLING - 1) / 2
    scale = torch.tensor([[UPSAMPLING, 0, offset], [0, UPSAMPLING, offset], [0, 0, 1]], dtype=torch.float64)
    fine_matrix = scale @ matrix @ torch.linalg.inv(scale)
    warped = tireg.warp(fine, fine_matrix.float(), size=(SIZE * UPSAMPLING, SIZE * UPSAMPLING))
    return torch.nn.functional.avg_pool2d(warped, UPSAMPLING)


def random_transform(rng: np.random.Generator, kind: str, drift: bool) -> torch.Tensor:
    """``A`` ``(3, 3)`` float64 about the crop's centre, moving -> fixed pixels: the moving image's pixel
    ``y`` shows what the fixed image shows at ``A y`` (``register``'s matrix is its inverse)."""
    shift = torch.eye(3, dtype=torch.float64)
    shift[:2, 2] = torch.from_numpy(rng.uniform(-3, 3, 2))
    if kind == "translation":
        return shift
    reduction = 50.0 if drift else 1.0
    angle = rng.uniform(-0.05, 0.05) / reduction
    scale = rng.uniform(0.95, 1.05) if kind in ("similarity", "affine") else 1.0
    shear = rng.uniform(-0.03, 0.03) / reduction if kind == "affine" else 0.0
    linear = torch.tensor([[scale * math.cos(angle), -scale * math.sin(angle) + shear, 0.0],
                           [scale * math.sin(angle), scale * math.cos(angle), 0.0], [0.0, 0.0, 1.0]],
                          dtype=torch.float64)
    center = torch.eye(3, dtype=torch.float64)
    center[:2, 2] = (SIZE - 1) / 2
    return center @ linear @ torch.linalg.inv(center) @ shift


def corner_error(found: torch.Tensor, truth: torch.Tensor) -> float:
    corners = torch.tensor([[0, 0, 1], [SIZE - 1, 0, 1], [0, SIZE - 1, 1], [SIZE - 1, SIZE - 1, 1]],
                           dtype=torch.float64).T
    return float(((found @ corners - truth @ corners)[:2]).norm(dim=0).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["translation", "rigid", "affine"],
                        choices=["translation", "rigid", "similarity", "affine"])
    parser.add_argument("--drift", action="store_true", help="rotations and shears 50x smaller")
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--pairs", type=int, default=10, help="pairs per scene and noise level")
    parser.add_argument("--sigmas", nargs="*", type=float, default=[1.0, 1.5, 2.0, 2.5, 3.0],
                        help="fixed full-resolution sigmas to compare with register's own choice")
    parser.add_argument("--json", help="write every pair's record here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = []
    columns = ["chosen"] + [f"{sigma:g} px" for sigma in args.sigmas]
    print(f"median corner error [px] per scene and noise; 'chosen' is register()'s own sigma "
          f"({args.pairs} pairs each{', drift' if args.drift else ''})\n")
    for kind in args.kinds:
        print(f"**{kind}**\n\n| scene | noise | sigma chosen | " + " | ".join(columns) + " |")
        print("|---|---|---|" + "---:|" * len(columns))
        for scene in args.scenes:
            fine = upsampled_scene(scene)
            height, width = (side // UPSAMPLING for side in fine.shape[-2:])
            crop = torch.eye(3, dtype=torch.float64)
            crop[:2, 2] = torch.tensor([width // 2 - SIZE // 2, height // 2 - SIZE // 2], dtype=torch.float64)
            noises = [f"g{level}" for level in GAUSSIAN_NOISE]
            noises += [f"p{count}" for count in PHOTONS] if scene in ("camera", "cell") else []
            for noise in noises:
                rng = np.random.default_rng(zlib.crc32(f"{scene} {noise} {kind} {args.drift}".encode()))
                rows = []
                for index in range(args.pairs):
                    truth = random_transform(rng, kind, args.drift)
                    fixed, moving = render(fine, crop), render(fine, crop @ truth)
                    generator = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
                    if noise.startswith("g"):
                        level = float(noise[1:])
                        fixed = fixed + level * torch.randn(fixed.shape, generator=generator)
                        moving = moving + level * torch.randn(moving.shape, generator=generator)
                    else:
                        count = float(noise[1:])
                        fixed = torch.poisson(fixed.clamp(min=0) * count, generator=generator)
                        moving = torch.poisson(moving.clamp(min=0) * count, generator=generator)
                    expected = torch.linalg.inv(truth)  # register's matrix maps fixed -> moving pixels
                    result = tireg.register(fixed, moving, transform=kind)
                    row = {"kind": kind, "drift": args.drift, "scene": scene, "noise": noise, "index": index,
                           "sigma": result.metadata["smoothing"][-1], "chosen": corner_error(result.matrix[0], expected)}
                    for sigma, column in zip(args.sigmas, columns[1:]):
                        fixed_sigma = tireg.register(fixed, moving, transform=kind,
                                                     pyramid=tireg.Pyramid(finest_smoothing=sigma))
                        row[column] = corner_error(fixed_sigma.matrix[0], expected)
                    rows.append(row)
                records += rows
                sigmas = sorted({row["sigma"] for row in rows})
                print(f"| {scene} | {noise} | {', '.join(f'{s:g}' for s in sigmas)} | "
                      + " | ".join(f"{np.median([row[c] for row in rows]):.3f}" for c in columns) + " |", flush=True)
        mine = [row for row in records if row["kind"] == kind]
        print("| all | | | " + " | ".join(f"{np.median([row[c] for row in mine]):.3f}" for c in columns)
              + " |\n\nmean: " + ", ".join(f"{c} {np.mean([row[c] for row in mine]):.3f}" for c in columns) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle)


if __name__ == "__main__":
    main()
