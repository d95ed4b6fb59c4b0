"""cfg-export calibrate: INT8 calibration data from guided sampler trajectories."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, ProgressBar, parse_list, say, verbosity_options


@click.command("calibrate", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path())
@click.option("-o", "--out", "out_path", required=True, metavar="CALIB.npz", help="Calibration file to write.")
@click.option("--sampler", default=None, help="Sampler of the recorded trajectories (default ddim).")
@click.option("--steps", type=int, default=None, help="Sampler steps (default 50).")
@click.option("--w", type=float, default=None, help="Guidance weight of the trajectories (default 3).")
@click.option("--classes", default=None, metavar="0,1,...", help="Class labels (default: every class).")
@click.option("--n", type=int, default=None, help="Images per class (default 2).")
@click.option("--seed", type=int, default=None, help="Seed of the initial noise (default 0).")
@click.option("--record-steps", type=int, default=None, metavar="K",
              help="Record K steps spread evenly over the trajectory, first and last included (default: all).")
@verbosity_options
def calibrate_command(directory, out_path, sampler, steps, w, classes, n, seed, record_steps):
    """Record INT8 calibration data: run the FP32 artifact DIR through the guided sampler
    and keep the exact stacked inputs of the model (sample, timestep, cond; conditional
    and null halves) at steps spread over the whole trajectory.

    \b
    The file holds one array per model input, rows first ([K * 2N, ...]), and a manifest
    (source model sha256, sampler, steps, w, seed, recorded steps): it is refused for
    any other model. Use it with cfg-export quantize, or cfg-export trt --calibration-data.
    """
    from cfg_export.calibration.record import record_calibration

    with ProgressBar("recording") as bar:
        result = record_calibration(directory, out_path, classes=parse_list(classes, int, "--classes", "0,1,2"), n=n,
                                    w=w, steps=steps, sampler=sampler, seed=seed, record_steps=record_steps,
                                    progress=bar)
    m = result.manifest
    say(f"wrote {result.path}: {len(m.rows)} of {m.steps} {m.sampler} steps (t={m.recorded_timesteps[0]}.."
        f"{m.recorded_timesteps[-1]}) x {m.rows[0]} rows ({m.images} images, w={m.w:g}, seed {m.seed}) "
        f"in {result.seconds:.1f} s")
