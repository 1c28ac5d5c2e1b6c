"""The seed document's walkthrough, verbatim, on a bundled real image.

Every snippet of ``seed/000_6a13fb89c99a4973.txt`` appears below unchanged
(marked ``# --- seed ---``) after the one import line that maps the seed's
module names onto tireg.  A known transform of the bundled astronaut image
is recovered by both models (autograd and analytic), Cauchy loss, the seed's
sigmoid ranges and Adam; the script prints recovered against true
parameters and the mean error over a grid of points in pixels.

Run:  python examples/seed_walkthrough.py
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from tireg.compat import PerPixelLoss, AffyModel, AffyModelAnal, Affy, Mapping  # the one line
from tireg.data import astronaut
from tireg.sampling import pixel_grid, warp
from tireg.transforms import image_center


# --- seed ---
class PerPixel_CauchyLoss( PerPixelLoss.PerPixelLoss ):
    def __init__(self):
        super().__init__()
    def forward( self, x, y, gradient = False ):
        if x.dim()!=4:
            raise Exception("error")
        c = torch.pow( x - y, 2.0 ) + 1.0
        loss = torch.log( c )
        if not gradient:
            return loss
        grad= (x - y)/c 
        return loss,grad

loss_func = PerPixel_CauchyLoss()
# --- end seed ---


class ExactCauchyLoss(PerPixel_CauchyLoss):
    """The seed's Cauchy loss with its derivative corrected: d/dx log(1 + r^2) = 2 r / (1 + r^2)."""

    def forward(self, x, y, gradient=False):
        if not gradient:
            return super().forward(x, y)
        loss, half = super().forward(x, y, True)
        return loss, 2.0 * half


# --- seed ---
class MyModel( AffyModel.AffineModel ):
    def __init__( self, cx, cy, bordermode ):
        super().__init__( cx, cy, bordermode )
        # angle, scalex, scaley, dx, dy
        self.p = nn.ParameterList( torch.tensor( [i] ) for i in [0.0, 0.0, 0.0, 1.0]  )
        self.m = [Mapping.IdentityMapping() for i in range( len(self.p) )]
    def get_matrix( self ):
        return Affy.get_matrix( self.get(0), self.get(3), self.get(3), self.get(1), self.get(2), self.cx, self.cy )
# --- end seed ---


# --- seed --- (the seed shows __init__ and get_derva as two snippets of one class)
class MyModelAnalytic( AffyModelAnal.AffineModelAnalytic ):
    def __init__( self, cx, cy, bordermode, movingImage ):
        super().__init__( cx, cy, bordermode, movingImage )

    def get_derva( self, idx ):
            if idx==0:
                return Affy.da( self.get(0),self.get(3),self.get(3),self.get(1),self.get(2), self.cx, self.cy )
            elif idx==1:
                return Affy.dx( self.get(0),self.get(3),self.get(3),self.get(1),self.get(2), self.cx, self.cy )
            elif idx==2:
                return Affy.dy( self.get(0),self.get(3),self.get(3),self.get(1),self.get(2), self.cx, self.cy )
            elif idx==3:
                return Affy.ds( self.get(0),self.get(3), self.get(1),self.get(2), self.cx, self.cy )
# --- end seed ---


#: The known transform: angle [rad], dx, dy [px], scale (the seed's parameters).
TRUE_PARAMETERS = (0.08, 6.0, -4.0, 1.04)


def vignette(height: int, width: int, margin: int = 20, ramp: int = 20) -> torch.Tensor:
    """A window that is 0 within ``margin`` pixels of the edges and rises smoothly over ``ramp`` pixels to 1.

    Darkening the border keeps the whole scene inside both frames, so that
    no content leaves the image under the transform: the seed's model has no
    mask (register() does), and a scene cut by the frame would bias the
    optimum by a few tenths of a pixel.
    """

    def profile(length: int) -> torch.Tensor:
        distance = torch.minimum(torch.arange(length), torch.arange(length).flip(0)).double()
        rise = ((distance - margin) / ramp).clamp(0, 1)
        return (0.5 - 0.5 * torch.cos(math.pi * rise)).float()

    return profile(height)[:, None] * profile(width)[None, :]


def make_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Fixed image, moving image = fixed seen through the known transform, the true matrix, centre."""
    target = (astronaut() * vignette(192, 256))[None, None]  # fixed, (1, 1, 192, 256)
    cx, cy = image_center(*target.shape[-2:])
    angle, dx, dy, scale = TRUE_PARAMETERS
    true_matrix = Affy.get_matrix(torch.tensor([angle]), scale, scale, dx, dy, cx, cy)
    # moving(A x) = fixed(x)  <=>  moving = fixed warped by A^-1
    source = warp(target, torch.linalg.inv(true_matrix))
    return source, target, true_matrix, cx, cy


def grid_error(matrix: torch.Tensor, true_matrix: torch.Tensor, size: tuple[int, int]) -> float:
    """Mean distance in pixels between where the two matrices send every fixed pixel."""
    points = pixel_grid(size, dtype=torch.float64)
    difference = points @ (matrix.double().reshape(3, 3) - true_matrix.double().reshape(3, 3)).T
    return float(difference[:, :2].norm(dim=1).mean())


def run(iterations: int = 400, learning_rate: float = 0.02, verbose: bool = True) -> dict[str, float]:
    """Run the walkthrough; return the mean grid error (pixels) of each model."""
    source, target, true_matrix, cx, cy = make_pair()
    seed_loss = loss_func

    # --- seed --- (model set-up)
    model = MyModel( cx, cy, "zeros" )
    model.set_parameter( 0, 0.0, Mapping.SigmoidMapping( -0.25, 0.25 ) )
    model.set_parameter( 1, 0.0, Mapping.SigmoidMapping( -80.0, 80.0 ) )
    model.set_parameter( 2, 0.0, Mapping.SigmoidMapping( -130.0, 130.0 ) )
    model.set_parameter( 3, 1.0, Mapping.SigmoidMapping(0.5, 1.6) )
    model.train()
    optim = torch.optim.Adam( model.parameters(), lr = learning_rate)

    model2 = MyModelAnalytic( cx, cy, "zeros", source )
    model2.loss_func=loss_func
    # --- end seed ---
    # "...similar for the model2", with the derivative the seed meant (2x its Cauchy's)
    model2.loss_func = ExactCauchyLoss()
    model2.set_parameter( 0, 0.0, Mapping.SigmoidMapping( -0.25, 0.25 ) )
    model2.set_parameter( 1, 0.0, Mapping.SigmoidMapping( -80.0, 80.0 ) )
    model2.set_parameter( 2, 0.0, Mapping.SigmoidMapping( -130.0, 130.0 ) )
    model2.set_parameter( 3, 1.0, Mapping.SigmoidMapping(0.5, 1.6) )
    # --- seed ---
    optim2 = torch.optim.Adam( model2.parameters(), lr = learning_rate )
    # --- end seed ---

    seconds = {}
    start = time.perf_counter()
    for _ in range(iterations):
        # --- seed --- (autograd training loop)
        s = model( source )
        loss = torch.sum( loss_func.forward( s, target, False ) )
        loss.backward()
        optim.step()
        optim.zero_grad()
        # --- end seed ---
    seconds["autograd"] = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(iterations):
        # --- seed --- (analytic training loop)
        s2,loss2 = model2( source, target )
        optim2.step()
        optim2.zero_grad()
        # --- end seed ---
    seconds["analytic"] = time.perf_counter() - start
    assert seed_loss is loss_func

    size = tuple(target.shape[-2:])
    errors = {}
    if verbose:
        angle, dx, dy, scale = TRUE_PARAMETERS
        print(f"image {size[1]}x{size[0]} (W x H), {iterations} Adam steps, lr {learning_rate}")
        print(f"{'':10s} {'angle[deg]':>10s} {'dx[px]':>8s} {'dy[px]':>8s} {'scale':>7s} {'grid err[px]':>12s} {'time[s]':>8s}")
        print(f"{'true':10s} {math.degrees(angle):10.3f} {dx:8.3f} {dy:8.3f} {scale:7.4f}")
    for name, trained in (("autograd", model), ("analytic", model2)):
        with torch.no_grad():
            values = [float(trained.get(i)) for i in range(4)]
            errors[name] = grid_error(trained.get_matrix(), true_matrix, size)
        if verbose:
            print(
                f"{name:10s} {math.degrees(values[0]):10.3f} {values[1]:8.3f} {values[2]:8.3f} {values[3]:7.4f} "
                f"{errors[name]:12.3f} {seconds[name]:8.2f}"
            )
    return errors


if __name__ == "__main__":
    run()
